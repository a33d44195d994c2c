#!/usr/bin/env python
"""Does each step of the default quantizer hold off the calibration text? (issue: quality off WikiText)

Per seed S (the random Hadamard R1/R2 of seed S and the calibration sample of seed S), at Meta's 8da4w scheme with
R4 as the deployed model has it (off when ExecuTorch cannot run it: intermediate size not a power of two), the
quantizer's steps one after another, each on the same calibration tokens (WikiText-2 validation, never a text it is
evaluated on):

    plain GPTQ (+ range setting)  ->  + float objective (damp 0.1)  ->  + scale refit  ->  + scale tuning

each evaluated against the float model on two texts: WikiText-2 test (the calibration text's source and style) and
books (three public-domain novels: another domain). Windows are spread evenly over each text (every k-th window of
``--eval-seqlen`` tokens), so that all three books are seen. KL(float || quantized) in nats/token, perplexity and
top-1 agreement on the same windows. With ``--learned-steps N`` the last row is repeated on R1/R2 learned from that
seed's Hadamard (calibrate's default learning: W16A8, cross-entropy, step cap 0.05) on other windows of the
calibration text. ``--only refit,tuning,block,tuning`` compares the blockwise scale tuning (each decoder layer's scales tuned
right after GPTQ on that layer's output error against the float stream, experimental/block_tuning.py) with the
end-to-end one, and both together.

    python scripts/bench_transfer.py --model SMOLLM2 --seeds 0,1,2 --out benchmarks/results/transfer_smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import cached_logits_fn, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.experimental.block_tuning import BlockTuner
from spinquant.formats import load_model, load_tokenizer
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.pipeline import tuning_calibration
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales
from spinquant.quant.scheme import DEFAULT_TUNE_LR, META_8DA4W
from spinquant.recipes import DEFAULTS
from spinquant.rotation import LearnConfig, main_learner
from spinquant.targets import DEFAULT_TARGET, get_target
from spinquant.workflow import resolve_r4
from _common import SHARED, result_path


def spread_windows(ids: torch.Tensor, seqlen: int, n: int) -> torch.Tensor:
    """(n, seqlen): every k-th of the text's evaluation windows (evaluation_windows), k = total // n (first at 0)."""
    all_windows = evaluation_windows(ids, seqlen)
    if all_windows.shape[0] < n:
        raise SystemExit(f"the text has {all_windows.shape[0]} windows of {seqlen} tokens, fewer than {n}")
    return all_windows[torch.arange(n) * (all_windows.shape[0] // n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--texts", default=f"wikitext2-test={SHARED / 'data/wikitext-2-raw/wiki.test.raw'},"
                                       f"books={SHARED / 'data/books/books.txt'}", help="comma list of NAME=PATH")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length (GPTQ, tuning, learning)")
    ap.add_argument("--gptq-nsamples", type=int, default=32)
    ap.add_argument("--tune-steps", type=int, default=128, help="scale-tuning windows (one per step; 0: no tuning row)")
    ap.add_argument("--tune-lr", type=float, default=DEFAULT_TUNE_LR)
    ap.add_argument("--target-damp", type=float, default=DEFAULTS["gptq_objective_damp"])
    ap.add_argument("--block-steps", type=int, default=32, help="blockwise tuning: windows per decoder layer (step 'block')")
    ap.add_argument("--block-lr", type=float, default=1e-3, help="blockwise tuning: Adam's learning rate on the log-scales")
    ap.add_argument("--learned-steps", type=int, default=0, help="also learn R1/R2 (batch 4) and repeat the last rows")
    ap.add_argument("--no-hadamard-rows", action="store_true", help="with --learned-steps: the learned rows only")
    ap.add_argument("--only", default=None, help="comma list of the steps to run: plain, float, refit, block (refit + "
                    "blockwise tuning, experimental/block_tuning.py), tuning (end-to-end, on the step before it) "
                    "[default: plain, float, refit, tuning]")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per text")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks/results/transfer"))
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    r4 = resolve_r4("auto", base.config.intermediate_size, get_target(DEFAULT_TARGET), pte=True)[0] == "on"  # as calibrate
    texts = dict(item.split("=", 1) for item in args.texts.split(","))
    windows = {name: spread_windows(evaluation_ids(tok, path), args.eval_seqlen, args.windows) for name, path in texts.items()}
    t = time.perf_counter()
    reference = cached_logits_fn(hf_logits_fn(base))
    rows: list[dict] = []
    for name, w in windows.items():  # the float model's own numbers (and its logits cached for every later row)
        r = evaluate(reference, w, progress=False)
        rows.append({"seed": None, "setting": "float", "text": name, "ppl": r.ppl, "kl": 0.0, "top1": 1.0})
    print(f"float reference on {len(windows)} texts in {time.perf_counter() - t:.0f} s", flush=True)

    def record(seed: int, setting: str, model, seconds: float) -> None:
        for name, w in windows.items():
            r = evaluate(hf_logits_fn(model), w, reference, progress=False)
            row = {"seed": seed, "setting": setting, "text": name, "ppl": r.ppl, "kl": r.kl, "top1": r.top1, "seconds": seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def quantizer_rows(seed: int, rot: Rotations, label: str, steps: tuple[str, ...]) -> None:
        calib_set = CalibrationSet(source=args.calib_data, nsamples=args.gptq_nsamples, seqlen=args.seqlen, seed=seed)
        calib = calibration_windows(calib_set, tok)
        rotated = copy.deepcopy(base)
        fuse_and_rotate(rotated, rot)
        configs = {"plain GPTQ": WeightQuantConfig(method="gptq"),
                   "+ float objective": WeightQuantConfig(method="gptq", float_target=True, target_percdamp=args.target_damp),
                   "+ scale refit": WeightQuantConfig(method="gptq", float_target=True, target_percdamp=args.target_damp,
                                                      scale_refit=True)}
        configs["+ blockwise tuning"] = replace(configs["+ scale refit"], stats={})
        model, seconds, previous = None, 0.0, None
        for name in steps:
            if name == "+ scale tuning":
                tuning = ScaleTuningConfig(steps=args.tune_steps, lr=args.tune_lr)
                tune_windows = calibration_windows(tuning_calibration(calib_set, tuning), tok)
                t = time.perf_counter()
                tune_scales(model, base, tune_windows, tuning, progress=False)
                after = "+ blockwise + scale tuning" if previous == "+ blockwise tuning" else name
                record(seed, label + after, model, seconds + time.perf_counter() - t)
                continue
            previous = name
            tuner = BlockTuner(steps=args.block_steps, lr=args.block_lr) if name == "+ blockwise tuning" else None
            t = time.perf_counter()
            model = quantize_model(copy.deepcopy(rotated), META_8DA4W, configs[name], calib, progress=False,
                                   after_layer=tuner)
            seconds = time.perf_counter() - t
            if tuner is not None:
                print(json.dumps({"seed": seed, "blockwise": {i: {k: round(v, 5) for k, v in st.items()}
                                                              for i, st in tuner.stats.items()}}), flush=True)
            record(seed, label + name, model, seconds)

    def write() -> None:
        machine = (f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__})")
        command = "python " + " ".join(sys.argv)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args),
                                                         "r4": r4, "rows": rows}, indent=2))
        names = list(windows)
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["seed"] is not None))
        seeds = list(dict.fromkeys(r["seed"] for r in rows if r["seed"] is not None))

        def cell(setting: str, text: str, key: str, fmt: str) -> str:
            vals = [next((r[key] for r in rows if r["seed"] == s and r["setting"] == setting and r["text"] == text), None)
                    for s in seeds]
            return " / ".join("–" if v is None else format(100 * v if key == "top1" else v, fmt) for v in vals)

        float_ppl = {r["text"]: r["ppl"] for r in rows if r["seed"] is None}
        lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
                 f"8da4w (Meta's), R4 {'on' if r4 else 'off (ExecuTorch cannot run it at this intermediate size)'}; calibration "
                 f"{Path(args.calib_data).name}, GPTQ {args.gptq_nsamples} x {args.seqlen} tokens (float objective damped "
                 f"{args.target_damp}), tuning {args.tune_steps} x "
                 f"{args.seqlen} (other windows), seeds {', '.join(map(str, seeds))} (cells: seed by seed); evaluation "
                 f"{args.windows} x {args.eval_seqlen} tokens spread over each text; float PPL "
                 + ", ".join(f"{n} {float_ppl[n]:.2f}" for n in names) + ".", "",
                 "| setting | " + " | ".join(f"KL {n}" for n in names) + " | " + " | ".join(f"PPL {n}" for n in names)
                 + " | " + " | ".join(f"top-1 {n}" for n in names) + " |",
                 "|---|" + "---:|" * (3 * len(names))]
        for s in settings:
            lines.append(f"| {s} | " + " | ".join(cell(s, n, "kl", ".4f") for n in names) + " | "
                         + " | ".join(cell(s, n, "ppl", ".2f") for n in names) + " | "
                         + " | ".join(cell(s, n, "top1", ".1f") for n in names) + " |")
        result_path(out, ".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))

    steps = ("plain GPTQ", "+ float objective", "+ scale refit") + (("+ scale tuning",) if args.tune_steps else ())
    if args.only:
        short = dict(zip(("plain", "float", "refit", "tuning", "block"), ("plain GPTQ", "+ float objective", "+ scale refit",
                                                                          "+ scale tuning", "+ blockwise tuning")))
        steps = tuple(short[k] for k in args.only.split(","))
    for seed in (int(s) for s in args.seeds.split(",")):
        if not args.no_hadamard_rows:
            quantizer_rows(seed, Rotations.random_hadamard(base, seed, r4=r4), "Hadamard, ", steps)
        if args.learned_steps:
            cfg = LearnConfig(steps=args.learned_steps, batch_size=4, seed=seed, r4=r4, max_angle=DEFAULTS["max_angle"])
            learn_set = CalibrationSet(source=args.calib_data, nsamples=args.learned_steps * 4, seqlen=args.seqlen,
                                       seed=seed + 100)  # other windows than GPTQ's and the tuning's
            learner = main_learner(copy.deepcopy(base), calibration_windows(learn_set, tok), cfg, torch.device("cpu"),
                                   progress=False)
            t = time.perf_counter()
            learner.run()
            print(f"seed {seed}: learned {args.learned_steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
            quantizer_rows(seed, learner.rotations(), "learned, ", tuple(s for s in steps if s in ("+ scale refit", "+ scale tuning")))
        write()


if __name__ == "__main__":
    main()
