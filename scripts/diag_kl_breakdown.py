#!/usr/bin/env python
"""Where does the quantized model's KL to the float model come from? One quantized tensor at a time.

With the random Hadamard rotation (R1, R2, R4; R3 with the KV cache), quantizes one kind of tensor
(round to nearest, no range setting) and leaves everything else in float, then reports KL(float ||
model), nats/token, on the first windows of WikiText-2 test. Shows which errors a learned R1/R2 can
reach at all: R1 changes the inputs of q/k/v and gate/up and the int4 weights of every block linear;
R2 the inputs of o_proj and the V cache; the inputs of down_proj (behind the fixed R4) and the K cache
(behind the fixed R3) are out of the learned rotations' reach.

    python scripts/diag_kl_breakdown.py --windows 8
    python scripts/diag_kl_breakdown.py --rows 8da4w --model /work/models/smollm2-135m \
        --out benchmarks/results/kl_breakdown_smollm2_8da4w

``--rows qkv`` splits the int4 weights of q/k/v into each projection alone.
``--rows 8da4w`` splits Meta's scheme instead: the int4 weights of each kind of linear alone, the int8 inputs of
each kind alone, with and without the online R4 (a .pte of a model whose intermediate size is not a power of two
has none), the output layer and the embedding.
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

from spinquant.evaluate import cached_logits_fn, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.models import load_model, load_tokenizer
from spinquant.quant.apply import WeightQuantConfig, rtn_quantize_linear
from spinquant.quant.fake_quant import make_fake_quant, quant_linears
from spinquant.quant.scheme import FLOAT, QuantScheme
from _common import data_arguments, quantized_copy, result_path

FLOAT_REST = dict(output_w_bits=FLOAT, output_a_bits=FLOAT, embedding_bits=FLOAT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_arguments(ap, windows=8, calib=False)
    ap.add_argument("--rows", choices=["w4a4", "8da4w", "qkv"], default="w4a4", help="which breakdown (see above)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks/results/kl_breakdown"))
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    windows = evaluation_windows(evaluation_ids(tok, args.test_data), args.seqlen, args.windows)
    reference = cached_logits_fn(hf_logits_fn(base))
    rot = Rotations.random_hadamard(base, args.seed)

    def kl(scheme: QuantScheme, inputs_of: tuple[str, ...] | None = None) -> float:
        model = quantized_copy(base, rot, scheme, WeightQuantConfig(method="rtn", clip_search=False))
        if inputs_of is not None:  # activation quantization only in front of these linears
            for name, lin in quant_linears(model):
                if not name.endswith(inputs_of):
                    lin.a_bits = FLOAT
        return evaluate(hf_logits_fn(model), windows, reference, progress=False).kl

    rot_no_r4 = Rotations.random_hadamard(base, args.seed, r4=False)

    def kl_of(scheme: QuantScheme, weights_of: tuple[str, ...] = (), inputs_of: tuple[str, ...] = (), r4: bool = True) -> float:
        """RTN int4 weights of the linears named ``weights_of`` only, int8/``scheme`` inputs of ``inputs_of`` only."""
        model = copy.deepcopy(base)
        fuse_and_rotate(model, rot if r4 else rot_no_r4)
        make_fake_quant(model, scheme)
        model.requires_grad_(False)
        for name, lin in quant_linears(model):
            if not name.endswith(inputs_of):
                lin.a_bits = FLOAT
            if name.endswith(weights_of):
                rtn_quantize_linear(lin, False)
            else:
                lin.w_bits = FLOAT
        return evaluate(hf_logits_fn(model), windows, reference, progress=False).kl

    qkv, gate_up, o, down = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",)
    every = qkv + gate_up + o + down
    w4a8 = QuantScheme(w_bits=4, group_size=32, a_bits=8, **FLOAT_REST)
    a4 = QuantScheme(w_bits=FLOAT, group_size=None, a_bits=4, kv_bits=FLOAT, **FLOAT_REST)
    rows = [
        ("8da4w block linears, R1/R2/R4 (no output layer/embedding quant)", "-", kl_of(w4a8, every, every)),
        ("8da4w block linears, R1/R2 only (no R4)", "-", kl_of(w4a8, every, every, r4=False)),
        ("W4 g32 weights of q/k/v only", "R1", kl_of(w4a8, qkv)),
        ("W4 g32 weights of o_proj only", "R1, R2", kl_of(w4a8, o)),
        ("W4 g32 weights of gate/up only", "R1", kl_of(w4a8, gate_up)),
        ("W4 g32 weights of down_proj only", "R1 (R4 fixed)", kl_of(w4a8, down)),
        ("W4 g32 weights of down_proj only, no R4", "R1", kl_of(w4a8, down, r4=False)),
        ("A8 inputs of q/k/v only", "R1", kl_of(w4a8, (), qkv)),
        ("A8 inputs of gate/up only", "R1", kl_of(w4a8, (), gate_up)),
        ("A8 inputs of o_proj only", "R2", kl_of(w4a8, (), o)),
        ("A8 inputs of down_proj only", "none (R4 fixed)", kl_of(w4a8, (), down)),
        ("A8 inputs of down_proj only, no R4", "none", kl_of(w4a8, (), down, r4=False)),
        ("output layer W8A8 (Meta's)", "R1", kl(QuantScheme(w_bits=FLOAT, group_size=None, a_bits=FLOAT, output_w_bits=8,
                                                             output_a_bits=8, embedding_bits=FLOAT))),
        ("embedding W8 per row (Meta's)", "R1", kl(QuantScheme(w_bits=FLOAT, group_size=None, a_bits=FLOAT, output_w_bits=FLOAT,
                                                               output_a_bits=FLOAT, embedding_bits=8))),
    ] if args.rows == "8da4w" else [
        ("W4 g32 weights of q/k/v", "R1", kl_of(w4a8, qkv)),
        ("W4 g32 weights of q_proj only", "R1", kl_of(w4a8, ("q_proj",))),
        ("W4 g32 weights of k_proj only", "R1", kl_of(w4a8, ("k_proj",))),
        ("W4 g32 weights of v_proj only", "R1", kl_of(w4a8, ("v_proj",))),
    ] if args.rows == "qkv" else [
        ("W16A4KV4: everything", "-", kl(QuantScheme(w_bits=FLOAT, group_size=None, a_bits=4, kv_bits=4, **FLOAT_REST))),
        ("A4 inputs of q/k/v", "R1", kl(a4, ("q_proj", "k_proj", "v_proj"))),
        ("A4 inputs of gate/up", "R1", kl(a4, ("gate_proj", "up_proj"))),
        ("A4 inputs of o_proj", "R2", kl(a4, ("o_proj",))),
        ("A4 inputs of down_proj", "none (R4 fixed)", kl(a4, ("down_proj",))),
        ("KV4 cache (K behind R3, V behind R2)", "R2 (V only)", kl(QuantScheme(w_bits=FLOAT, group_size=None, a_bits=FLOAT, kv_bits=4, **FLOAT_REST))),
        ("W4 g32 weights only (Meta's int4)", "R1, R2", kl(QuantScheme(w_bits=4, group_size=32, a_bits=FLOAT, **FLOAT_REST))),
        ("A8 inputs of all block linears", "R1, R2", kl(QuantScheme(w_bits=FLOAT, group_size=None, a_bits=8, **FLOAT_REST))),
        ("output layer W8A8 (Meta's)", "R1", kl(QuantScheme(w_bits=FLOAT, group_size=None, a_bits=FLOAT, output_w_bits=8,
                                                             output_a_bits=8, embedding_bits=FLOAT))),
        ("embedding W8 per row (Meta's)", "R1", kl(QuantScheme(w_bits=FLOAT, group_size=None, a_bits=FLOAT, output_w_bits=FLOAT,
                                                               output_a_bits=FLOAT, embedding_bits=8))),
    ]
    machine = f"{platform.node()} ({os.cpu_count()} CPU cores, torch {torch.__version__}, cpu)"
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args),
                                                    "rows": [{"quantized": a, "learned rotation reaches": b, "kl": c} for a, b, c in rows]}, indent=2))
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Random Hadamard rotation (seed {args.seed}; R4 too unless a row says otherwise), RTN without range setting, everything else float; KL(float32 || model) "
             f"in nats/token on the first {windows.shape[0]} windows of {args.seqlen} tokens of WikiText-2 test.", "",
             "| quantized | reached by the learned rotations | KL |", "|---|---|---:|"]
    lines += [f"| {a} | {b} | {c:.4f} |" for a, b, c in rows]
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
