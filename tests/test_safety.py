"""Nothing lost, nothing executed: a table of bad inputs and dangerous outputs, each run as a real command.

Every case runs ``python -m spinquant ...`` in a subprocess (offline) and must
- exit with its status (2 for bad input) and print exactly one line on stderr, ``error: ...`` naming the
  problem (no traceback, no library noise before it);
- leave every file that existed before byte-identical (sha256 of the whole test tree before and after);
- create no output directory and leave no ``.partial-`` file, no temp export folder and no child process.
Cases whose payload is a pickle also check that the payload never ran (its marker file is absent).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from spinquant.cli import cli
from tests.helpers import wait_for

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RTN = ["--method", "rtn"]
FAST_CAL = ["--steps", "2", "--set", "batch_size=2", "--seqlen", "64", "--gptq-nsamples", "4", "--set", "eval_windows=2"]


def spinquant(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinquant", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=timeout)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def export_temp_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("spinquant-export-*")}


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args and "pytest" not in args:
            found.append(args)
    return found


def exporters_of(parent: int) -> list[int]:
    """PIDs of executorch export_llama processes whose parent is ``parent``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"export_llama" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


class Payload:
    """A pickle whose unpickling would create ``marker``: what a crafted state file or checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"r1": torch.eye(2), "evil": Payload(marker)}, f)


# --- the shared inputs: a model, data, finished runs of each command -----------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, corpus_file):
    root = tmp_path_factory.mktemp("world")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    data = root / "corpus.txt"
    shutil.copy(corpus_file, data)
    runner = CliRunner()
    for seed, name in ((0, "run-a"), (1, "run-b")):
        r = runner.invoke(cli, ["quantize", "--model", str(model), "--out", str(root / name), *RTN, "--seed", str(seed)])
        assert r.exit_code == 0, r.output
        r = runner.invoke(cli, ["export", "--from", str(root / name), "--no-pte"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["calibrate", "--model", str(model), "--out", str(root / "cal"), "--calib-data", str(data),
                            "--eval-data", str(data), "--no-pte", *FAST_CAL])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["learn-rotations", "--model", str(model), "--out", str(root / "rot"), "--calib-data", str(data),
                            "--steps", "1", "--batch-size", "1", "--seqlen", "32"])
    assert r.exit_code == 0, r.output
    user = root / "my-notes"
    user.mkdir()
    (user / "todo.txt").write_text("my own file\n")
    (root / "a-file").write_text("not a directory\n")
    return root


def copy_model(world: Path, dst: Path) -> Path:
    shutil.copytree(world / "model", dst)
    return dst


def edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def weights_file(model: Path) -> Path:
    return next(model.glob("*.safetensors"))


# --- the table --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """``argv(world, case_dir)`` -> arguments; ``setup(world, case_dir)`` prepares inputs in case_dir first."""

    id: str
    argv: Callable[[Path, Path], list]
    message: str
    setup: Callable[[Path, Path], None] | None = None
    status: int = 2
    marker: bool = False  # a pickle payload was planted: its marker must not appear
    needs_mount: str | None = None  # "ro" or "full": case_dir/mnt is a read-only / 64 KiB tmpfs


def _truncate(w: Path, d: Path) -> None:
    m = copy_model(w, d / "m")
    f = weights_file(m)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _nan(w: Path, d: Path) -> None:
    m = copy_model(w, d / "m")
    f = weights_file(m)
    sd = load_file(f)
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})


def _vocab_config(w: Path, d: Path) -> None:
    edit_config(copy_model(w, d / "m"), vocab_size=512)


def _big_tokenizer(w: Path, d: Path) -> None:
    from tests.helpers import make_tiny_model, make_tiny_tokenizer

    m = d / "m"
    make_tiny_model(vocab_size=200).save_pretrained(m)
    make_tiny_tokenizer().save_pretrained(m)  # 320 tokens for 200 embedding rows


def _rope(**rope):
    def setup(w: Path, d: Path) -> None:
        m = copy_model(w, d / "m")
        cfg = json.loads((m / "config.json").read_text())
        base = cfg.get("rope_parameters") or {"rope_theta": 500000.0}
        edit_config(m, rope_parameters={"rope_theta": base.get("rope_theta", 500000.0), **rope}, max_position_embeddings=2048)
    return setup


def _gpt2(w: Path, d: Path) -> None:
    (d / "m").mkdir()
    (d / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))


def _head_dim_6(w: Path, d: Path) -> None:
    from tests.helpers import make_tiny_model, make_tiny_tokenizer

    make_tiny_model(hidden_size=24, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48).save_pretrained(d / "m")
    make_tiny_tokenizer().save_pretrained(d / "m")


def _meta_file(content: Callable[[Path, Path], None]):
    def setup(w: Path, d: Path) -> None:
        m = d / "meta"
        m.mkdir()
        (m / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
        content(m / "consolidated.00.pth", d)
    return setup


def _garbage(path: Path, d: Path) -> None:
    path.write_bytes(b"\x80\x02not really a checkpoint" * 10)


def _evil_pth(path: Path, d: Path) -> None:
    write_payload(path, d / "PWNED")


def _evil_rbin(w: Path, d: Path) -> None:
    write_payload(d / "R.bin", d / "PWNED")


def _evil_learn_state(w: Path, d: Path) -> None:
    shutil.copytree(w / "rot", d / "rot")
    write_payload(d / "rot" / "learn_state.pt", d / "PWNED")


def _evil_calibrate_state(w: Path, d: Path) -> None:
    shutil.copytree(w / "cal", d / "cal")
    stages = json.loads((d / "cal" / "stages.json").read_text())
    (d / "cal" / "stages.json").write_text(json.dumps({k: v for k, v in stages.items() if k != "learn"}))
    write_payload(d / "cal" / "learn_state.pt", d / "PWNED")


def _jsonl_without_text(w: Path, d: Path) -> None:
    (d / "chats.jsonl").write_text("\n".join(json.dumps({"prompt": f"hello {i}", "answer": "hi"}) for i in range(50)))


def _batch(doc: dict):
    def setup(w: Path, d: Path) -> None:
        (d / "jobs.yaml").write_text(yaml.safe_dump(doc))
    return setup


def learn_args(w: Path, out) -> list:
    return ["learn-rotations", "--model", w / "model", "--out", out, "--calib-data", w / "corpus.txt", "--steps", "1",
            "--batch-size", "1", "--seqlen", "32"]


def cal_args(w: Path, model, out, *extra) -> list:
    return ["calibrate", "--model", model, "--out", out, "--calib-data", w / "corpus.txt", "--eval-data", w / "corpus.txt",
            *FAST_CAL, *extra]


CASES = [
    # data loss: outputs that are not ours, or are inputs
    Case("quantize-over-calibrate-run", lambda w, d: ["quantize", "--model", w / "model", "--out", w / "cal", *RTN],
         "holds the output of spinquant calibrate"),
    Case("quantize-over-user-folder", lambda w, d: ["quantize", "--model", w / "model", "--out", w / "my-notes", *RTN],
         "holds no spinquant output"),
    Case("quantize-into-its-model", lambda w, d: ["quantize", "--model", w / "model", "--out", w / "model", *RTN],
         "is the input --model"),
    Case("quantize-into-its-model-overwrite", lambda w, d: ["quantize", "--model", w / "model", "--out", w / "model", *RTN,
                                                            "--overwrite"], "is the input --model"),
    Case("quantize-inside-its-model", lambda w, d: ["quantize", "--model", w / "model", "--out", w / "model" / "q", *RTN],
         "lies inside the input --model"),
    Case("quantize-around-its-model", lambda w, d: ["quantize", "--model", w / "model", "--out", w, *RTN, "--overwrite"],
         "contains the input --model"),
    Case("quantize-over-other-options", lambda w, d: ["quantize", "--model", w / "model", "--out", w / "run-a", *RTN,
                                                      "--seed", "5"], "with other options (seed)"),
    Case("quantize-out-is-a-file", lambda w, d: ["quantize", "--model", w / "model", "--out", w / "a-file", *RTN],
         "is an existing file"),
    Case("rotate-over-calibrate-run", lambda w, d: ["rotate", "--model", w / "model", "--out", w / "cal"],
         "holds the output of spinquant calibrate"),
    Case("rotate-into-its-model-overwrite", lambda w, d: ["rotate", "--model", w / "model", "--out", w / "model", "--overwrite"],
         "is the input --model"),
    Case("export-into-another-run", lambda w, d: ["export", "--from", w / "run-a", "--out", w / "run-b", "--no-pte"],
         "with other options (from)"),
    Case("export-over-foreign-checkpoint", lambda w, d: ["export", "--from", w / "run-a", "--out", d / "ck", "--no-pte"],
         "already holds consolidated.00.pth",
         setup=lambda w, d: ((d / "ck").mkdir(), (d / "ck" / "consolidated.00.pth").write_bytes(b"mine"))),
    Case("export-inside-its-run", lambda w, d: ["export", "--from", w / "run-a", "--out", w / "run-a" / "sub", "--no-pte"],
         "lies inside the input --from"),
    Case("learn-over-quantize-run", lambda w, d: learn_args(w, w / "run-a"), "holds the output of spinquant export, quantize, not of learn-rotations"),
    Case("learn-over-other-options", lambda w, d: learn_args(w, w / "rot")[:-2] + ["--seqlen", "48"],
         "with other options (calibration)"),
    Case("calibrate-over-user-folder", lambda w, d: cal_args(w, w / "model", w / "my-notes"), "holds no spinquant output"),
    Case("calibrate-out-is-a-file", lambda w, d: cal_args(w, w / "model", w / "a-file"), "is an existing file"),
    Case("calibrate-other-model", lambda w, d: cal_args(w, d / "m", w / "cal"), "holds a run of a different model",
         setup=lambda w, d: copy_model(w, d / "m") and None),
    Case("calibrate-out-in-calib-data-folder", lambda w, d: cal_args(w, w / "model", w / "corpus.txt" / "x"),
         "is a file, not a directory"),
    Case("requantize-into-its-source", lambda w, d: ["requantize", "--from", w / "cal", "--target", "xnnpack-8da4w-g64",
                                                     "--out", w / "cal" / "g64", "--no-pte"], "lies inside the input --from"),
    # files that could execute code
    Case("learn-state-pickle-payload", lambda w, d: learn_args(w, d / "rot"), "never runs code from a state file",
         setup=_evil_learn_state, marker=True),
    Case("calibrate-state-pickle-payload", lambda w, d: cal_args(w, w / "model", d / "cal", "--no-pte"),
         "never runs code from a state file", setup=_evil_calibrate_state, marker=True),
    Case("meta-checkpoint-pickle-payload", lambda w, d: ["quantize", "--model", d / "meta", "--out", d / "q", *RTN],
         "cannot read the Meta checkpoint", setup=_meta_file(_evil_pth), marker=True),
    Case("rbin-pickle-payload", lambda w, d: ["quantize", "--model", w / "model", "--out", d / "q", *RTN, "--rotations",
                                              d / "R.bin"], "R.bin", setup=_evil_rbin, marker=True),
    Case("corrupt-meta-checkpoint", lambda w, d: ["quantize", "--model", d / "meta", "--out", d / "q", *RTN],
         "cannot read the Meta checkpoint", setup=_meta_file(_garbage)),
    # a failed start leaves nothing behind (the fix it names then works: test_failed_start_does_not_block_its_fix)
    Case("seqlen-above-max-positions", lambda w, d: cal_args(w, w / "model", d / "out") + ["--seqlen", "4096"],
         "pass --seqlen 256 or less"),
    Case("offline-without-calib-data", lambda w, d: ["calibrate", "--model", w / "model", "--out", d / "out", *FAST_CAL],
         "pass --calib-data"),
    # bad model files
    Case("missing-model-path", lambda w, d: ["quantize", "--model", d / "nope", "--out", d / "q", *RTN], "no such path"),
    Case("not-a-llama", lambda w, d: ["quantize", "--model", d / "m", "--out", d / "q", *RTN], "unsupported architecture 'gpt2'",
         setup=_gpt2),
    Case("truncated-shard", lambda w, d: cal_args(w, d / "m", d / "out"), "truncated or corrupt", setup=_truncate),
    Case("nan-weights", lambda w, d: cal_args(w, d / "m", d / "out"),
         "weight model.layers.1.mlp.down_proj.weight holds 1 non-finite values", setup=_nan),
    Case("config-vocab-disagrees", lambda w, d: ["quantize", "--model", d / "m", "--out", d / "q", *RTN],
         "config.json says vocab_size 512", setup=_vocab_config),
    Case("tokenizer-larger-than-embedding", lambda w, d: cal_args(w, d / "m", d / "out"),
         "the tokenizer has 320 tokens but the model", setup=_big_tokenizer),
    Case("group-size-does-not-divide", lambda w, d: ["quantize", "--model", w / "model", "--out", d / "q", *RTN, "--group-size",
                                                     "256"], "does not divide the model's hidden_size"),
    Case("no-hadamard-size", lambda w, d: ["rotate", "--model", d / "m", "--out", d / "r"], "no Hadamard matrix of size 6",
         setup=_head_dim_6),
    Case("rope-llama3-low-freq", lambda w, d: cal_args(w, d / "m", d / "out"), "low_freq_factor 2.0",
         setup=_rope(rope_type="llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)),
    Case("rope-llama3-original-context", lambda w, d: cal_args(w, d / "m", d / "out"), "original_max_position_embeddings 4096",
         setup=_rope(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=4096)),
    Case("rope-yarn", lambda w, d: cal_args(w, d / "m", d / "out"), "RoPE type 'yarn'",
         setup=_rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=512)),
    Case("rope-linear", lambda w, d: cal_args(w, d / "m", d / "out"), "RoPE type 'linear'",
         setup=_rope(rope_type="linear", factor=2.0)),
    # bad options and data
    Case("jsonl-without-text-field", lambda w, d: ["quantize", "--model", w / "model", "--out", d / "q", "--calib-data",
                                                   d / "chats.jsonl", "--seqlen", "16", "--gptq-nsamples", "2"],
         "pass --text-field NAME", setup=_jsonl_without_text),
    Case("eval-data-missing", lambda w, d: cal_args(w, w / "model", d / "out") + ["--eval-data", d / "none.txt"],
         "none.txt: no such file or folder"),
    Case("pte-with-vulkan-target", lambda w, d: cal_args(w, w / "model", d / "out", "--target", "vulkan-int4-weight-only",
                                                         "--pte"), "has no .pte"),
    Case("batch-wrong-type", lambda w, d: ["batch", d / "jobs.yaml"], "steps must be an integer (got 'two')",
         setup=_batch({"jobs": [{"model": "m", "steps": "two"}]})),
    Case("batch-invalid-yaml", lambda w, d: ["batch", d / "jobs.yaml"], "invalid YAML",
         setup=lambda w, d: (d / "jobs.yaml").write_text("jobs: [ {model: x\n")),
    Case("eval-hub-id-offline", lambda w, d: ["eval", "--model", "someone/some-llama", "--data", w / "corpus.txt"],
         "could not fetch 'someone/some-llama' from the Hugging Face hub"),
    Case("unknown-target", lambda w, d: cal_args(w, w / "model", d / "out", "--target", "tpu-int3"), "unknown target 'tpu-int3'"),
    # the machine: read-only file system, disk full
    Case("out-on-read-only-fs", lambda w, d: ["quantize", "--model", w / "model", "--out", d / "mnt" / "q", *RTN],
         "Read-only file system", needs_mount="ro"),
    Case("disk-full", lambda w, d: ["quantize", "--model", w / "model", "--out", d / "mnt" / "q", *RTN],
         "No space left on device", needs_mount="full"),
]


def mount_tmpfs(where: Path, kind: str) -> None:
    where.mkdir()
    opts = "size=64k" if kind == "full" else "size=1m"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {r.stderr.strip()}")
    (where / "earlier-result.txt").write_text("keep me\n")
    if kind == "ro":
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def test_the_table_has_enough_cases():
    assert len(CASES) >= 35 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_with_one_line_and_nothing_touched(case: Case, world: Path, tmp_path: Path):
    d = tmp_path / "case"
    d.mkdir()
    mounted = None
    try:
        if case.needs_mount:
            mounted = d / "mnt"
            mount_tmpfs(mounted, case.needs_mount)
        if case.setup:
            case.setup(world, d)
        before_world, before_case = tree_digest(world), tree_digest(d)
        entries_before = {p.name for p in d.iterdir()}
        exports_before = export_temp_dirs()
        r = spinquant(*case.argv(world, d), cwd=d)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == case.status, f"exit {r.returncode}\n{r.stderr}"
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert case.message in lines[0], lines[0]
        assert tree_digest(world) == before_world
        assert tree_digest(d) == before_case, "a file that existed before was changed or a file was added"
        assert {p.name for p in d.iterdir()} == entries_before, "an output directory was created"
        assert not [p for p in list(world.rglob("*")) + list(d.rglob("*")) if ".partial-" in p.name]
        assert export_temp_dirs() <= exports_before
        assert not processes_mentioning(str(d)) and not processes_mentioning(str(world))
        if case.marker:
            assert not (d / "PWNED").exists(), "the pickle payload ran"
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], capture_output=True)


# --- what works after a refusal, and what the rules allow -------------------------------------------------------


def test_failed_start_does_not_block_its_fix(world, tmp_path):
    out = tmp_path / "out"
    r = spinquant(*cal_args(world, world / "model", out, "--no-pte") + ["--seqlen", "4096"])
    assert r.returncode == 2 and "--seqlen 256 or less" in r.stderr and not out.exists()
    r = spinquant(*cal_args(world, world / "model", out, "--no-pte"))
    assert r.returncode == 0, r.stderr
    assert (out / "report.json").is_file()
    assert json.loads((out / "spinquant_output.json").read_text())["calibrate"]["seqlen"] == 64
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    want = {p.name: (0o777 if p.is_dir() else 0o666) & ~mask for p in out.iterdir()}  # learned/ when the start was kept
    assert modes == want  # reports, checkpoint, state: the umask's mode, not 0600


def test_same_quantize_again_replaces_identical_run_and_overwrite_replaces_other(world, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "--model", world / "model", "--out", out, *RTN]
    assert spinquant(*args).returncode == 0
    first = (out / "quantized.safetensors").read_bytes()
    assert spinquant(*args).returncode == 0  # the same command and options: re-made in place
    assert (out / "quantized.safetensors").read_bytes() == first
    r = spinquant(*args, "--seed", "3")
    assert r.returncode == 2 and "other options (seed)" in r.stderr
    assert (out / "quantized.safetensors").read_bytes() == first
    r = spinquant(*args, "--seed", "3", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "quantized.safetensors").read_bytes() != first
    # files are published under the umask like any other tool's, not 0600
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_export_into_its_own_run_then_reexport_with_other_options_needs_overwrite(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run-a", run)
    ckpt = (run / "consolidated.00.pth").read_bytes()
    r = spinquant("export", "--from", run, "--no-pte")  # same options as its export: re-made
    assert r.returncode == 0, r.stderr
    assert (run / "consolidated.00.pth").read_bytes() == ckpt
    r = spinquant("export", "--from", run, "--no-pte", "--max-seq-len", "128")
    assert r.returncode == 2 and "other options (max_seq_len)" in r.stderr
    r = spinquant("export", "--from", run, "--no-pte", "--max-seq-len", "128", "--overwrite")
    assert r.returncode == 0, r.stderr
    owner = json.loads((run / "spinquant_output.json").read_text())
    assert owner["export"]["max_seq_len"] == 128 and "quantize" in owner
    assert (run / "quantized.safetensors").read_bytes() == (world / "run-a" / "quantized.safetensors").read_bytes()


def test_pte_asked_for_when_resuming_a_no_pte_run_is_made(world, tmp_path):
    run = tmp_path / "cal"
    shutil.copytree(world / "cal", run)
    r = spinquant(*cal_args(world, world / "model", run, "--pte"))
    assert r.returncode == 0, r.stderr
    assert "export and report stages run again" in r.stderr and "stage learn: done, skipped" in r.stderr
    v = json.loads((run / "verification.json").read_text())
    assert v["verified"] and (run / "model.pte").is_file()
    assert json.loads((run / "report.json").read_text())["export"]["verified"]


def test_calibrate_overwrite_never_touches_inputs_and_replaces_a_user_folder(world, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    r = spinquant(*cal_args(world, world / "model", folder, "--no-pte", "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert not (folder / "old.txt").exists() and (folder / "report.json").is_file()


def test_batch_paths_resolve_beside_the_yaml(world, tmp_path):
    jobs_dir = tmp_path / "project"
    jobs_dir.mkdir()
    shutil.copytree(world / "model", jobs_dir / "ft" / "a")
    shutil.copytree(world / "model", jobs_dir / "ft" / "b")
    shutil.copy(world / "corpus.txt", jobs_dir / "data.txt")
    (jobs_dir / "jobs.yaml").write_text(yaml.safe_dump({
        "defaults": {"calib_data": "data.txt", "eval_data": "data.txt", "pte": False, "steps": 1, "batch_size": 1, "seqlen": 32,
                     "gptq_nsamples": 2, "eval_windows": 1},
        "jobs": [{"model": "ft/a", "out": "runs/a"}, {"model": "ft/b"}]}))  # no out: runs/b beside the YAML
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = spinquant("batch", jobs_dir / "jobs.yaml", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (jobs_dir / "runs" / "a" / "report.json").is_file() and (jobs_dir / "runs" / "b" / "report.json").is_file()
    rows = json.loads((jobs_dir / "jobs.summary.json").read_text())
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert not list(elsewhere.iterdir())
    r = spinquant("batch", jobs_dir / "jobs.yaml", cwd=jobs_dir)  # from another folder: the same jobs, all finished
    assert r.returncode == 0, r.stderr
    assert [row["status"] for row in json.loads((jobs_dir / "jobs.summary.json").read_text())] == ["skipped (finished)"] * 2


def test_every_calibrate_option_is_described_and_batch_help_shows_the_format():
    """calibrate shows the everyday options only (at most 15 with --help), each described; the rest are recipe keys."""
    r = CliRunner().invoke(cli, ["calibrate", "--help"], terminal_width=200)
    options = [l for l in r.output.splitlines() if l.lstrip().startswith("-")]
    undocumented = [l.split()[0] for l in options if len(l.split("  ")) < 2 or not l.strip().split("  ", 1)[-1].strip()]
    assert 10 <= len(options) <= 15 and not undocumented, (len(options), undocumented)
    for flag in ("--recipe", "--set", "--pte", "--gptq-nsamples", "--steps", "--seqlen", "--seed", "--overwrite", "--target",
                 "--calib-data", "--eval-data", "--rotations"):
        line = next(l for l in options if flag in l.split()[0] or f" {flag}" in l)
        assert len(line.split()) > 2, line
    r = CliRunner().invoke(cli, ["batch", "--help"])
    assert "models_glob" in r.output and "defaults:" in r.output and "resolve against the YAML" in r.output


# --- signals: the exporter's process group, partial files, resume -------------------------------------------------


def test_sigterm_during_export_kills_the_exporter_and_leaves_no_partial_files(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run-a", run)
    before = tree_digest(run)
    exports_before = export_temp_dirs()
    proc = subprocess.Popen([sys.executable, "-m", "spinquant", "export", "--from", str(run), "--overwrite"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: exporters_of(proc.pid), 180, "executorch's export_llama to start")
    exporters = exporters_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: terminated")
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and b"export_llama" in Path(f"/proc/{pid}/cmdline").read_bytes()
                             for pid in exporters), 10, "the exporter to die")
    assert tree_digest(run) == before and not [p for p in run.iterdir() if ".partial-" in p.name]
    assert export_temp_dirs() <= exports_before


def test_sigkill_during_learning_resumes_from_the_saved_state(world, tmp_path):
    out = tmp_path / "rot"
    args = [sys.executable, "-m", "spinquant", *map(str, learn_args(world, out)[:-4]), "--steps", "40", "--batch-size", "1",
            "--seqlen", "32", "--save-every", "1"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (out / "learn_state.pt").is_file(), 120, "the first saved learning state")
    proc.kill()
    proc.wait()
    assert not (out / "R.bin").exists()
    (out / ".learn_state.pt.partial-killed").write_bytes(b"half")  # as if the kill had hit a state write
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in r.stdout and "resumed from step 0" not in r.stdout, r.stdout
    assert (out / "R.bin").is_file() and not [p for p in out.iterdir() if ".partial-" in p.name]


def test_the_exporter_child_ticks_while_it_runs_and_loses_no_output(monkeypatch):
    import spinquant.pte as pte

    monkeypatch.setattr(pte, "TICK_SECONDS", 0.05)
    ticks = []
    proc = pte.run_child([sys.executable, "-c", "import time; print('a'); time.sleep(0.4); print('b')"], Path("."),
                         tick=lambda: ticks.append(1))
    assert proc.returncode == 0 and proc.stdout.split() == ["a", "b"] and len(ticks) >= 3


def test_a_killed_spinquant_takes_its_exporter_child_with_it():
    """SIGKILL (or the OOM killer) reaches no handler of ours: the kernel must end the exporter's process group leader."""
    code = "from pathlib import Path; from spinquant.pte import run_child; run_child(['sleep', '300'], Path('.'))"
    parent = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    wait_for(lambda: children.read_text().split(), 60, "the child")
    child = int(children.read_text().split()[0])
    parent.kill()
    parent.wait()
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2], 10,
             "the child to die with its parent")
