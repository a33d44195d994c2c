#!/usr/bin/env python
"""Is the rotation learner's loss the quantity a fake-quant evaluation measures? (W16, activations/KV quantized)

For the seeded random Hadamard (R4 on), compares on the same calibration windows: KL(float || model) of a
fake-quantized copy (spinquant.evaluate) and the learner's first-step KL loss (spinquant.rotation), at
A4KV4, A4KV16 and A16KV4. Equal numbers mean a learning curve that leaves its first value is the learning's doing.

    python scripts/diag_learning_loss_check.py --model /work/models/smollm2-135m
"""

from __future__ import annotations

import argparse
import copy

import torch

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import evaluate, hf_logits_fn
from spinquant.fusion import Rotations
from spinquant.models import load_model, load_tokenizer
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import QuantScheme
from spinquant.rotation import LearnConfig, RotationLearner, prepare_model
from _common import SHARED, quantized_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    tok, base = load_tokenizer(args.model), load_model(args.model)
    windows = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=args.windows, seqlen=args.seqlen, seed=1), tok,
                                  use_cache=False)
    for a_bits, kv_bits in ((4, 4), (4, 16), (16, 4)):
        scheme = QuantScheme(w_bits=16, group_size=None, a_bits=a_bits, kv_bits=kv_bits, output_w_bits=16, output_a_bits=16,
                             embedding_bits=16)
        model = quantized_copy(base, Rotations.random_hadamard(base, 0, r4=True), scheme, WeightQuantConfig(method="rtn"))
        r = evaluate(hf_logits_fn(model), windows, hf_logits_fn(base), progress=False)
        cfg = LearnConfig(steps=1, batch_size=args.windows, micro_batch=args.windows, w_bits=16, a_bits=a_bits, kv_bits=kv_bits,
                          loss="kl", grad_checkpoint=False)
        learner = RotationLearner(prepare_model(copy.deepcopy(base), cfg), windows, cfg, torch.device("cpu"), progress=False,
                                  teacher=copy.deepcopy(base))
        loss = learner.accumulate_gradients(windows)
        print(f"A{a_bits}KV{kv_bits}: evaluation KL {r.kl:.4f} (PPL {r.ppl:.2f}), learner's KL loss {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
