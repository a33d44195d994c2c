#!/usr/bin/env python3
"""Where do SmoothQuant-style channel scales act? Activation-only probe on a model rotated by a random Hadamard.

Quantizes activations and KV cache only (W16A4KV4 by default: weights stay float), with and without the closed-form
scales of spinquant.smoothing, and prints KL to the float model, perplexity and top-1 on the first test windows.
Produced the probe table of benchmarks/results/channel_scales_smollm2.md:

    python scripts/diag_smoothing_probe.py --model /work/models/smollm2-135m --windows 4
"""

from __future__ import annotations

import argparse
import json
import time

from _common import SHARED, quantized_copy
from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import cached_logits_fn, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.fusion import SCALE_KINDS, Rotations
from spinquant.models import load_model, load_tokenizer
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import FLOAT, QuantScheme
from spinquant.smoothing import smooth_scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"))
    ap.add_argument("--test-data", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--windows", type=int, default=4, help="test windows of 1024 tokens")
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--kv-bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="random Hadamard seed (R1/R2, no R4)")
    args = ap.parse_args()

    tok, base = load_tokenizer(args.model), load_model(args.model)
    test = evaluation_windows(evaluation_ids(tok, args.test_data), 1024, args.windows)
    calib = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=8, seqlen=512, seed=1), tok)
    reference = cached_logits_fn(hf_logits_fn(base))
    scheme = QuantScheme(w_bits=FLOAT, group_size=None, a_bits=args.a_bits, kv_bits=args.kv_bits, output_w_bits=FLOAT,
                         output_a_bits=FLOAT, embedding_bits=FLOAT)
    start = Rotations.random_hadamard(base, args.seed, r4=False)
    for name, kinds, alpha in (("none", None, None), ("all a0.5", SCALE_KINDS, 0.5), ("up_out a0.5", ("up_out",), 0.5),
                               ("all a0.7", SCALE_KINDS, 0.7)):
        t = time.time()
        rot = Rotations(r1=start.r1, r2=start.r2, r4=False)
        if kinds is not None:
            rot.scales = smooth_scales(base, start, calib, alpha=alpha, kinds=kinds)
        model = quantized_copy(base, rot, scheme, WeightQuantConfig(method="rtn", clip_search=True))
        r = evaluate(hf_logits_fn(model), test, reference, progress=False)
        print(json.dumps({"scales": name, "kl": round(r.kl, 4), "ppl": round(r.ppl, 2), "top1": round(r.top1, 4),
                          "s": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main()
