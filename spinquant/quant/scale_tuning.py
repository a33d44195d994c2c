"""End-to-end tuning of a quantized model's weight scales, integers fixed, on KL to the float model.

GPTQ picks each linear's integers and scales to reproduce that linear's output on the calibration inputs (and the
least-squares refit, quant/scale_refit.py, re-fits the scales to the same per-linear objective). Neither sees what a
linear's error does downstream. This stage trains the scales of every quantized linear together by gradient descent
on KL(float model || quantized model) per token over calibration text -- the quantity the result is judged by --
with the integers frozen: the objective of EfficientQAT's end-to-end step of training quantization parameters only
(E2E-QP, Chen et al. 2024), here after GPTQ instead of after block-wise training.

Parameterisation: ``s = s_GPTQ * exp(θ)`` per group (per row for the per-channel output layer), θ from 0, Adam with
cosine decay, one calibration window per step, so the learning rate is a relative change of the scales and every
step sees new text (one pass: tuning on the windows GPTQ fitted, or several passes over few windows, fits those
windows and not the text). The activations stay fake-quantized exactly as exported (straight-through estimator), so
the loss is the exported model's. The export format is unchanged: int4 / int8 integers and one float32 scale per
group, which ExecuTorch dequantizes as q x scale whatever value the scale holds. The embedding (a table lookup whose
rows each see a few tokens of the text) keeps its scales.

With ``norms`` the RMSNorm weights are tuned as well (``g = g0 * exp(φ)`` per channel, φ from 0): every decoder
layer's two norms and the final one. In the rotated basis a norm weight scales one input column of q/k/v (or
gate/up, or the output layer) in every row, before the activations are quantized: a degree of freedom the group
scales do not have, and one the checkpoint already carries (ExecuTorch's RMSNorm multiplies by the stored weight).

Written here because the quantization libraries at hand train scales only inside their own QAT modules and models
(torchao's QAT fake-quantizers re-derive scales from the weights; EfficientQAT's code is a research repository for
its own model wrappers), not for fixed integers in an ExecuTorch-format model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from spinquant.architectures import architecture_of
from spinquant.errors import SpinQuantError
from spinquant.kl_loss import chunked_kl
from spinquant.quant.fake_quant import QuantLinear, quant_linears
from spinquant.quant.scheme import DEFAULT_TUNE_LR


@dataclass
class ScaleTuningConfig:
    """``steps`` windows (one per step, each seen once), Adam ``lr`` on the log-scale offsets θ, cosine decay;
    ``norms``: tune the RMSNorm weights too (module docstring)."""

    steps: int = 0
    lr: float = DEFAULT_TUNE_LR
    norms: bool = False
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"scale tuning steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"scale tuning learning rate must be positive, got {self.lr}")
        if self.norms and not self.steps:  # the norms are tuned inside the scale tuning: without steps, nothing would be
            raise SpinQuantError("--tune-norms tunes the norms inside the scale tuning, which is off (--tune-scales-steps "
                                 "0): give --tune-scales-steps N (N > 0), or drop --tune-norms")


def tunable_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """The quantized linears whose scales are tuned: every QuantLinear fixed to integers (block linears, output layer)."""
    return [(name, lin) for name, lin in quant_linears(model) if lin.weight_mode == "fixed"]


def tunable_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The RMSNorms whose weights ``norms`` tunes: each layer's norms that feed linears (the map's), then the final norm."""
    return architecture_of(model.config).norms(model)


class _LogScaled(nn.Module):
    """A parametrization ``w -> w * exp(φ)`` with φ (n,) a parameter from 0 (torch.nn.utils.parametrize)."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.log_offset = nn.Parameter(torch.zeros(n, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.log_offset.exp().to(weight.dtype)


def _relative_change(log_offsets: list[torch.Tensor]) -> dict[str, float]:
    """Mean and max |exp(θ) - 1| over all entries of ``log_offsets``."""
    change = torch.cat([t.detach().flatten() for t in log_offsets]).exp().sub(1.0).abs()
    return {"mean": change.mean().item(), "max": change.max().item()}


def tune_scales(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: ScaleTuningConfig,
                progress: bool = True) -> nn.Module:
    """Tune the scales of ``model``'s fixed linears in place (module docstring); returns ``model``.

    ``teacher``: a float model of the same function (the original, or the rotated float copy) on the same device.
    ``windows`` (n >= cfg.steps, seqlen) int64: calibration windows, window k feeds step k. Records in ``cfg.stats``:
    ``losses`` (KL per token of each step's window, measured before that step's update: a held-out estimate, as no
    window is seen twice), ``seconds``, and ``relative_change`` (mean and max |exp(θ) - 1| of the tuned scales).
    """
    if cfg.steps == 0:
        return model
    if windows.shape[0] < cfg.steps:
        raise ValueError(f"scale tuning needs {cfg.steps} windows (one per step), got {windows.shape[0]}")
    named = tunable_linears(model)
    if not named:
        raise ValueError("no quantized linear to tune: quantize the model (GPTQ or RTN) first")
    device = named[0][1].scales.device
    teacher.requires_grad_(False)
    amp = device.type == "cuda"
    arch = architecture_of(model.config)
    thetas = []
    for _, lin in named:
        lin.scale_log_offset = torch.zeros_like(lin.scales, requires_grad=True)
        thetas.append(lin.scale_log_offset)
    norms = tunable_norms(model) if cfg.norms else []
    phis = []
    for _, norm in norms:
        parametrize.register_parametrization(norm, "weight", _LogScaled(norm.weight.shape[0], norm.weight.device))
        phis.append(norm.parametrizations.weight[0].log_offset)
    opt = torch.optim.Adam(thetas + phis, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    baked = False
    try:
        for step in tqdm(range(cfg.steps), desc="tune scales", unit="step", disable=not progress):
            ids = windows[step : step + 1].to(device)
            with torch.no_grad():
                teacher_hidden = teacher.get_submodule(arch.backbone)(ids, use_cache=False).last_hidden_state[:, :-1]
            hidden = model.get_submodule(arch.backbone)(ids, use_cache=False).last_hidden_state[:, :-1]
            loss = chunked_kl(model.get_submodule(arch.head), teacher.get_submodule(arch.head), hidden, teacher_hidden,
                              amp) / hidden.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        with torch.no_grad():
            for _, lin in named:
                lin.scales = (lin.scales * lin.scale_log_offset.detach().exp()).float()
        baked = True
    finally:  # a failed run leaves the scales (and norm weights) as they were; a finished one bakes the norms' φ
        for _, lin in named:
            lin.scale_log_offset = None
        for _, norm in norms:
            parametrize.remove_parametrizations(norm, "weight", leave_parametrized=baked)
            norm.weight.requires_grad_(False)
    cfg.stats.update({"losses": losses, "seconds": time.perf_counter() - t0, "relative_change": _relative_change(thetas)})
    if phis:
        cfg.stats["norm_relative_change"] = _relative_change(phis)
    return model
