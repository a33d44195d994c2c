"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's error onto
the columns not yet quantized through the inverse Hessian of the layer's inputs.

Written here rather than taken from a library because no maintained package exposes GPTQ with
the pieces this scheme needs together: symmetric int4 groups whose scales are chosen by range
setting as the columns are reached, static groups under act-order (so groups stay contiguous and
exportable), and integer outputs identical to our fake-quant formulas.

Shapes: W (out, in) float32; H (in, in) = 2/n sum x xᵀ over the n calibration tokens' inputs x.
"""

from __future__ import annotations

import torch

from spinquant.quant.primitives import qrange
from spinquant.quant.range_setting import choose_scales


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ (float32) over every row x (in_features,) passed to :meth:`add`."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.T, x)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None, clip_search: bool = True,
                  percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` (out, in) with Hessian ``h`` (in, in). Returns (q int8 (out, in), scales float32 (out, in/g)).

    Group scales are chosen (with range setting) from the error-updated weights when a group's first
    column is reached; with ``act_order`` the columns are processed by decreasing Hessian diagonal and
    the scales of all groups are fixed up front from the original weights (static groups).
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    out_f, in_f = w.shape
    g = group_size or in_f
    qmin, qmax = qrange(bits)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static_scales = choose_scales(w, bits, group_size, clip_search) if act_order or group_size is None else None
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]

    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite even after damping: damp harder
        h.diagonal().add_(10 * damp)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    scales = torch.zeros(out_f, in_f // g, dtype=torch.float32, device=w.device) if static_scales is None else static_scales
    q = torch.zeros_like(w)
    blocksize = max(g, blocksize // g * g) if group_size else blocksize
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig_col = int(perm[col])
            gi = orig_col // g
            if static_scales is None and col % g == 0:
                scales[:, gi] = choose_scales(w1[:, i : i + g], bits, None, clip_search)[:, 0]
            s = scales[:, gi]
            wc = w1[:, i]
            qc = torch.clamp(torch.round(wc * (1.0 / s)), qmin, qmax)
            q[:, col] = qc
            e = (wc - qc * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return q[:, inv].to(torch.int8), scales
