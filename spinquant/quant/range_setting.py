"""Range setting: per-group clip ratios that minimise the weight reconstruction error.

For each group (or channel) the scale is ``r * max|w| / qmax`` for the ratio ``r`` on a grid from
1.0 down to ``min_ratio`` that minimises ``sum |w - w_hat|^norm`` over the group (norm 2.4 as in
GPTQ/QuaRot's weight clip search). Ratio 1.0 (no clipping) is always a candidate, so the search can
only lower the error of round-to-nearest. The loop is over ratios (memory: two copies of W).

With ``importance`` (one non-negative weight per input column) the error is ``sum_j c_j |w_j - w_hat_j|^norm``:
the columns that the layer's input drives hardest count most (GPTQ passes ``1 / [H^-1]_jj``, the cost its own greedy
step assigns to an error in column j; llama.cpp's "importance matrix" quantization weights by diag(H) the same way).
"""

from __future__ import annotations

import torch

from spinquant.quant.primitives import _grouped, qrange, weight_absmax


@torch.no_grad()
def search_scales(w: torch.Tensor, bits: int, group_size: int | None, grid: int = 50, min_ratio: float = 0.5,
                  norm: float = 2.4, chunk_elements: int = 1 << 18, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Best symmetric scales (out, in / g) for ``w`` (out, in) over clip ratios in [min_ratio, 1];
    ``importance`` (in,): per-column weights of the error (module docstring), None: all 1.

    Groups are searched ``chunk_elements`` weights at a time, with in-place arithmetic on one buffer: the 51
    candidate ratios then run on data that stays in cache (3.7x faster than whole-matrix temporaries on a
    2048 x 8192 matrix, bit-identical results).
    """
    qmin, qmax = qrange(bits)
    wg = _grouped(w.float(), group_size)
    absmax = weight_absmax(w.float(), group_size).clamp_min(torch.finfo(torch.float32).tiny)
    groups = wg.reshape(-1, wg.shape[-1])  # (n_groups, g)
    amax = absmax.reshape(-1)
    per_group = None
    if importance is not None:
        if importance.shape != (w.shape[1],):
            raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({w.shape[1]},), one per input column")
        # (in / g, g): row k of `groups` is group k % (in / g) of its weight row
        per_group = importance.float().reshape(wg.shape[1], wg.shape[2])
    best_scale = torch.empty_like(amax)
    rows = max(1, chunk_elements // groups.shape[1])
    ratios = [1.0 - (1.0 - min_ratio) * i / grid for i in range(grid + 1)]
    for a in range(0, groups.shape[0], rows):
        x, am = groups[a : a + rows], amax[a : a + rows]
        best_err = torch.full_like(am, float("inf"))
        best = am / qmax
        buf = torch.empty_like(x)
        # this chunk's column weights, gathered once per chunk (not a copy of W's size for the whole matrix)
        col_weight = None
        if per_group is not None:
            col_weight = per_group[torch.arange(a, a + x.shape[0], device=x.device) % per_group.shape[0]]
        for ratio in ratios:
            s = ratio * am / qmax
            torch.mul(x, (1.0 / s)[:, None], out=buf)
            buf.round_().clamp_(qmin, qmax).mul_(s[:, None]).sub_(x).abs_().pow_(norm)  # |w_hat - w|^norm
            if col_weight is not None:
                buf.mul_(col_weight)
            err = buf.sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
        best_scale[a : a + rows] = best
    return best_scale.reshape(absmax.shape)


def choose_scales(w: torch.Tensor, bits: int, group_size: int | None, clip_search: bool,
                  importance: torch.Tensor | None = None) -> torch.Tensor:
    """Scales by clip search (weighted by ``importance`` (in,) when given), or plain max|w| / qmax (no clipping)
    when the search is off."""
    if clip_search:
        return search_scales(w, bits, group_size, importance=importance)
    _, qmax = qrange(bits)
    return (weight_absmax(w.float(), group_size) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
