#!/usr/bin/env python
"""Which tensors carry the KL that is left *after* GPTQ? Quantize once, then give one kind back its float weights.

``diag_kl_breakdown.py`` splits round-to-nearest's KL, where each kind of tensor is quantized alone. GPTQ changes
that picture (it removes most of the weights' error, unevenly), so this script quantizes the whole model the way
calibrate does (random Hadamard R1/R2, GPTQ + range setting, float target by default), measures its KL to the float
model, and then, one kind at a time, puts that kind's float rotated weights back (or turns its activation
quantization off) and measures again. The drop is what that kind costs in the finished model.

Which float weights go back matters with the float target, where every linear is fitted to the float model's output
on the quantized inputs (W*, quant/apply.py), so later linears compensate for the earlier ones' errors: ``--restore
fitted`` (the default) puts back W*, the weights GPTQ rounded, and measures the rounding alone; ``--restore
original`` puts back the rotated float weights, undoing the compensation too (measured on SmolLM2 8da4w: putting
v_proj's, o_proj's or the output layer's original weights back *raises* the KL, as their W* compensated for errors
upstream).

    python scripts/diag_gptq_kl_breakdown.py --model /work/models/smollm2-135m --no-r4 \
        --out benchmarks/results/gptq_kl_breakdown_smollm2_8da4w
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch

from spinquant.evaluate import evaluate, hf_logits_fn
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.models import untie_embeddings
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.fake_quant import QuantLinear, quant_linears
from spinquant.quant.scheme import FLOAT, META_8DA4W
from _common import data_arguments, load_benchmark_data, result_path

KINDS = {"q_proj": ("q_proj",), "k_proj": ("k_proj",), "v_proj": ("v_proj",), "o_proj": ("o_proj",),
         "gate/up": ("gate_proj", "up_proj"), "down_proj": ("down_proj",), "output layer": ("lm_head",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_arguments(ap, windows=16)
    ap.add_argument("--gptq-nsamples", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--no-r4", action="store_true", help="R1/R2 only (a .pte of a model whose intermediate size is not a "
                    "power of two has no R4)")
    ap.add_argument("--gptq-target", choices=("float", "layer"), default="float")
    ap.add_argument("--restore", choices=("fitted", "original"), default="fitted",
                    help="the weights put back: those GPTQ rounded (W*) or the rotated float model's (see above)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks/results/gptq_kl_breakdown"))
    args = ap.parse_args()

    base, windows, calib, reference = load_benchmark_data(args, args.gptq_nsamples)
    rotated = untie_embeddings(copy.deepcopy(base))
    fuse_and_rotate(rotated, Rotations.random_hadamard(rotated, args.seed, r4=not args.no_r4))
    float_weights = {name: lin.weight.detach().clone() for name, lin in rotated.named_modules() if isinstance(lin, torch.nn.Linear)}
    wq = WeightQuantConfig(method="gptq", float_target=args.gptq_target == "float")
    if args.restore == "fitted":  # keep each linear's weight as GPTQ receives it, just before it becomes integers
        fix = QuantLinear.set_quantized

        def remember(self, q, scales):
            name = next(n for n, m in model.named_modules() if m is self)
            float_weights[name] = self.weight.detach().clone()
            fix(self, q, scales)

        QuantLinear.set_quantized = remember
    model = copy.deepcopy(rotated)
    quantized = quantize_model(model, META_8DA4W, wq, calib, progress=True)
    if args.restore == "fitted":
        QuantLinear.set_quantized = fix

    def kl(model) -> dict:
        r = evaluate(hf_logits_fn(model), windows, reference, progress=False)
        return {"kl": r.kl, "ppl": r.ppl, "top1": r.top1}

    def with_float_weights(suffixes: tuple[str, ...]):
        model = copy.deepcopy(quantized)
        for name, lin in quant_linears(model):
            if name.endswith(suffixes):
                lin.weight = torch.nn.Parameter(float_weights[name], requires_grad=False)
                lin.qweight, lin.scales, lin.weight_mode = None, None, "float"
        return model

    def without_activation_quant():
        model = copy.deepcopy(quantized)
        for _, lin in quant_linears(model):
            lin.a_bits = FLOAT
        return model

    rows = [("nothing (the quantized model)", kl(quantized))]
    print(json.dumps(rows[-1]), flush=True)
    for label, suffixes in KINDS.items():
        rows.append((f"{label} weights", kl(with_float_weights(suffixes))))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(("every block linear's weights", kl(with_float_weights(sum((v for k, v in KINDS.items() if k != "output layer"), ())))))
    rows.append(("every activation quantizer (int8 per token)", kl(without_activation_quant())))

    machine = f"{platform.node()} ({os.cpu_count()} CPU cores, torch {torch.__version__})"
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = rows[0][1]["kl"]
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args),
                                                    "quantize_seconds": wq.stats["quantize_seconds"],
                                                    "rows": [{"float again": a, **b} for a, b in rows]}, indent=2))
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"8da4w (Meta's scheme), random Hadamard seed {args.seed} R1/R2{'' if args.no_r4 else '/R4'}, GPTQ + range setting "
             f"({args.gptq_target} target) on {args.gptq_nsamples} x {args.seqlen} tokens of {Path(args.calib_data).name}; "
             f"then one kind of tensor at a time back in float ({args.restore} weights). KL(float32 || model), nats/token, first {windows.shape[0]} "
             f"windows of {args.seqlen} tokens of WikiText-2 test.", "",
             "| back in float | KL | KL drop (share of the total) | PPL | top-1 |", "|---|---:|---:|---:|---:|"]
    for label, r in rows:
        drop = total - r["kl"]
        lines.append(f"| {label} | {r['kl']:.4f} | {drop:.4f} ({100 * drop / total:.0f}%) | {r['ppl']:.2f} | {100 * r['top1']:.1f}% |")
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
