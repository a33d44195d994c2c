#!/usr/bin/env python
"""Is the quantized model's KL to the float model concentrated on a few positions or tokens?

Meta's 8da4w scheme with a random Hadamard R1/R2 (no R4 unless --r4), round-to-nearest with range setting (no GPTQ:
seconds, and the same int4 weights' error that GPTQ then reduces); KL(float32 || model) per token on the first
windows of WikiText-2 test, summed by window position (the first token, the attention sink of a window without BOS,
then wider bands) and by the largest per-token KLs.

    python scripts/diag_kl_by_position.py --model /work/models/smollm2-135m --windows 8 \
        --out benchmarks/results/kl_by_position_smollm2_8da4w
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from spinquant.evaluate import evaluation_ids, evaluation_windows
from spinquant.fusion import Rotations
from spinquant.models import load_model, load_tokenizer
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W
from _common import data_arguments, quantized_copy, result_path

BANDS = ((0, 1), (1, 4), (4, 32), (32, 256), (256, None))
TOP_FRACTIONS = (0.001, 0.01, 0.05, 0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_arguments(ap, windows=8, calib=False)
    ap.add_argument("--r4", action="store_true", help="also the online R4 before down_proj")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks/results/kl_by_position"))
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    base = load_model(args.model)
    base.eval()
    windows = evaluation_windows(evaluation_ids(load_tokenizer(args.model), args.test_data), args.seqlen, args.windows)
    rot = Rotations.random_hadamard(base, args.seed, r4=args.r4)
    model = quantized_copy(base, rot, META_8DA4W, WeightQuantConfig(method="rtn", clip_search=True))
    per_token = []
    for w in windows:
        ref = F.log_softmax(base(w[None]).logits[0].float(), -1)
        ours = F.log_softmax(model(w[None]).logits[0].float(), -1)
        per_token.append((ref.exp() * (ref - ours)).sum(-1))
    kl = torch.stack(per_token)  # (windows, seqlen): KL of the next-token distribution at each position
    total = kl.sum().item()
    bands = [{"positions": f"{lo}-{(hi or args.seqlen) - 1}", "mean_kl": kl[:, lo:hi].mean().item(),
              "share_of_kl": kl[:, lo:hi].sum().item() / total,
              "share_of_tokens": kl[:, lo:hi].numel() / kl.numel()} for lo, hi in BANDS]
    ranked = kl.flatten().sort(descending=True).values
    tops = [{"top_fraction": f, "share_of_kl": ranked[: max(1, int(f * ranked.numel()))].sum().item() / total}
            for f in TOP_FRACTIONS]

    command = "python " + " ".join(sys.argv)
    machine = f"{platform.node()} ({os.cpu_count()} CPU cores, torch {torch.__version__})"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args),
                                                     "mean_kl": kl.mean().item(), "bands": bands, "top": tops}, indent=1))
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"8da4w, random Hadamard seed {args.seed} R1/R2{'/R4' if args.r4 else ''}, RTN + range setting; "
             f"KL(float32 || model) per token on the first {windows.shape[0]} x {args.seqlen} WikiText-2 test tokens; "
             f"mean {kl.mean().item():.4f} nats/token.", "",
             "| positions | mean KL | share of the KL | share of the tokens |", "|---|---:|---:|---:|"]
    lines += [f"| {b['positions']} | {b['mean_kl']:.4f} | {b['share_of_kl']:.3f} | {b['share_of_tokens']:.3f} |" for b in bands]
    lines += ["", "| largest per-token KLs | share of the KL |", "|---|---:|"]
    lines += [f"| top {t['top_fraction'] * 100:g}% of tokens | {t['share_of_kl']:.3f} |" for t in tops]
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
