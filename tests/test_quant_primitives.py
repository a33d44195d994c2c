"""Our quantization formulas equal torchao's (ExecuTorch's) bit for bit; STE gives gradients."""

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine
from torchao.quantization.utils import per_token_dynamic_quant

from spinquant.quant.primitives import (EPS_8DA4W, EPS_8DA8W, dequantize_weight, pack_int4, unpack_int4, fake_quant_per_token_asym, fake_quant_weight,
                                        fake_quant_weight_given_integers,
                                        quantize_weight, weight_scales)
from spinquant.quant.range_setting import search_scales


def _acts():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 96) * torch.logspace(-2, 2, 96)  # outlier channels
    x[0, 0] = 0.0  # an all-zero token: the eps path
    x[1, 1] = x[1, 1].abs()  # all-positive token: zero point at qmin
    return x


@pytest.mark.parametrize("eps", [EPS_8DA4W, EPS_8DA8W])
def test_per_token_activation_quant_is_torchao_bit_for_bit(eps):
    x = _acts()
    ours = fake_quant_per_token_asym(x, 8, eps)
    theirs = per_token_dynamic_quant(x, scale_dtype=torch.float32, zero_point_dtype=torch.float32, eps=eps) \
        if eps == EPS_8DA4W else per_token_dynamic_quant(x)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, None), (8, None)])
def test_weight_quant_dequant_is_torchao_bit_for_bit(bits, group):
    torch.manual_seed(1)
    w = torch.randn(48, 128) * 0.05
    s = weight_scales(w, bits, group, clip=0.9)
    q = quantize_weight(w, s, bits, group)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    block = (1, group or 128)
    zeros = torch.zeros_like(s)
    q_ao = quantize_affine(w, block, s, zeros, torch.int8, qmin, qmax)
    assert torch.equal(q, q_ao)
    assert torch.equal(dequantize_weight(q, s, group), dequantize_affine(q_ao, block, s, zeros, torch.int8, qmin, qmax))
    assert q.min() >= qmin and q.max() <= qmax


def test_torchao_default_scale_rule_is_max_over_7_5():
    # what ExecuTorch would pick by itself; our range setting is free to choose better scales
    w = torch.randn(8, 32)
    s_ao, _ = choose_qparams_affine(w, MappingType.SYMMETRIC, (1, 32), torch.int8, -8, 7, eps=1e-9)
    assert torch.allclose(s_ao.reshape(8, 1), w.abs().amax(1, keepdim=True) / 7.5)


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(2)
    w = torch.randn(64, 256) ** 3  # heavy tails: clipping pays
    plain = weight_scales(w, 4, 32)
    searched = search_scales(w, 4, 32)
    assert (searched <= plain + 1e-12).all()

    def err(s):
        d = dequantize_weight(quantize_weight(w, s, 4, 32), s, 32) - w
        return d.reshape(64, 8, 32).abs().pow(2.4).sum(-1)

    assert (err(searched) <= err(plain) + 1e-6).all() and err(searched).sum() < 0.9 * err(plain).sum()


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_chunked_clip_search_equals_the_whole_matrix_formula(bits, group):
    """The cache-sized chunks (here a few groups each, with a ragged last chunk) choose exactly the scales of the
    plain formula: for every ratio, sum |clamp(round(w / s)) s - w|^2.4 over the group, keep the smallest."""
    from spinquant.quant.primitives import _grouped, qrange, weight_absmax

    torch.manual_seed(1)
    w = torch.randn(37, 96) * 0.02
    w[3, 5] = 0.4  # an outlier, so that clipping pays for some groups
    qmin, qmax = qrange(bits)
    wg = _grouped(w, group)
    absmax = weight_absmax(w, group).clamp_min(torch.finfo(torch.float32).tiny)
    best_err, expected = torch.full_like(absmax, float("inf")), absmax / qmax
    for i in range(51):
        s = (1.0 - 0.5 * i / 50) * absmax / qmax
        err = (torch.clamp(torch.round(wg * (1.0 / s[..., None])), qmin, qmax) * s[..., None] - wg).abs().pow(2.4).sum(-1)
        expected = torch.where(err < best_err, s, expected)
        best_err = torch.minimum(err, best_err)
    got = search_scales(w, bits, group, chunk_elements=5 * wg.shape[-1])
    assert torch.equal(got, expected) and (got < absmax / qmax).any()


