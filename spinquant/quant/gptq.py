"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's error onto
the columns not yet quantized through the inverse Hessian of the layer's inputs.

Written here rather than taken from a library because no maintained package exposes GPTQ with
the pieces this scheme needs together: symmetric int4 groups whose scales are chosen by range
setting as the columns are reached, integer outputs identical to our fake-quant formulas, and one
inverse-Hessian factor shared by every row chunk of the linears that read one input.

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


class GptqSolver:
    """GPTQ for one Hessian: the damped inverse-Hessian factor and dead columns are computed once and serve any rows
    of any weights that read the same input (GPTQ treats rows independently given H, so a weight can be quantized a
    chunk of rows at a time with the same result: memory stays bounded for a 128256-row output layer).

    Group scales are chosen (with range setting) from the error-updated weights when a group's first column is
    reached; per-channel scales (no groups) up front from the original weights.
    """

    @torch.no_grad()
    def __init__(self, h: torch.Tensor, bits: int, group_size: int | None, clip_search: bool = True,
                 percdamp: float = 0.01, blocksize: int = 128) -> None:
        h = h.detach().float().clone()
        in_f = h.shape[0]
        self.bits, self.group_size, self.clip_search = bits, group_size, clip_search
        self.dead = torch.diag(h) == 0
        h[self.dead, self.dead] = 1.0
        damp = percdamp * torch.mean(torch.diag(h))
        h.diagonal().add_(damp)
        try:
            self.hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        except torch.linalg.LinAlgError:  # not positive definite even after damping: damp harder
            h.diagonal().add_(10 * damp)
            self.hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        g = group_size or in_f
        self.blocksize = max(g, blocksize // g * g) if group_size else blocksize

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ of rows ``w`` (rows, in). Returns (q int8 (rows, in), scales float32 (rows, in/g))."""
        bits, group_size, clip_search, hinv = self.bits, self.group_size, self.clip_search, self.hinv
        w = w.detach().float().clone()
        out_f, in_f = w.shape
        g = group_size or in_f
        qmin, qmax = qrange(bits)
        w[:, self.dead] = 0.0
        static_scales = choose_scales(w, bits, group_size, clip_search) if group_size is None else None
        scales = torch.zeros(out_f, in_f // g, dtype=torch.float32, device=w.device) if static_scales is None else static_scales
        q = torch.zeros(out_f, in_f, dtype=torch.int8, device=w.device)
        blocksize = self.blocksize
        for i1 in range(0, in_f, blocksize):
            i2 = min(i1 + blocksize, in_f)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                gi = col // g
                if static_scales is None and col % g == 0:
                    scales[:, gi] = choose_scales(w1[:, i : i + g], bits, None, clip_search)[:, 0]
                s = scales[:, gi]
                wc = w1[:, i]
                qc = torch.clamp(torch.round(wc * (1.0 / s)), qmin, qmax)
                q[:, col] = qc.to(torch.int8)
                e = (wc - qc * s) / hinv1[i, i]
                w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
                err1[:, i] = e
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        return q, scales


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None, clip_search: bool = True,
                  percdamp: float = 0.01, blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` (out, in) with Hessian ``h`` (in, in). Returns (q int8 (out, in), scales float32 (out, in/g)).
    See :class:`GptqSolver`."""
    return GptqSolver(h, bits, group_size, clip_search, percdamp, blocksize).quantize(w)
