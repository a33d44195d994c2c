#!/usr/bin/env python
"""Rotation learning with a fixed probe: KL to the float model on the same test windows every N steps.

The per-step training loss sees other windows each step and is dominated by text-to-text variation;
this script learns R1/R2 (KL objective) and every ``--every`` steps quantizes a fresh copy of the model
with the current rotations (RTN, the learning scheme) and reports KL/PPL on the first 8 x 1024 tokens of
WikiText-2 test, and how far R1 has moved from its Hadamard start (relative Frobenius norm).

    python scripts/diag_learning_probe.py --w 16 --a 4 --kv 4 --lr 1.5
"""
import argparse
import copy
import sys
import time

import torch

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import cached_logits_fn, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.models import load_model, load_tokenizer
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import FLOAT, QuantScheme
from spinquant.rotation import LearnConfig, RotationLearner, prepare_model
from _common import SHARED, quantized_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"))
    ap.add_argument("--test-data", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--lr", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--w", type=int, default=16, help="weight bits while learning (and probing)")
    ap.add_argument("--a", type=int, default=4, help="activation bits")
    ap.add_argument("--kv", type=int, default=4, help="KV-cache bits")
    ap.add_argument("--loss", default="kl", choices=["ce", "kl"])
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    probe = evaluation_windows(evaluation_ids(tok, args.test_data), 1024, 8)
    reference = cached_logits_fn(hf_logits_fn(base))
    learn = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=args.steps * 8, seqlen=args.seqlen, seed=1), tok)
    cfg = LearnConfig(steps=args.steps, batch_size=8, micro_batch=8, lr=args.lr, w_bits=args.w, a_bits=args.a, kv_bits=args.kv,
                      loss=args.loss, grad_checkpoint=False)
    scheme = QuantScheme(w_bits=args.w, group_size=32 if args.w < FLOAT else None, a_bits=args.a, kv_bits=args.kv,
                         output_w_bits=FLOAT, output_a_bits=FLOAT, embedding_bits=FLOAT)

    def probe_kl(rot) -> tuple[float, float]:
        model = quantized_copy(base, rot, scheme, WeightQuantConfig(method="rtn", clip_search=False))
        r = evaluate(hf_logits_fn(model), probe, reference, progress=False)
        return r.kl, r.ppl

    learner = RotationLearner(prepare_model(copy.deepcopy(base), cfg), learn, cfg, torch.device("cpu"), progress=False,
                              teacher=copy.deepcopy(base) if args.loss == "kl" else None)
    r0 = learner.r1.detach().clone()
    kl, ppl = probe_kl(learner.rotations())
    print(f"step 0: probe KL {kl:.5f} PPL {ppl:.2f}", flush=True)
    t = time.time()
    while learner.step < cfg.steps:
        learner.run(stop_after=args.every)
        moved = (learner.r1.detach() - r0).norm().item() / r0.norm().item()
        kl, ppl = probe_kl(learner.rotations())
        mean_loss = sum(learner.losses[-args.every:]) / args.every
        print(f"step {learner.step}: train loss (last {args.every}) {mean_loss:.4f}, |R1 - R1_0| / |R1_0| {moved:.3f}, "
              f"probe KL {kl:.5f} PPL {ppl:.2f}, {time.time() - t:.0f} s", flush=True)
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
