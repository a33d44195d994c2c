"""Range setting: per-group clip ratios that minimise the weight reconstruction error.

For each group (or channel) the scale is ``r * max|w| / qmax`` for the ratio ``r`` on a grid from
1.0 down to ``min_ratio`` that minimises ``sum |w - w_hat|^norm`` over the group (norm 2.4 as in
GPTQ/QuaRot's weight clip search). Ratio 1.0 (no clipping) is always a candidate, so the search can
only lower the error of round-to-nearest. The loop is over ratios (memory: two copies of W).
"""

from __future__ import annotations

import torch

from spinquant.quant.primitives import _grouped, qrange, row_slices, weight_absmax


@torch.no_grad()
def search_scales(w: torch.Tensor, bits: int, group_size: int | None, grid: int = 50, min_ratio: float = 0.5,
                  norm: float = 2.4, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """Best symmetric scales (out, in / g) for ``w`` (out, in) over clip ratios in [min_ratio, 1].

    Groups are searched ``chunk_elements`` weights at a time, with in-place arithmetic on one buffer: the 51
    candidate ratios then run on data that stays in cache (bit-identical to whole-matrix temporaries, and faster).
    """
    qmin, qmax = qrange(bits)
    wg = _grouped(w.float(), group_size)
    absmax = weight_absmax(w.float(), group_size).clamp_min(torch.finfo(torch.float32).tiny)
    groups = wg.reshape(-1, wg.shape[-1])  # (n_groups, g)
    amax = absmax.reshape(-1)
    best_scale = torch.empty_like(amax)
    ratios = [1.0 - (1.0 - min_ratio) * i / grid for i in range(grid + 1)]
    for rows in row_slices(*groups.shape, chunk_elements):
        x, am = groups[rows], amax[rows]
        best_err = torch.full_like(am, float("inf"))
        best = am / qmax
        buf = torch.empty_like(x)
        for ratio in ratios:
            s = ratio * am / qmax
            torch.mul(x, (1.0 / s)[:, None], out=buf)
            buf.round_().clamp_(qmin, qmax).mul_(s[:, None]).sub_(x).abs_().pow_(norm)  # |w_hat - w|^norm
            err = buf.sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
        best_scale[rows] = best
    return best_scale.reshape(absmax.shape)


def choose_scales(w: torch.Tensor, bits: int, group_size: int | None, clip_search: bool) -> torch.Tensor:
    """Scales by clip search, or plain max|w| / qmax (no clipping) when the search is off."""
    if clip_search:
        return search_scales(w, bits, group_size)
    _, qmax = qrange(bits)
    return (weight_absmax(w.float(), group_size) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
