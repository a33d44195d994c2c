#!/usr/bin/env python
"""Quality table of the quantization core on a model (default: the reference model in ../shared).

Rows: float32, bf16; for Meta's 8da4w scheme and for W4A4KV4, each of RTN, RTN+clip and GPTQ+clip,
without rotation and after a random Hadamard R1/R2/R4 (R3 too under KV4). Columns: WikiText-2 test
perplexity, KL(float || quantized) in nats/token and top-1 agreement on the same windows, and the
wall time of each quantization. Writes benchmarks/results/quant_table.{md,json}.

    python scripts/bench_quant_table.py --windows 40 --nsamples 64
    python scripts/bench_quant_table.py --model /work/models/smollm2-135m --windows 16 --nsamples 32 \
        --rotations none,hadamard,hadamard-no-r4 --out benchmarks/results/quant_table_smollm2

"hadamard-no-r4" rotates by R1/R2 only (down_proj inputs unrotated): what a model whose intermediate size is not a
power of two gets in a .pte (ExecuTorch's online Hadamard takes powers of two only; calibrate's --r4 auto).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import evaluate, hf_logits_fn
from spinquant.formats import load_tokenizer
from spinquant.pipeline import resolve_rotations, tuning_calibration
from spinquant.fusion import Rotations
from spinquant.quant.apply import WeightQuantConfig
from spinquant.experimental.norm_tuning import tune_scales_and_norms
from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales
from spinquant.quant.scheme import DEFAULT_TUNE_LR, FLOAT, META_8DA4W, W4A4KV4, QuantScheme
from _common import data_arguments, load_benchmark_data, quantized_copy, result_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_arguments(ap, windows=40)
    ap.add_argument("--nsamples", type=int, default=64, help="GPTQ calibration windows")
    ap.add_argument("--rotations", default="none,hadamard", help="comma list of none, hadamard, hadamard-no-r4, "
                    "rbin:PATH (an R.bin or a run/learning directory holding one, with its channel scales if any; R4 on)")
    ap.add_argument("--schemes", default="8da4w,w4a4kv4", help="comma list of 8da4w (Meta's), w4a4kv4, w4a16")
    ap.add_argument("--methods", default="rtn,rtn+clip,gptq+clip", help="comma list of rtn, rtn+clip, gptq+clip, gptq-float+clip "
                    "(GPTQ fitting the float model's outputs: WeightQuantConfig.float_target)")
    ap.add_argument("--percdamp", type=float, default=0.01, help="GPTQ's Hessian damping (WeightQuantConfig.percdamp)")
    ap.add_argument("--target-damp", type=float, default=WeightQuantConfig.target_percdamp,
                    help="The float target's ridge damping (WeightQuantConfig.target_percdamp; 0.01 before 2026-11-29)")
    ap.add_argument("--scale-refit", action="store_true", help="every GPTQ row refits its group scales to its integers by "
                    "least squares (WeightQuantConfig.scale_refit)")
    ap.add_argument("--tune-steps", type=int, default=0, help="after each quantization, also tune the scales end to end "
                    "(quant/scale_tuning.py) on this many windows of the calibration text sampled with seed + 1, and record "
                    "the row before and after")
    ap.add_argument("--tune-lr", type=float, default=DEFAULT_TUNE_LR, help="the scale tuning's Adam learning rate")
    ap.add_argument("--tune-norms", action="store_true", help="the scale tuning tunes the RMSNorm weights too "
                    "(spinquant.experimental.norm_tuning)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks/results/quant_table"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    base, windows, calib, reference = load_benchmark_data(args, args.nsamples)
    tune_windows = None
    if args.tune_steps:  # other windows than GPTQ's, drawn as calibrate's quantize stage draws them
        gptq_set = CalibrationSet(source=args.calib_data, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        tune_windows = calibration_windows(tuning_calibration(gptq_set, ScaleTuningConfig(steps=args.tune_steps)),
                                           load_tokenizer(args.model))
    rows = []

    def record(name, scheme, rotation, method, model, seconds):
        t = time.perf_counter()
        r = evaluate(hf_logits_fn(model), windows, reference, progress=False)
        row = {"setting": name, "scheme": scheme, "rotation": rotation, "method": method, "ppl": r.ppl, "kl": r.kl,
               "top1": r.top1, "quantize_s": seconds, "eval_s": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("float32", "-", "-", "-", base, 0.0)
    record("bf16", "-", "-", "-", copy.deepcopy(base).to(torch.bfloat16), 0.0)
    schemes = {"8da4w": ("8da4w (Meta)", META_8DA4W), "w4a4kv4": ("W4A4KV4", W4A4KV4),
               "w4a16": ("W4A16 (weight-only: the Vulkan target)", QuantScheme(a_bits=FLOAT, output_a_bits=FLOAT))}
    methods = {"rtn": ("rtn", False, False, "RTN"), "rtn+clip": ("rtn", True, False, "RTN+clip"),
               "gptq+clip": ("gptq", True, False, "GPTQ+clip"), "gptq-float+clip": ("gptq", True, True, "GPTQ float target+clip")}
    for scheme_name, scheme in (schemes[k] for k in args.schemes.split(",")):
        for rotation in args.rotations.split(","):
            for method, clip, float_target, label in (methods[k] for k in args.methods.split(",")):
                t = time.perf_counter()
                if rotation.startswith("rbin:"):
                    rot = resolve_rotations(rotation.removeprefix("rbin:"), base, args.seed, r4=True)
                else:
                    rot = None if rotation == "none" else Rotations.random_hadamard(base, args.seed, r4=rotation != "hadamard-no-r4")
                wq = WeightQuantConfig(method=method, clip_search=clip, float_target=float_target,
                                       percdamp=args.percdamp, target_percdamp=args.target_damp,
                                       scale_refit=args.scale_refit and method == "gptq")
                model = quantized_copy(base, rot, scheme, wq, calib)
                shown = label + (" + scale refit" if wq.scale_refit else "")
                seconds = time.perf_counter() - t
                record(f"{scheme_name} {shown}", scheme_name, rotation, shown, model, seconds)
                if args.tune_steps:
                    tuning = ScaleTuningConfig(steps=args.tune_steps, lr=args.tune_lr)
                    (tune_scales_and_norms if args.tune_norms else tune_scales)(model, base, tune_windows, tuning, progress=False)
                    shown += (f" + scales{' and norms' if args.tune_norms else ''} tuned ({args.tune_steps} steps, "
                              f"lr {args.tune_lr:g})")
                    record(f"{scheme_name} {shown}", scheme_name, rotation, shown, model, seconds + tuning.stats["seconds"])

    machine = f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{'cuda' if torch.cuda.is_available() else 'cpu'})"
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args), "rows": rows}, indent=2))
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Evaluation: WikiText-2 test, first {windows.shape[0]} windows of {args.seqlen} tokens ({windows.shape[0] * (args.seqlen - 1)} "
             f"predicted tokens); KL(float32 || model) in nats/token; GPTQ calibration: {args.nsamples} x {args.seqlen} tokens of "
             f"{Path(args.calib_data).name}"
             f"{f', damping {args.percdamp}' if args.percdamp != 0.01 else ''}"
             f"{f', float-target damping {args.target_damp}' if 'gptq-float' in args.methods else ''}"
             f"{f'; scale tuning on {args.tune_steps} other windows (seed {args.seed + 1}), one per step' if args.tune_steps else ''}"
             ".", "",
             "| scheme | rotation | method | PPL | KL | top-1 | quantize time (s) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme'] if r['scheme'] != '-' else r['setting']} | {r['rotation']} | {r['method']} | {r['ppl']:.2f} | "
                     f"{r['kl']:.4f} | {100 * r['top1']:.2f}% | {r['quantize_s']:.1f} |")
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
