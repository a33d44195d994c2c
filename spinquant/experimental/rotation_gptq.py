"""GPTQ in the rotation-learning loop: the forward sees the int4 weights GPTQ would choose for the current rotations.

Why: learning against round-to-nearest (RTN) int4 weights lowers the RTN loss, but the final model is
quantized by GPTQ, which re-optimises the integers with each layer's Hessian and can erase that gain.
With ``LearnConfig.weight_quant = "gptq"`` every
step quantizes the rotated weights with GPTQ and hands the integers and scales to the forward through
``QuantLinear.weight_integers``: the loss is the post-GPTQ model's; the gradient is the straight-through
estimator plus the scale path with GPTQ's own residuals (quant/primitives.py).

The Hessians are collected once, from the inputs of every linear of the float model (norms fused, R4
folded, R1/R2 not applied) on calibration windows, and rotated analytically each step: a linear whose
weight becomes ``W Q`` sees the inputs ``Qᵀ x``, so its Hessian becomes ``Qᵀ H Q`` (Q = R1 for q/k/v
and gate/up, blockdiag(R2) for o_proj); down_proj's input (after R4) does not depend on R1/R2. Float
inputs stand in for the sequentially quantized inputs the final GPTQ sees (GPTQ's usual approximation
when layers are quantized independently).
"""

from __future__ import annotations

import torch
from torch import nn

from spinquant.architectures import Architecture, architecture_of
from spinquant.quant.fake_quant import QuantLinear
from spinquant.quant.gptq import HessianAccumulator, gptq_quantize
from spinquant.quant.scheme import FLOAT

Hessians = dict[tuple[int, str], torch.Tensor]  # (layer, first linear of one of the map's groups) -> (in, in)


@torch.no_grad()
def collect_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> Hessians:
    """H = 2/n Σ x xᵀ of each linear group's float input over ``windows`` (n, seqlen), for a model
    prepared by :func:`spinquant.rotation.prepare_model` (activation quantization and weight fake
    quantization are switched off while the inputs are observed, then restored)."""
    device = next(model.parameters()).device
    saved, accs = {}, {}
    for i, layer in enumerate(architecture_of(model.config).decoder_layers(model)):
        for group in architecture_of(model.config).groups:
            for name in group:
                lin = layer.get_submodule(name)
                saved[lin] = (lin.a_bits, lin.weight_mode)
                lin.a_bits, lin.weight_mode = FLOAT, "float"
            first: QuantLinear = layer.get_submodule(group[0])
            acc = accs[(i, group[0])] = HessianAccumulator(first.in_features, device)
            first.observer = acc.add
    try:
        for b in range(0, windows.shape[0], batch_size):
            model(windows[b : b + batch_size].to(device), use_cache=False)
    finally:
        for lin, (a_bits, mode) in saved.items():
            lin.a_bits, lin.weight_mode, lin.observer = a_bits, mode, None
    return {k: acc.h for k, acc in accs.items()}


def _input_rotation(arch: Architecture, first: str, r1: torch.Tensor, r2_layer: torch.Tensor,
                    n_heads: int) -> torch.Tensor | None:
    """The rotation on the input side of the map's linear ``first`` (R1, or R2 per head as one block-diagonal
    matrix); None where its input does not depend on R1/R2 (R4 is folded before the Hessians are collected)."""
    side = arch.linear(first).input
    if side == "R1":
        return r1
    if side == "R2":
        return torch.block_diag(*[r2_layer] * n_heads)
    return None


@torch.no_grad()
def gptq_integers(arch: Architecture, rotated: dict[str, torch.Tensor], hessians: Hessians, r1: torch.Tensor,
                  r2: torch.Tensor, n_heads: int, bits: int, group_size: int | None,
                  clip_search: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ's (integers (out, in) float32, scales (out, in / g)) for every block linear's rotated weight ``rotated[name]``.

    ``r1`` (dim, dim), ``r2`` (n_layers, head_dim, head_dim): the rotations the weights were rotated by,
    used to rotate the collected Hessians. Linears sharing an input (q/k/v, gate/up) are quantized in
    one GPTQ pass, as in the final quantization.
    """
    chosen = {}
    for (i, first), h in hessians.items():
        group = next(g for g in arch.groups if g[0] == first)
        names = [f"{arch.layers}.{i}.{n}.weight" for n in group]
        w = torch.cat([rotated[n].detach().float() for n in names])
        q = _input_rotation(arch, first, r1.detach().float(), r2[i].detach().float(), n_heads)
        h_rot = h if q is None else q.T @ h @ q
        qint, scales = gptq_quantize(w, h_rot, bits, group_size, clip_search)
        rows = [rotated[n].shape[0] for n in names]
        for name, part_q, part_s in zip(names, qint.float().split(rows), scales.split(rows)):
            chosen[name] = (part_q.contiguous(), part_s.contiguous())
    return chosen
