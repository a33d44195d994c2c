#!/usr/bin/env python
"""How long one decoder layer's forward takes per calibration batch, by window length and attention implementation.

GPTQ runs every decoder layer over all calibration windows several times (the float target about eight: four linear
groups, two streams), so this time times the number of batches is the floor of GPTQ's time per layer.

    python scripts/diag_layer_speed.py --model /work/models/smollm2-135m --seqlens 1024,2048
"""

from __future__ import annotations

import argparse
import time

import torch

from spinquant.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seqlens", default="1024,2048")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward (GPTQ's batch: WeightQuantConfig.batch_size)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    model.eval()
    layer = model.model.layers[0]
    dim = model.config.hidden_size
    print(f"model {args.model}, layer 0, {args.batch} windows per forward, {torch.get_num_threads()} threads")
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        x = torch.randn(args.batch, seqlen, dim)
        pos_emb = model.model.rotary_emb(x[:1], torch.arange(seqlen)[None])
        for impl in ("sdpa", "eager"):
            layer.self_attn.config._attn_implementation = impl
            layer(x, attention_mask=None, position_embeddings=pos_emb)  # warm-up
            t0 = time.perf_counter()
            layer(x, attention_mask=None, position_embeddings=pos_emb)
            print(f"seqlen {seqlen}: whole layer ({impl} attention) {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        layer.mlp(x)
        print(f"seqlen {seqlen}: MLP alone {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
