#!/usr/bin/env python
"""Where the memory peaks: run ``python -m spinquant ARGS`` in this process with a sampler thread (every 0.05 s) that
records the resident set size and the main thread's stack; at exit it prints the peak with its stack and, for each
distinct innermost spinquant frames (the last four), the highest RSS seen there.

    python research/peak_trace.py quantize --model /tmp/scale/llama-3.2-1b-random --out /tmp/trace1b \\
        --rotations hadamard --method rtn --tune-scales-steps 2 --calib-data ../shared/data/wikitext-2-raw/wiki.valid.raw \\
        --seqlen 512 --device cpu

A diagnostic (benchmarks/RESULTS.md table 15), not a benchmark: the sampling thread costs a little time.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import threading
import time
import traceback

import psutil

PROCESS = psutil.Process()
MAIN = threading.main_thread().ident
peak = {"rss": 0, "stack": ""}
by_site: dict[str, int] = {}


def _site(frame) -> tuple[str, str]:
    stack = traceback.extract_stack(frame)
    ours = [f for f in stack if "/spinquant/" in f.filename][-4:]
    key = " <- ".join(f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}" for f in reversed(ours))
    return key, "".join(traceback.format_list(stack[-14:]))


def _sample() -> None:
    while True:
        rss = PROCESS.memory_info().rss
        frame = sys._current_frames().get(MAIN)
        if frame is not None:
            key, full = _site(frame)
            by_site[key] = max(by_site.get(key, 0), rss)
            if rss > peak["rss"]:
                peak.update(rss=rss, stack=full)
        time.sleep(0.05)


def _report() -> None:
    print(f"\n=== PEAK {peak['rss'] / 2**30:.2f} GiB ===\n{peak['stack']}", file=sys.stderr)
    for key, rss in sorted(by_site.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{rss / 2**30:6.2f} GiB  {key}", file=sys.stderr)


if __name__ == "__main__":
    threading.Thread(target=_sample, daemon=True).start()
    atexit.register(_report)
    sys.argv = ["spinquant", *sys.argv[1:]]
    runpy.run_module("spinquant", run_name="__main__")
