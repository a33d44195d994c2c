"""Our quantization formulas equal torchao's (ExecuTorch's) bit for bit; STE gives gradients."""

import pytest
import torch
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine
from torchao.quantization.utils import per_token_dynamic_quant

from spinquant.quant.primitives import (EPS_8DA4W, EPS_8DA8W, dequantize_weight, fake_quant_per_token_asym,
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


def test_straight_through_gradients():
    x = torch.randn(4, 32, requires_grad=True)
    fake_quant_per_token_asym(x, 4).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x), atol=1e-6)
