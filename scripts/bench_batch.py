#!/usr/bin/env python
"""The same three batch jobs through the local runner and through Ray: wall time of `spinquant batch`.

Jobs (as in tests/test_batch_ray.py): two tiny random Llamas (2 layers, hidden 64) calibrated end to end with the
.pte built and verified, and one job whose model does not exist (fails in its checks). Each runner gets fresh run
directories. The Ray run starts a local Ray instance (all cores; --cpus-per-job CPUs per job); its time includes
that start. Writes benchmarks/results/batch_runners.{md,json}.

    python scripts/bench_batch.py [--cpus-per-job 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import CORPUS, make_tiny_model, make_tiny_tokenizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def make_world(root: Path) -> None:
    tok = make_tiny_tokenizer()
    for name in ("ft-a", "ft-b"):
        torch.manual_seed(0)
        model = make_tiny_model(vocab_size=len(tok))
        model.save_pretrained(root / "models" / name)
        tok.save_pretrained(root / "models" / name)
    (root / "corpus.txt").write_text(CORPUS)


def jobs_file(root: Path, runs: str) -> Path:
    doc = {"defaults": {"calib_data": "corpus.txt", "eval_data": "corpus.txt", "out_root": runs, "shared_root": ".",
                        "steps": 2, "batch_size": 2, "seqlen": 64, "gptq_nsamples": 4, "eval_windows": 2},
           "jobs": [{"models_glob": "models/*"}, {"model": "./models/missing", "out": "missing"}]}
    path = root / f"jobs-{runs}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def timed(cmd: list[str]) -> tuple[float, int, list[dict]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    summary = Path(cmd[4]).with_suffix("").as_posix() + ".summary.json"
    return seconds, proc.returncode, json.loads(Path(summary).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus-per-job", type=int, default=1)
    args = ap.parse_args()
    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_world(root)
        base = [sys.executable, "-m", "spinquant", "batch"]
        for runner, extra in (("local", []), ("ray (local instance)", ["--ray", "--cpus-per-job", str(args.cpus_per_job)])):
            name = "runs-local" if runner == "local" else "runs-ray"
            seconds, code, rows = timed([*base, str(jobs_file(root, name)), *extra])
            statuses = [r["status"] for r in rows]
            print(f"{runner}: {seconds:.1f} s, exit {code}, jobs {statuses}, job times {[round(r['seconds']) for r in rows]}")
            results.append({"runner": runner, "seconds": seconds, "exit": code, "statuses": statuses,
                            "job_seconds": [r["seconds"] for r in rows]})
    command = f"python scripts/bench_batch.py --cpus-per-job {args.cpus_per_job}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch_runners.json").write_text(json.dumps({"machine": machine, "command": command, "results": results}, indent=2))
    lines = ["# `spinquant batch`: local runner vs Ray, the same three jobs", "",
             f"Machine: {machine}. Command: `{command}`.", "",
             "Two tiny-model jobs calibrated end to end with the .pte built and verified, one failing job. "
             "Wall time of the whole command (Ray's includes starting a local instance).", "",
             "| runner | wall time (s) | exit | jobs | per-job time (s) |", "|---|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {r['runner']} | {r['seconds']:.1f} | {r['exit']} | {', '.join(r['statuses'])} | "
                     f"{', '.join(f'{s:.0f}' for s in r['job_seconds'])} |")
    (RESULTS / "batch_runners.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
