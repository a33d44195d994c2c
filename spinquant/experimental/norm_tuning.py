"""The end-to-end scale tuning (spinquant.quant.scale_tuning) with the RMSNorm weights tuned as well.

``g = g0 * exp(φ)`` per channel, φ from 0, trained by the scale tuning's optimiser: every decoder layer's norms that
feed linears and the final one. In the rotated basis a norm weight scales one input column of q/k/v (or gate/up, or
the output layer) in every row, before the activations are quantized: a degree of freedom the group scales do not
have, and one the checkpoint already carries (ExecuTorch's RMSNorm multiplies by the stored weight). No gain at
8da4w; -5.8% KL at W4A4KV4 on a learned rotation (docs/experimental.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from spinquant.architectures import architecture_of
from spinquant.quant.scale_tuning import ScaleTuningConfig, relative_change, tune_scales


class LogScaled(nn.Module):
    """A parametrization ``w -> w * exp(φ)`` with φ (n,) a parameter from 0 (torch.nn.utils.parametrize)."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.log_offset = nn.Parameter(torch.zeros(n, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.log_offset.exp().to(weight.dtype)


def tune_scales_and_norms(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: ScaleTuningConfig,
                          progress: bool = True) -> nn.Module:
    """:func:`tune_scales` with the norms' φ trained too; a finished run bakes them into the norm weights, a failed
    one leaves the weights as they were. Adds ``norm_relative_change`` to ``cfg.stats``."""
    norms = architecture_of(model.config).norms(model) if cfg.steps else []
    phis = []
    for _, norm in norms:
        parametrize.register_parametrization(norm, "weight", LogScaled(norm.weight.shape[0], norm.weight.device))
        phis.append(norm.parametrizations.weight[0].log_offset)
    baked = False
    try:
        tune_scales(model, teacher, windows, cfg, progress=progress, extra_params=phis)
        baked = True
    finally:
        for _, norm in norms:
            parametrize.remove_parametrizations(norm, "weight", leave_parametrized=baked)
            norm.weight.requires_grad_(False)
    if phis:
        cfg.stats["norm_relative_change"] = relative_change(phis)
    return model
