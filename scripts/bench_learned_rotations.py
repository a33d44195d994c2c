#!/usr/bin/env python
"""Do learned rotations beat the random Hadamard they start from? (after GPTQ+clip, both schemes)

For Meta's 8da4w scheme and for W4A4KV4: learn R1/R2 from the seeded random Hadamard on the
calibration text, then GPTQ (+range setting) with the learned rotations and with the random
Hadamard start; report WikiText-2 test PPL, KL(float || quantized) and top-1 agreement on the same
windows, the loss curves, and the times. Writes benchmarks/results/learned_rotations_v2.{md,json}
(or --out) and the learning curves as PNG beside them.

    python scripts/bench_learned_rotations.py --variants 8da4w:4:kl:gptq,w4a4kv4:16:kl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path
from statistics import mean

import torch

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import cached_logits_fn, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.fusion import Rotations
from spinquant.formats.rbin import load_rbin, save_rbin
from spinquant.formats import load_model, load_tokenizer
from spinquant.pipeline import rotations_file
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W, W4A4KV4
from spinquant.experimental.learning import ResearchLearner, initial_scales
from spinquant.experimental.smoothing import smooth_scales
from spinquant.rotation import LearnConfig, plot_learning_curve, prepare_model
from _common import SHARED, quantized_copy, result_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"))
    ap.add_argument("--test-data", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--learn-seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5)
    ap.add_argument("--max-angle", type=float, default=None, help="cap on one Cayley step's rotation, radians (LearnConfig.max_angle)")
    ap.add_argument("--scales", action="store_true", help="also learn channel scales jointly with R1/R2 (LearnConfig.scales, "
                    "fusion.ChannelScales)")
    ap.add_argument("--scale-lr", type=float, default=0.01, help="Adam's lr on the log-scales")
    ap.add_argument("--scale-init", type=float, default=None, help="start the scales at SmoothQuant's of this alpha "
                    "(LearnConfig.scale_init)")
    ap.add_argument("--smooth-baseline", type=float, default=None, metavar="ALPHA", help="also evaluate the random Hadamard "
                    "of --seed with SmoothQuant's channel scales of this alpha (smoothing.py) and no learning")
    ap.add_argument("--gptq-nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024, help="evaluation window length (and GPTQ's unless --gptq-seqlen)")
    ap.add_argument("--gptq-seqlen", type=int, default=None,
                    help="GPTQ's calibration window length when it differs from --seqlen (calibrate's default: 2048)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="8da4w:16,8da4w:4,w4a4kv4:16",
                    help="target:learning-weight-bits[:loss[:weight-quant]] (16 = Meta's W16 learning, 4 = learn against int4 "
                         "weights; loss ce (default) or kl = distillation from the float model; weight-quant rtn (default) or "
                         "gptq = GPTQ of the current rotation in the loop)")
    ap.add_argument("--hadamard-seeds", default="", help="Comma list of further random-Hadamard seeds to evaluate per target "
                    "(the spread a learned rotation must beat); a variant 'TARGET:none' evaluates only those.")
    ap.add_argument("--no-baseline", action="store_true", help="Skip the random Hadamard row of --seed (already measured: same seed, same numbers).")
    ap.add_argument("--no-r4", action="store_true", help="R1/R2 only, no online R4 before down_proj, in learning and "
                    "quantization (what a .pte holds when the intermediate size is not a power of two, e.g. SmolLM2)")
    ap.add_argument("--gptq-objective", choices=["layer", "float"], default="layer", help="GPTQ's objective for every row: "
                    "the layer's own output (plain) or the float model's (WeightQuantConfig.float_target)")
    ap.add_argument("--percdamp", type=float, default=0.01, help="GPTQ's Hessian damping (WeightQuantConfig.percdamp)")
    ap.add_argument("--target-damp", type=float, default=WeightQuantConfig.target_percdamp,
                    help="The float objective's ridge damping (WeightQuantConfig.target_percdamp)")
    ap.add_argument("--scale-refit", action="store_true", help="after GPTQ, refit each row's group scales to its integers "
                    "by least squares (WeightQuantConfig.scale_refit) in every GPTQ row")
    ap.add_argument("--save-rotations", default=None, metavar="DIR",
                    help="Write each learned rotation (and its channel scales) to DIR/TARGET/R.bin, for --load-rotations")
    ap.add_argument("--load-rotations", default=None, metavar="PATH",
                    help="Also evaluate the rotations in PATH (an R.bin, or a directory holding one) for each target, "
                         "without learning them again")
    ap.add_argument("--rtn", action="store_true", help="Also evaluate every rotation with RTN + range setting (no GPTQ).")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks/results/learned_rotations_v2"))
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    eval_windows = evaluation_windows(evaluation_ids(tok, args.test_data), args.seqlen, args.windows)
    gptq_windows = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=args.gptq_nsamples,
                                                      seqlen=args.gptq_seqlen or args.seqlen, seed=args.seed), tok)
    learn_windows = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=args.steps * args.batch_size,
                                                       seqlen=args.learn_seqlen, seed=args.seed + 1), tok)
    reference = cached_logits_fn(hf_logits_fn(base))
    schemes = {"8da4w": META_8DA4W, "w4a4kv4": W4A4KV4}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}

    def quantized_eval(rot, scheme, method):
        wq = WeightQuantConfig(method=method, clip_search=True, float_target=method == "gptq" and args.gptq_objective == "float",
                               percdamp=args.percdamp, target_percdamp=args.target_damp,
                               scale_refit=method == "gptq" and args.scale_refit, compare_rtn=args.scale_refit)
        model = quantized_copy(base, rot, scheme, wq, gptq_windows, device)
        return evaluate(hf_logits_fn(model.to("cpu")), eval_windows, reference, progress=False), wq.stats

    def gptq_eval(name, rot, scheme, extra):
        r, stats = quantized_eval(rot, scheme, "gptq")
        row = {"setting": name, "ppl": r.ppl, "kl": r.kl, "top1": r.top1, "gptq_s": stats["quantize_seconds"], **extra}
        errors = stats.get("output_error", {})
        if args.scale_refit and errors:  # calibration output error summed over the linears, after / before the refit
            row["refit_error_ratio"] = (sum(e["gptq"] for e in errors.values())
                                        / sum(e["gptq_before_refit"] for e in errors.values()))
        if args.rtn:
            r_rtn, _ = quantized_eval(rot, scheme, "rtn")
            row.update(rtn_ppl=r_rtn.ppl, rtn_kl=r_rtn.kl, rtn_top1=r_rtn.top1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    done_hadamard = set()
    for variant in args.variants.split(","):
        target, wbits, *rest = variant.split(":")
        loss = rest[0] if rest else "ce"
        weight_quant = rest[1] if len(rest) > 1 else "rtn"
        scheme = schemes[target]
        if target not in done_hadamard:
            if not args.no_baseline:
                gptq_eval(f"{target} random Hadamard + GPTQ", Rotations.random_hadamard(base, args.seed, r4=not args.no_r4), scheme, {"target": target})
            if args.smooth_baseline is not None:
                rot = Rotations.random_hadamard(base, args.seed, r4=not args.no_r4)
                rot.scales = smooth_scales(base, rot, learn_windows[:8], alpha=args.smooth_baseline)
                gptq_eval(f"{target} random Hadamard + SmoothQuant scales (alpha {args.smooth_baseline}) + GPTQ", rot, scheme,
                          {"target": target, "smooth_alpha": args.smooth_baseline})
            if args.load_rotations is not None:
                gptq_eval(f"{target} rotations from {args.load_rotations} + GPTQ", load_rbin(rotations_file(args.load_rotations),
                          r4=not args.no_r4), scheme, {"target": target, "rotations": args.load_rotations})
            for extra_seed in [int(x) for x in args.hadamard_seeds.split(",") if x]:
                gptq_eval(f"{target} random Hadamard (seed {extra_seed}) + GPTQ", Rotations.random_hadamard(base, extra_seed, r4=not args.no_r4), scheme,
                          {"target": target, "hadamard_seed": extra_seed})
            done_hadamard.add(target)
        if wbits == "none":
            continue
        a_bits, kv_bits = (4, 4) if target == "w4a4kv4" else (8, 16)
        cfg = LearnConfig(steps=args.steps, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr, w_bits=int(wbits),
                          group_size=scheme.group, a_bits=a_bits, kv_bits=kv_bits, seed=args.seed, grad_checkpoint=device.type == "cuda",
                          loss=loss, weight_quant=weight_quant, r4=not args.no_r4, max_angle=args.max_angle,
                          scales=args.scales, scale_lr=args.scale_lr, scale_init=args.scale_init)
        learner = ResearchLearner(prepare_model(copy.deepcopy(base), cfg), learn_windows, cfg, device, progress=False,
                                  teacher=copy.deepcopy(base) if loss == "kl" else None,
                                  initial_scales=initial_scales(base, cfg, learn_windows))
        learner.run()
        label = (f"W{wbits}A{a_bits}KV{kv_bits}" + (", GPTQ in the loop" if weight_quant == "gptq" else "")
                 + (", KL loss" if loss == "kl" else ", CE loss")
                 + (f", step <= {args.max_angle} rad" if args.max_angle is not None else "")
                 + (f", + channel scales (Adam lr {args.scale_lr}" + (f", SmoothQuant start alpha {args.scale_init})"
                                                                        if args.scale_init is not None else ")") if args.scales else ""))
        curves[f"{target} learned at {label}"] = learner.losses
        stem = (f"learning_curve_{target}_W{wbits}A{a_bits}KV{kv_bits}_{loss}" + ("_gptq" if weight_quant == "gptq" else "")
                + ("_scales" if args.scales else ""))
        plot_learning_curve(learner.losses, out.parent / f"{stem}_{out.name}.png", f"{target}: learning at {label}", loss=loss)
        if args.save_rotations is not None:
            (Path(args.save_rotations) / target).mkdir(parents=True, exist_ok=True)
            save_rbin(learner.rotations(), Path(args.save_rotations) / target / "R.bin")
        gptq_eval(f"{target} learned ({label}) + GPTQ", learner.rotations(), scheme,
                  {"target": target, "learn_s": learner.seconds, "learn_steps_per_s": learner.step / learner.seconds,
                   "loss_first10": mean(learner.losses[:10]), "loss_last10": mean(learner.losses[-10:]),
                   "step_angles": learner.angles})

    machine = f"{platform.node()} ({os.cpu_count()} CPU cores, torch {torch.__version__}, {device})"
    command = "python " + " ".join(sys.argv)
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args), "rows": rows,
                                                    "losses": curves}, indent=2))
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Learning: {args.steps} steps x {args.batch_size} windows x {args.learn_seqlen} tokens of {Path(args.calib_data).name} "
             f"(seed {args.seed + 1}), lr {args.lr} cosine. GPTQ+clip ({args.gptq_objective} objective"
             f"{f', damp {args.percdamp}' if args.percdamp != 0.01 else ''}{f', objective damp {args.target_damp}' if args.gptq_objective == 'float' else ''}{', scale refit' if args.scale_refit else ''}): {args.gptq_nsamples} x {args.gptq_seqlen or args.seqlen} tokens. Evaluation: first "
             f"{eval_windows.shape[0]} windows of {args.seqlen} tokens of WikiText-2 test; KL(float32 || model), nats/token.", "",
             "| setting | PPL | KL | top-1 | RTN+clip KL (no GPTQ) | learn time (s) | loss first 10 -> last 10 steps |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        learn = f"{r['learn_s']:.0f}" if "learn_s" in r else "-"
        loss = f"{r['loss_first10']:.4f} -> {r['loss_last10']:.4f}" if "loss_first10" in r else "-"
        rtn = f"{r['rtn_kl']:.5f}" if "rtn_kl" in r else "-"
        lines.append(f"| {r['setting']} | {r['ppl']:.2f} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {rtn} | {learn} | {loss} |")
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
