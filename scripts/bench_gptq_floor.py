#!/usr/bin/env python
"""GPTQ time per decoder layer against the machine's arithmetic floor, at a real shape (issue 33 item 4).

One decoder layer of the Llama 3.2 1B (or 3B) shape with random weights (a 1024-token vocabulary: the layer's work
does not depend on it) is quantized by spinquant's own GPTQ (quant/apply.gptq_quantize_model) over random calibration
tokens, as calibrate runs it (plain GPTQ, or the default recipe's float objective + scale refit). The time is split by
function (cProfile, cumulative), and compared with a floor: the multiply-adds GPTQ must do at this shape -- the
Hessian accumulation over the calibration tokens, the layer's forward passes over them (one stream, or two with the
float objective, and its cross-statistics C), the inverse-Hessian factor (Cholesky, per shared input) and GPTQ's
lazy-batch updates (rows x in² per linear) -- divided by torch.matmul's float32 throughput measured here on square
2048 products.

    python scripts/bench_gptq_floor.py --shape llama-3.2-1b --nsamples 16 --seqlen 512
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import time
from pathlib import Path

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spinquant.formats.hf import untie_embeddings
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.scheme import META_8DA4W

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHAPES  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FUNCTIONS = ("gptq_quantize_model", "_gptq_linears", "quantize", "rtn_integers", "output_error", "refit_group_scales",
             "search_scales", "_fit_float_target", "__call__", "_float_target_statistics", "_run_layer",
             "_advance", "__init__")


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - t) / 1e9


def floor_flops(shape: dict, tokens: int, float_target: bool) -> dict[str, float]:
    """Multiply-add work (flops) GPTQ must do on one layer (see the module docstring)."""
    h, f = shape["hidden_size"], shape["intermediate_size"]
    hd, nh, nkv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    linears = {"qkv": ((nh + 2 * nkv) * hd, h), "o": (h, nh * hd), "gate_up": (2 * f, h), "down": (h, f)}
    params = sum(o * i for o, i in linears.values())
    streams = 2 if float_target else 1
    out = {
        "hessians": sum(2 * tokens * i * i for _, i in linears.values()) * (2 if float_target else 1),  # H (and C)
        "forward": 2 * tokens * params * streams * 2,  # the statistics pass and the advance, per stream
        "cholesky": sum(i**3 for _, i in linears.values()),  # factor + inverse + factor: ~ in³ per shared input
        "gptq_updates": sum(2 * o * i * i / 2 for o, i in linears.values()),  # lazy-batch updates: rows x in² / 2 madds
    }
    if float_target:  # W* = W + W (C - H̃)(H̃ + Λ)⁻¹: one product and one solve per linear
        out["float_target_fit"] = sum(2 * o * i * i + 2 * i**3 / 3 + 2 * o * i * i for o, i in linears.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "small"], default="llama-3.2-1b")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--objective", choices=["layer", "float"], default="float",
                    help="layer: plain GPTQ; float: the default recipe's float objective + scale refit")
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    cfg = LlamaConfig(vocab_size=1024, num_hidden_layers=1, max_position_embeddings=args.seqlen, tie_word_embeddings=False,
                      **{k: v for k, v in shape.items() if k not in ("num_hidden_layers", "tie_word_embeddings")})
    with torch.no_grad():
        model = untie_embeddings(LlamaForCausalLM(cfg).eval())
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    windows = torch.randint(0, cfg.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    float_target = args.objective == "float"
    wq = WeightQuantConfig(method="gptq", float_target=float_target, target_percdamp=0.1, scale_refit=float_target)
    gflops = matmul_gflops()
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.enable()
    quantize_model(model, META_8DA4W, wq, windows, progress=False)
    profile.disable()
    seconds = time.perf_counter() - t
    stats = pstats.Stats(profile)
    by_function: dict[str, float] = {}
    for (file, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        if "spinquant" in file and name in FUNCTIONS:
            label = f"{Path(file).stem}.{name}"
            by_function[label] = max(by_function.get(label, 0.0), cumulative)
    work = floor_flops(shape, args.nsamples * args.seqlen, float_target)
    floor = sum(work.values()) / (gflops * 1e9)
    # the output layer (1024 x hidden here) and the embedding are part of the timed call; both are tiny at vocab 1024
    result = {"shape": args.shape, "objective": args.objective, "tokens": args.nsamples * args.seqlen,
              "seconds_per_layer": seconds, "matmul_gflops": gflops, "floor_seconds": floor, "ratio_to_floor": seconds / floor,
              "floor_gflop": {k: v / 1e9 for k, v in work.items()},
              "by_function_seconds": dict(sorted(by_function.items(), key=lambda kv: -kv[1])),
              "machine": f"{platform.node()}: {platform.machine()}, {psutil.cpu_count()} cores, torch {torch.__version__}",
              "command": "python scripts/bench_gptq_floor.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"gptq_floor_{args.shape}_{args.objective}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# GPTQ per decoder layer vs the arithmetic floor: {args.shape}, {args.objective} objective", "",
             f"Machine: {result['machine']}. Command: `{result['command']}`. {result['tokens']} calibration tokens.", "",
             f"Measured {seconds:.1f} s per layer; floor {floor:.1f} s ({sum(work.values()) / 1e9:.0f} GFLOP at "
             f"torch.matmul's {gflops:.0f} GFLOP/s): **{seconds / floor:.1f}x** the floor.", "",
             "| floor part | GFLOP |", "|---|---:|", *[f"| {k} | {v / 1e9:.0f} |" for k, v in work.items()], "",
             "| function (cumulative, nested) | seconds |", "|---|---:|",
             *[f"| {k} | {v:.1f} |" for k, v in result["by_function_seconds"].items()]]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