def test_straight_through_gradients_reach_the_scales():
    """STE on round (gradient 1 for every element) plus the scale path at each token's min and max element:
    d/d hi = -d/d lo = sum_j g_j r_j / 15 with r_j = round(x_j/s) - x_j/s (zero point detached)."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.float64).clamp(-2.0, 2.0)
    x[:, 0] = 3.0  # a clear max and min per token, nothing clamped
    x[:, 1] = -2.5
    g = torch.randn(4, 32, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    fake_quant_per_token_asym(xr, 4).backward(g)
    s = (3.0 + 2.5) / 15
    r = torch.round(x / s) - x / s
    scale_term = (g * r).sum(-1) / 15
    expected = g.clone()
    expected[:, 0] += scale_term
    expected[:, 1] -= scale_term
    assert torch.allclose(xr.grad, expected.to(xr.grad.dtype), atol=1e-5)
    assert scale_term.abs().min() > 1e-3  # the scale path is really there

    w = torch.randn(8, 64, requires_grad=True)
    fake_quant_weight(w, 4, 32).sum().backward()
    absmax_pos = w.detach().abs().reshape(8, 2, 32).argmax(-1)
    grad = w.grad.reshape(8, 2, 32)
    others = torch.ones_like(grad, dtype=torch.bool).scatter_(-1, absmax_pos[..., None], False)
    assert torch.allclose(grad[others], torch.ones_like(grad[others]))  # STE elsewhere
    assert (grad.gather(-1, absmax_pos[..., None]) != 1).all()  # the group maximum feeds the scale


def test_weight_given_integers_forward_and_gradient():
    """GPTQ-in-the-loop weights: forward q * s exactly; gradient 1 everywhere plus, at each group's max|w|,
    the scale path with these integers' residuals: sign(w_max) / max|w| * ratio-scaled sum_j (q_j - w_j / s)."""
    torch.manual_seed(0)
    w = torch.randn(4, 64, dtype=torch.float64)
    scales = 0.9 * weight_scales(w, 4, 32)  # a clip ratio of 0.9, as range setting might choose
    q = quantize_weight(w, scales, 4, 32)
    q[0, 3] += 1  # integers that are not round-to-nearest (GPTQ moves some)
    wr = w.clone().requires_grad_(True)
    out = fake_quant_weight_given_integers(wr, q, scales, 32)
    assert torch.allclose(out.detach(), dequantize_weight(q, scales, 32, torch.float64), rtol=1e-12, atol=0)
    out.sum().backward()
    g = wr.grad.reshape(4, 2, 32)
    wg, qg, sg = w.reshape(4, 2, 32), q.reshape(4, 2, 32).double(), scales[..., None]
    pos = wg.abs().argmax(-1, keepdim=True)
    # d s / d w_max = s / max|w| * sign(w_max); the scale term sums the residuals (q - w/s) of the group
    scale_term = (qg - wg / sg).sum(-1, keepdim=True) * sg / wg.abs().amax(-1, keepdim=True) * torch.sign(wg.gather(-1, pos))
    expected = torch.ones_like(g).scatter_add_(-1, pos, scale_term)
    assert torch.allclose(g, expected, atol=1e-9)




@pytest.mark.parametrize("group_size", [32, None])
def test_fixed_linear_in_row_chunks_equals_the_whole_weight(monkeypatch, group_size):
    """A large weight is dequantized a chunk of rows at a time: same output, same gradients (x and the log-scales)."""
    from spinquant.quant import primitives
    from spinquant.quant.primitives import dequantize_weight, fixed_linear

    torch.manual_seed(0)
    q = torch.randint(-8, 8, (40, 64), dtype=torch.int8)
    scales = torch.rand(40, 64 // (group_size or 64)) + 0.5
    bias = torch.randn(40)
    x = torch.randn(2, 5, 64, requires_grad=True)
    theta = (0.1 * torch.randn_like(scales)).requires_grad_(True)
    whole = F.linear(x, dequantize_weight(q, scales * theta.exp(), group_size), bias)
    whole.square().sum().backward()
    gx, gt = x.grad.clone(), theta.grad.clone()
    x.grad = theta.grad = None
    monkeypatch.setattr(primitives, "FIXED_LINEAR_CHUNK_ELEMENTS", 64 * 16)  # 3 chunks of 16, 16, 8 rows
    assert primitives.row_slices(*q.shape, primitives.FIXED_LINEAR_CHUNK_ELEMENTS) == [slice(0, 16), slice(16, 32), slice(32, 40)]
    chunked = fixed_linear(x, q, scales, group_size, theta, bias)

    def rel(a, b):  # float32 sums in another order: relative to the tensor's scale
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(chunked, whole) < 1e-6
    chunked.square().sum().backward()
    assert rel(x.grad, gx) < 1e-5 and rel(theta.grad, gt) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(fixed_linear(x, q, scales, group_size), F.linear(x, dequantize_weight(q, scales, group_size)))


def test_int4_packing_is_lossless_and_half_a_byte():
    """Every int4 value in every nibble position survives pack -> unpack; the packed tensor is half the int8 size."""
    q = torch.tensor([[a, b] for a in range(-8, 8) for b in range(-8, 8)], dtype=torch.int8).reshape(16, 32)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 16)
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0].item() == 0x88  # (-8, -8): two's complement nibbles 1000, low nibble = column 0
    assert pack_int4(torch.tensor([[1, -1]], dtype=torch.int8))[0, 0].item() == 0xF1
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
