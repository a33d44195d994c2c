"""Quantization formulas, bit-identical to torchao 0.18 / ExecuTorch 1.5.1 (the ``.pte``'s reference).

These are written out here (about 40 lines) rather than calling torchao's ``choose_qparams_affine`` /
``quantize_affine`` because the fake-quant forward needs a straight-through estimator for learning
rotations and must run under autograd on any device; tests/test_quant_primitives.py checks every
formula against torchao's own functions bit for bit.

Formulas (per block = per group of a weight row, or per token of an activation):
- symmetric weights, b bits: q = clamp(round(w * (1 / s)), -2^(b-1), 2^(b-1)-1), w_hat = q * s,
  with s chosen by range setting (``s = clip * max|w| / (2^(b-1)-1)``; torchao's own default is
  ``max|w| / ((qmax - qmin) / 2)``, e.g. /7.5 for int4, which clips the largest weight).
- asymmetric per-token activations, b bits: lo = min(min x, 0), hi = max(max x, 0),
  s = max((hi - lo) / (2^b - 1), eps), z = clamp(qmin - round(lo / s), qmin, qmax),
  q = clamp(round(x * (1 / s)) + z, qmin, qmax), x_hat = (q - z) * s.
  eps = float32 machine epsilon in the 4-bit-weight linears, float32 smallest normal in the
  8-bit output layer (torchao's default) -- exactly as ExecuTorch's two linears do.
- symmetric per-token activations (research settings): s = max|x| / (2^(b-1)-1).
``round`` is round-half-to-even (torch.round), as in torchao.

Gradients (rotation learning): ``round`` passes the gradient straight through (STE), and the scales
stay differentiable through max|w| / the token's min and max (zero points are detached). The scale
path carries the signal that matters: its gradient, sum_j g_j * (round(x_j/s) - x_j/s) * ds/dx, has
the expectation (rounding residuals as uniform noise of variance s^2/12) of the gradient of the
expected loss increase 1/2 * tr(Hessian) * s^2/12, so a rotation learns to shrink the ranges the loss
is sensitive to. With detached scales the STE gradient only "rotates the frozen rounding error",
which does not lower the quantized loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS_8DA4W = torch.finfo(torch.float32).eps  # Int8DynActInt4WeightLinear's per-token eps
EPS_8DA8W = torch.finfo(torch.float32).smallest_normal  # Int8DynActInt8WeightLinear's (torchao default)


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of a signed b-bit integer: int4 -> (-8, 7), int8 -> (-128, 127)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, in / g, g); per-channel (group None) -> (out, 1, in)."""
    out_f, in_f = w.shape
    g = in_f if not group_size else group_size
    return w.reshape(out_f, in_f // g, g)


def weight_absmax(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """max |w| per group: (out, in / g)."""
    return _grouped(w, group_size).abs().amax(dim=-1)


def weight_scales(w: torch.Tensor, bits: int, group_size: int | None, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Symmetric scales (out, in / g) = clip * max|w| / qmax, floored at a tiny positive value for all-zero groups."""
    _, qmax = qrange(bits)
    return (clip * weight_absmax(w, group_size) / qmax).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_weight(w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Integers q (int8 tensor, (out, in)) of w under per-group scales (out, in / g)."""
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(_grouped(w, group_size) * (1.0 / scales[..., None])), qmin, qmax)
    return q.reshape(w.shape).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit integers a byte: q int8 (..., n) in [-8, 7], n even -> uint8 (..., n / 2), column 2j in the
    low nibble and 2j+1 in the high one (two's complement). Lossless (:func:`unpack_int4` inverts it); a 4-bit model
    then holds half a byte a weight in memory. (torchao's nibble packers are unsigned and in prototype modules.)"""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"int4 packing needs integers in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = q.to(torch.int8).view(torch.uint8) & 0xF
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 integers (..., 2 m) of :func:`pack_int4`'s uint8 (..., m): arithmetic shifts sign-extend each nibble."""
    low = (packed << 4).view(torch.int8) >> 4
    high = packed.view(torch.int8) >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int | None, dtype=torch.float32) -> torch.Tensor:
    """q * s per group, in ``dtype`` (torchao's dequantize_affine with zero point 0)."""
    qg = _grouped(q.to(dtype), group_size)
    return (qg * scales.to(dtype)[..., None]).reshape(q.shape)


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Round-to-nearest fake quantization of a weight with STE (used while learning rotations at W4)."""
    qmin, qmax = qrange(bits)
    s = weight_scales(w, bits, group_size, clip)[..., None]  # differentiable: see the module docstring
    wg = _grouped(w, group_size)
    return (torch.clamp(round_ste(wg / s), qmin, qmax) * s).reshape(w.shape)


def fake_quant_weight_given_integers(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Forward ``q * scales`` (integers (out, in) and scales (out, in / g) chosen elsewhere: GPTQ in the learning
    loop); gradient: identity (STE) plus the scale path, the scales tied to each group's max|w| at their clip
    ratio, so d/dw = 1 + (q - w/s) * ds/dw -- the residuals of these integers, not of round-to-nearest."""
    absmax = weight_absmax(w, group_size).clamp_min(torch.finfo(torch.float32).tiny)
    s = (absmax * (scales / absmax).detach())[..., None]
    u = _grouped(w, group_size) / s
    return (s * (u + (_grouped(q.to(u.dtype), group_size) - u).detach())).reshape(w.shape)


def fake_quant_per_token_asym(x: torch.Tensor, bits: int, eps: float = EPS_8DA4W, clip: float = 1.0) -> torch.Tensor:
    """torchao's per_token_dynamic_quant (asymmetric, per last-dim row), STE through the rounding.

    Computed in float32 whatever the input dtype, returned in the input dtype.
    """
    dtype = x.dtype
    x = x.float()
    qmin, qmax = qrange(bits)
    lo = torch.clamp(x.amin(dim=-1, keepdim=True) * clip, max=0.0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True) * clip, min=0.0)
    s = torch.clamp((hi - lo) / float(qmax - qmin), min=eps)  # differentiable: see the module docstring
    z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax).detach()
    q = torch.clamp(round_ste(x * (1.0 / s)) + z, qmin, qmax)
    return ((q - z) * s).to(dtype)


def fake_quant_per_token_sym(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Symmetric per-token fake quantization (research settings), STE."""
    dtype = x.dtype
    x = x.float()
    qmin, qmax = qrange(bits)
    s = torch.clamp(x.abs().amax(dim=-1, keepdim=True) * clip / qmax, min=EPS_8DA4W)
    return (torch.clamp(round_ste(x / s), qmin, qmax) * s).to(dtype)


FIXED_LINEAR_CHUNK_ELEMENTS = 1 << 25  # weight elements dequantized at a time (128 MiB of float32)


def row_slices(n_rows: int, n_cols: int, elements: int) -> list[slice]:
    """Slices covering ``range(n_rows)``, each of at most ``elements // n_cols`` rows (at least one): row-independent
    work on a large matrix (a 128256-row embedding or output layer) done a chunk at a time keeps its temporaries at
    a chunk's size."""
    step = max(1, elements // max(1, n_cols))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def linear_by_rows(x: torch.Tensor, shape: tuple[int, int], weight_rows, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a weight W of ``shape`` (out, in) that is never whole: ``weight_rows(rows)`` makes
    its rows ``rows`` (a slice), FIXED_LINEAR_CHUNK_ELEMENTS at a time (dequantized, or upcast from bf16)."""
    out = x.new_empty(*x.shape[:-1], shape[0])
    for rows in row_slices(*shape, FIXED_LINEAR_CHUNK_ELEMENTS):
        out[..., rows] = F.linear(x, weight_rows(rows), None if bias is None else bias[rows])
    return out


class _FixedLinear(torch.autograd.Function):
    """``x @ (q * s)ᵀ`` with ``s = scales * exp(θ)``, the weight dequantized a chunk of rows at a time, in the forward
    and again in the backward (module-level :func:`fixed_linear`). Gradients: x and θ (the integers are fixed)."""

    @staticmethod
    def forward(ctx, x, q, scales, log_offset, group_size, bias):
        s = scales if log_offset is None else scales * log_offset.exp()
        out = linear_by_rows(x, q.shape, lambda rows: dequantize_weight(q[rows], s[rows], group_size, x.dtype), bias)
        ctx.save_for_backward(x, q, s)
        ctx.group_size, ctx.has_offset = group_size, log_offset is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, q, s = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        grad_x = torch.zeros_like(xs) if ctx.needs_input_grad[0] else None
        grad_s = torch.zeros_like(s) if ctx.has_offset and ctx.needs_input_grad[3] else None
        for rows in row_slices(*q.shape, FIXED_LINEAR_CHUNK_ELEMENTS):
            if grad_x is not None:
                grad_x += g[:, rows] @ dequantize_weight(q[rows], s[rows], ctx.group_size, x.dtype)
            if grad_s is not None:  # dL/ds_rk = Σ_{c∈k} q_rc (gᵀx)_rc
                grad_s[rows] = _grouped((g[:, rows].T @ xs) * q[rows].to(x.dtype), ctx.group_size).sum(-1).to(s.dtype)
        return (None if grad_x is None else grad_x.reshape(x.shape), None, None,
                None if grad_s is None else grad_s * s, None, None)  # s = scales exp(θ): ds/dθ = s; no bias gradient


def fixed_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group_size: int | None,
                 log_offset: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_weight(q, scales * exp(log_offset)), bias)`` without the whole float weight in memory: the
    weight (out, in) is dequantized FIXED_LINEAR_CHUNK_ELEMENTS at a time (a 128256-row output layer in pieces), in
    the forward and again in the backward. Differentiable in ``x`` and ``log_offset`` (out, in/g): the scale tuning's
    parameters (the float ``bias`` gets no gradient). A weight of one chunk is exactly ``F.linear`` on the whole
    dequantized weight, under plain autograd."""
    if len(row_slices(*q.shape, FIXED_LINEAR_CHUNK_ELEMENTS)) == 1:
        s = scales if log_offset is None else scales * log_offset.exp()
        return F.linear(x, dequantize_weight(q, s, group_size, x.dtype), bias)
    return _FixedLinear.apply(x, q, scales, log_offset, group_size, bias)
