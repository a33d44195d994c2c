#!/usr/bin/env python
"""Does R1 hurt where a model has massive activations, and does an R1 that leaves those channels alone help?

Real pretrained Llamas (SmolLM2-135M here) carry a few residual-stream channels with |h| in the thousands on
a few tokens (the first token, delimiters); RMSNorm's gains on those channels are near zero, so the linears
reading the normalized stream barely see them in float. A rotation R1 mixes every channel into every other:
the normalized massive token becomes a dense vector that multiplies every int4 weight error of q/k/v and
gate/up. This script finds the massive channels on calibration text and compares, at Meta's 8da4w scheme
(RTN and GPTQ+clip; R2 random Hadamard and R4 as usual):

- R1 = the seeded random Hadamard (the learned rotations' start),
- R1 = a seeded random orthogonal matrix (control: any orthogonal R1 fuses offline; is Hadamard special?),
- R1 = the identity on the k massive channels and a seeded random orthogonal matrix on the others.

    python scripts/diag_massive_channels.py --model /work/models/smollm2-135m --out benchmarks/results/massive_channels_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import cached_logits_fn, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.fusion import Rotations
from spinquant.models import load_model, load_tokenizer
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W
from spinquant.outliers import channels_above, relative_channel_absmax
from _common import SHARED, quantized_copy, result_path


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random (n, n) orthogonal matrix, float64 (QR of a seeded Gaussian, signs fixed by R's diagonal)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def protecting(n: int, keep: list[int], seed: int) -> torch.Tensor:
    """Orthogonal (n, n): identity on the channels ``keep``, a seeded random orthogonal matrix on the others."""
    rest = [j for j in range(n) if j not in set(keep)]
    q = torch.zeros(n, n, dtype=torch.float64)
    q[keep, keep] = 1.0
    q[torch.tensor(rest)[:, None], torch.tensor(rest)[None, :]] = random_orthogonal(len(rest), seed)
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--test-data", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--ratio", type=float, default=50.0, help="a channel is massive when its max |h| over all layers is "
                    "this many times the median channel's")
    ap.add_argument("--variants", default="hadamard:rtn,orthogonal:rtn,protected:rtn,hadamard:gptq,protected:gptq",
                    help="comma list of R1:method, R1 in hadamard/orthogonal/protected, method rtn or gptq (+clip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks/results/massive_channels"))
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    calib = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=args.nsamples, seqlen=args.seqlen,
                                               seed=args.seed), tok)
    ratio = relative_channel_absmax(base, calib[:4])
    massive = channels_above(ratio, args.ratio)
    print(f"massive channels (max |h| / median channel): {[(j, round(float(ratio[j]), 1)) for j in massive]}", flush=True)

    windows = evaluation_windows(evaluation_ids(tok, args.test_data), args.seqlen, args.windows)
    reference = cached_logits_fn(hf_logits_fn(base))
    dim = base.config.hidden_size
    hadamard = Rotations.random_hadamard(base, args.seed)
    r1s = {"hadamard": ("random Hadamard", hadamard.r1), "orthogonal": ("random orthogonal", random_orthogonal(dim, args.seed)),
           "protected": (f"identity on the {len(massive)} massive channels + random orthogonal", protecting(dim, massive, args.seed))}
    rows = []
    for variant in args.variants.split(","):
        key, method = variant.split(":")
        name, r1 = r1s[key]
        t = time.perf_counter()
        rot = Rotations(r1=r1, r2=hadamard.r2, r4=True)
        model = quantized_copy(base, rot, META_8DA4W, WeightQuantConfig(method=method, clip_search=method == "gptq"), calib)
        r = evaluate(hf_logits_fn(model), windows, reference, progress=False)
        row = {"r1": name, "method": "GPTQ+clip" if method == "gptq" else "RTN", "ppl": r.ppl, "kl": r.kl, "top1": r.top1,
               "seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)

    machine = f"{platform.node()} ({os.cpu_count()} CPU cores, torch {torch.__version__}, cpu)"
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args),
                                                    "massive_channels": {j: float(ratio[j]) for j in massive},
                                                    "rows": rows}, indent=2))
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Massive channels (max |h| over layers / the median channel's, on 4 calibration windows): "
             f"{', '.join(f'{j} ({ratio[j]:.0f}x)' for j in massive)}. Scheme: Meta's 8da4w (W4 g32 + A8 block linears, "
             f"W8A8 output layer, W8 embedding); R2 random Hadamard and R4 in every row. Evaluation: first {windows.shape[0]} "
             f"windows of {args.seqlen} tokens of WikiText-2 test, KL(float32 || model) nats/token; GPTQ: {args.nsamples} x "
             f"{args.seqlen} tokens of {Path(args.calib_data).name}.", "",
             "| R1 | method | PPL | KL | top-1 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['r1']} | {r['method']} | {r['ppl']:.2f} | {r['kl']:.4f} | {100 * r['top1']:.2f}% |" for r in rows]
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
