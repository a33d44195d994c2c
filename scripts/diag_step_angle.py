#!/usr/bin/env python
"""How far should one Cayley SGD step turn the rotations? A line search from the random-Hadamard start.

For a few calibration batches: the gradient of the learner's loss at the seeded Hadamard R1/R2 (R4 on), the angle
(radians, the largest turn of any vector, spinquant.rotation.step_angles) a plain step of ``--lr`` would take, and the
loss after one step capped at each of ``--caps`` radians (``none``: the plain step), on the batch itself and on the
next batch (held out from the step). Every step starts from the Hadamard start.
``--frozen``: also the same steps with R1's rows of the massive channels frozen (spinquant.rotation.freeze_rows);
``--random N``: also N random directions (seeded skew generators) turned by each cap, with and without those rows
frozen: how rough the loss is around the start, whatever the gradient says.

    python scripts/diag_step_angle.py --model /work/models/smollm2-135m --a 4 --kv 4 --frozen --random 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.models import load_model, load_tokenizer
from spinquant.outliers import massive_channels
from spinquant.rotation import (LearnConfig, RotationLearner, bound_step_angles, freeze_rows, prepare_model,
                                 rotated_weights)
from _common import SHARED


@torch.no_grad()
def batch_loss(learner: RotationLearner, batch: torch.Tensor) -> float:
    """The learner's loss of ``batch`` at its current R1/R2, forward only."""
    rotated = rotated_weights(learner.base, learner.r1, learner.r2, learner.n_layers, learner.hd)
    try:
        for k, w in rotated.items():
            learner.linears[k].weight_override = w
        return learner._micro_loss(learner.r1, batch).item()
    finally:
        for k in rotated:
            learner.linears[k].weight_override = None


def turned(r1: torch.Tensor, skew: torch.Tensor, rows: list[int], angle: float) -> torch.Tensor:
    """Cayley(A) r1 (the learner's left action) for A ∝ ``skew`` with ``rows`` zeroed (those rows of r1 kept), scaled
    so that the largest turn is ``angle`` radians (2·atan(σ_max/2) = angle)."""
    a = skew.clone()
    a[rows, :] = 0
    a[:, rows] = 0
    a = a * (2 * torch.tan(torch.tensor(angle / 2)) / torch.linalg.matrix_norm(a, ord=2))
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(eye - a / 2, eye + a / 2) @ r1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5)
    ap.add_argument("--w", type=int, default=16, help="weight bits while learning")
    ap.add_argument("--a", type=int, default=4)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--loss", default="kl", choices=["ce", "kl"])
    ap.add_argument("--caps", default="none,0.3,0.1,0.03,0.01")
    ap.add_argument("--frozen", action="store_true", help="also step with the massive channels' R1 rows frozen")
    ap.add_argument("--random", type=int, default=0, help="random directions to compare with the gradient's")
    args = ap.parse_args()
    tok, base = load_tokenizer(args.model), load_model(args.model)
    n = (args.batches + 1) * args.batch_size
    windows = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=n, seqlen=args.seqlen, seed=1), tok, use_cache=False)
    cfg = LearnConfig(steps=1, batch_size=args.batch_size, micro_batch=args.batch_size, lr=args.lr, w_bits=args.w, a_bits=args.a,
                      kv_bits=args.kv, loss=args.loss, grad_checkpoint=False)
    learner = RotationLearner(prepare_model(copy.deepcopy(base), cfg), windows, cfg, torch.device("cpu"), progress=False,
                              teacher=copy.deepcopy(base) if args.loss == "kl" else None)
    start = (learner.r1.detach().clone(), learner.r2.detach().clone())
    caps = [None if c == "none" else float(c) for c in args.caps.split(",")]
    massive = massive_channels(base, windows[:4]) if args.frozen or args.random else []
    print(f"massive channels: {massive}", flush=True)
    variants = [("", [])] + ([(f", R1 rows {massive} frozen", massive)] if args.frozen and massive else [])
    print(f"W{args.w}A{args.a}KV{args.kv}, {args.loss} loss, lr {args.lr}, batches of {args.batch_size} x {args.seqlen}", flush=True)
    for b in range(args.batches):
        t = time.time()
        batch, held = (windows[i * args.batch_size : (i + 1) * args.batch_size] for i in (b, b + 1))
        loss = learner.accumulate_gradients(batch)
        grads = (learner.r1.grad.clone(), learner.r2.grad.clone())
        held0 = batch_loss(learner, held)
        print(f"batch {b}: loss {loss:.4f}, held-out batch {held0:.4f} ({time.time() - t:.0f} s)", flush=True)
        for tag, rows in variants:
            for cap in caps:
                with torch.no_grad():
                    learner.r1.copy_(start[0])
                    learner.r2.copy_(start[1])
                learner.r1.grad, learner.r2.grad = grads[0].clone(), grads[1].clone()
                freeze_rows(learner.r1, rows)
                a1, a2 = (bound_step_angles(p, args.lr, cap) for p in (learner.r1, learner.r2))
                learner.opt.step()
                after, after_held = batch_loss(learner, batch), batch_loss(learner, held)
                print(f"  gradient{tag}, cap {cap}: plain-step angle R1 {a1:.3f}, R2 max {a2:.3f}; after the step: batch "
                      f"{after:.4f}, held-out {after_held:.4f}", flush=True)
        g = torch.Generator().manual_seed(b)
        for k in range(args.random):
            z = torch.randn(start[0].shape, generator=g)
            for tag, rows in [("", [])] + ([(f", R1 rows {massive} frozen", massive)] if massive else []):
                for cap in [c for c in caps if c is not None]:
                    with torch.no_grad():
                        learner.r1.copy_(turned(start[0], z - z.T, rows, cap))
                        learner.r2.copy_(start[1])
                    print(f"  random direction {k}{tag}, turned {cap}: batch {batch_loss(learner, batch):.4f}, "
                          f"held-out {batch_loss(learner, held):.4f}", flush=True)
        with torch.no_grad():
            learner.r1.copy_(start[0])
            learner.r2.copy_(start[1])
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
