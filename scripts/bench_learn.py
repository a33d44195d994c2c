#!/usr/bin/env python
"""Speed and memory of rotation learning: steps/s, tokens/s, peak memory.

CPU: the reference model in ../shared. GPU (when present): also a Llama-3.2-1B-shaped model with
random weights built from its config (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate
8192, vocab 128256, tied). The goal there: 100 steps x 8 x 2048 tokens in under 4 minutes and under
40 GB on one H100. Writes benchmarks/results/bench_learn_<device>.{json,md}.

    python scripts/bench_learn.py --steps 3            # CPU, reference model, Meta's 8 x 2048 batch
    python scripts/bench_learn.py --llama-1b --steps 10 # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from spinquant.formats import load_model
from spinquant.formats.hf import untie_embeddings
from spinquant.experimental.learning import ResearchLearner
from spinquant.rotation import LearnConfig, RotationLearner, prepare_model
from _common import SHARED, result_path


def llama_1b_shaped() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                      vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072, head_dim=64,
                      rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    return untie_embeddings(LlamaForCausalLM(cfg).eval())


def bench(name: str, model, device: torch.device, args) -> dict:
    windows = torch.randint(0, model.config.vocab_size, (args.steps * args.batch_size, args.seqlen), generator=torch.Generator().manual_seed(0))
    cfg = LearnConfig(steps=args.steps, batch_size=args.batch_size, micro_batch=args.micro_batch, w_bits=args.w_bits,
                      grad_checkpoint=not args.no_checkpoint)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    learner_class = ResearchLearner if args.w_bits < 16 else RotationLearner  # int4 weights in the loop: research
    learner = learner_class(prepare_model(model, cfg), windows, cfg, device, progress=False)
    learner.train_step()  # warm-up (allocator, kernels), not timed
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps - 1):
        learner.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    steps = args.steps - 1
    row = {"model": name, "device": str(device), "steps_timed": steps, "batch": args.batch_size, "micro_batch": args.micro_batch,
           "seqlen": args.seqlen, "w_bits": args.w_bits, "s_per_step": dt / steps, "steps_per_s": steps / dt,
           "tokens_per_s": steps * args.batch_size * args.seqlen / dt,
           "projected_100_steps_min": 100 * dt / steps / 60,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--w-bits", type=int, default=16)
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--llama-1b", action="store_true", help="also the Llama-3.2-1B-shaped model (needs a GPU)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    rows = [bench("ref-llama-25m", load_model(SHARED / "models/ref-llama-25m"), device, args)]
    if args.llama_1b:
        rows.append(bench("llama-3.2-1b-shaped (random)", llama_1b_shaped(), device, args))
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU") + \
              f", {os.cpu_count()} cores, torch {torch.__version__}"
    command = "python " + " ".join(sys.argv)
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"bench_learn_{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    lines = [f"Command: `{command}`  ", f"Machine: {machine}", "",
             "| model | device | batch x seqlen (micro) | s/step | tokens/s | 100 steps (min, projected) | peak memory (GiB) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        mem = r["peak_gpu_gib"] if r["peak_gpu_gib"] is not None else r["peak_rss_gib"]
        kind = "GPU" if r["peak_gpu_gib"] is not None else "RSS"
        lines.append(f"| {r['model']} | {r['device']} | {r['batch']} x {r['seqlen']} ({r['micro_batch']}) | {r['s_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['projected_100_steps_min']:.1f} | {mem:.2f} ({kind}) |")
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
