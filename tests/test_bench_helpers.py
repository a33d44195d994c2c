"""Helpers of the benchmark scripts (scripts/_common.py) that decide where results are written."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from _common import result_path  # noqa: E402


def test_result_paths_keep_dots_in_the_stem_so_runs_do_not_share_files():
    a, b = Path("out/w4a4_cap0.05"), Path("out/w4a4_cap0.05_frozen")
    assert result_path(a, ".json") == Path("out/w4a4_cap0.05.json")
    assert result_path(b, ".json") == Path("out/w4a4_cap0.05_frozen.json") != result_path(a, ".json")
    assert result_path(Path("out/table"), ".md") == Path("out/table.md")
    assert result_path(Path("out/table.json"), ".md") == Path("out/table.md")  # a stem given with its suffix
