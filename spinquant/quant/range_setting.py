"""Range setting: per-group clip ratios that minimise the weight reconstruction error.

For each group (or channel) the scale is ``r * max|w| / qmax`` for the ratio ``r`` on a grid from
1.0 down to ``min_ratio`` that minimises ``sum |w - w_hat|^norm`` over the group (norm 2.4 as in
GPTQ/QuaRot's weight clip search). Ratio 1.0 (no clipping) is always a candidate, so the search can
only lower the error of round-to-nearest. The loop is over ratios (memory: two copies of W).
"""

from __future__ import annotations

import torch

from spinquant.quant.primitives import _grouped, qrange, weight_absmax


@torch.no_grad()
def search_scales(w: torch.Tensor, bits: int, group_size: int | None, grid: int = 50, min_ratio: float = 0.5,
                  norm: float = 2.4) -> torch.Tensor:
    """Best symmetric scales (out, in / g) for ``w`` (out, in) over clip ratios in [min_ratio, 1]."""
    qmin, qmax = qrange(bits)
    wg = _grouped(w.float(), group_size)
    absmax = weight_absmax(w.float(), group_size).clamp_min(torch.finfo(torch.float32).tiny)
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = absmax / qmax
    for i in range(grid + 1):
        ratio = 1.0 - (1.0 - min_ratio) * i / grid
        s = ratio * absmax / qmax
        wq = torch.clamp(torch.round(wg * (1.0 / s[..., None])), qmin, qmax) * s[..., None]
        err = (wq - wg).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return best_scale


def choose_scales(w: torch.Tensor, bits: int, group_size: int | None, clip_search: bool) -> torch.Tensor:
    """Scales by clip search, or plain max|w| / qmax (no clipping) when the search is off."""
    if clip_search:
        return search_scales(w, bits, group_size)
    _, qmax = qrange(bits)
    return (weight_absmax(w.float(), group_size) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
