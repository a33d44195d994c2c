"""Least-squares refit of group scales after GPTQ: the integers stay, each group's float scale is re-chosen to
minimise the layer's output error on the calibration inputs.

GPTQ chooses a group's scale once, by range setting on the (error-updated) weights of that group, i.e. for the
weights' own error, and then picks integers for it. Given those integers the output error is a quadratic in the
row's group scales, so the best scales have a closed form. For one row with integers q (in,), groups k = 1..G
(columns g·k .. g·k+g-1) and scales s (G,), the dequantized row is M s with M = [q restricted to group k]_k (in, G),
and the GPTQ objective ``(M s - w)ᵀ H (M s - w)`` is minimised by

    A s = b,   A = Mᵀ H M (G, G): A_kl = Σ_{a∈k, c∈l} q_a H_ac q_c,   b = Mᵀ H w: b_k = Σ_{a∈k} q_a (H w)_a.

With the float target, ``w`` is the fitted W* and H is H̃ (quant/apply.py), so the same solve minimises the
distance to the float model's output. A small ridge pulls s towards GPTQ's scales (and keeps groups whose
integers are all zero at their old scale). The export format is unchanged: int4 integers in [-8, 7] and one
float32 scale per group, which ExecuTorch dequantizes as q x scale whatever value the scale holds.

Written here because no quantization library exposes a scale refit for fixed integers under a Hessian objective
(llama.cpp's k-quants fit a scale per block against importance weights on the weights alone, not on H).
"""

from __future__ import annotations

import torch

from spinquant.quant.primitives import row_slices

REFIT_RIDGE = 1e-4  # fraction of A's diagonal added to it (towards GPTQ's scales): conditioning only
REFIT_CHUNK_ELEMENTS = 1 << 21  # rows x in float32 products per chunk (8 MiB: one group's product stays in cache)


@torch.no_grad()
def group_normal_matrices(q: torch.Tensor, h: torch.Tensor, group_size: int) -> torch.Tensor:
    """A (rows, G, G) float32 with A[r, k, l] = Σ_{a∈k, c∈l} q[r, a] H[a, c] q[r, c], for integers ``q`` (rows, in) and
    ``h`` (in, in) symmetric.

    One group k at a time: the (rows, g) integers of group k times H's rows of group k and the columns from group k
    on (a product whose inner dimension is only g), multiplied by the integers and summed per group, gives the upper
    triangle's row k; the lower triangle is its mirror. Computing all groups in one batched product instead writes a
    rows x in x G intermediate to memory and reads it back, which is memory-bound (ten times slower on a CPU at 1B).
    Float32 products of integers and H (relative error ~1e-7 of A, far below the ridge); the solve is in float64.
    """
    rows, in_f = q.shape
    g = group_size
    n_g = in_f // g
    a = torch.zeros(rows, n_g, n_g, dtype=torch.float32, device=q.device)
    qf = q.float()
    for k in range(n_g):
        c0 = k * g
        hq = qf[:, c0 : c0 + g] @ h[c0 : c0 + g, c0:]  # (rows, in - c0)
        a[:, k, k:] = (hq.mul_(qf[:, c0:])).reshape(rows, n_g - k, g).sum(-1)
    upper = a.triu()
    return upper + upper.transpose(1, 2) - torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))


@torch.no_grad()
def refit_group_scales(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, h: torch.Tensor,
                       group_size: int | None, ridge: float = REFIT_RIDGE) -> torch.Tensor:
    """The scales (rows, G) minimising ``(dequant(q, s) - w) H (dequant(q, s) - w)ᵀ`` row by row, integers ``q`` fixed.

    Shapes: w (rows, in) float, q (rows, in) integers, scales (rows, G) float32 with G = in / group_size (1 when
    ``group_size`` is None: per channel), h (in, in) symmetric positive semi-definite. A and b are float32 products
    (:func:`group_normal_matrices`), the G x G systems are solved in float64.
    A row whose solution has a scale <= 0 keeps its old scales (a negative scale flips the integers' sign: legal
    arithmetic, but a symptom of a group with almost no signal, where the old scale is the safer guess).
    Returns float32 scales on ``scales``' device; never raises for dead inputs or all-zero groups.
    """
    rows, in_f = w.shape
    g = group_size or in_f
    n_g = in_f // g
    hf = h.float()
    out = scales.clone().float()
    for r in row_slices(rows, in_f, REFIT_CHUNK_ELEMENTS):
        qf = q[r].float()
        s0 = scales[r].double()
        b = (qf * (w[r].float() @ hf)).reshape(-1, n_g, g).sum(-1).double()  # (rows, G)
        a = group_normal_matrices(q[r], hf, g).double()  # (rows, G, G)
        diag = torch.diagonal(a, dim1=1, dim2=2)
        empty = diag <= 0  # all-zero integers (or dead inputs): the scale does not matter, keep it
        reg = ridge * diag + empty.double()
        a = a + torch.diag_embed(reg)
        b = b + reg * s0
        s = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
        bad = ~(s > 0).all(dim=1)
        s[bad] = s0[bad]
        out[r] = s.float()
    return out.to(scales.device)
