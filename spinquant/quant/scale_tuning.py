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

``extra_params`` are trained with the scales by the same optimiser (spinquant.experimental.norm_tuning tunes the
RMSNorm weights this way).

Written here because the quantization libraries at hand train scales only inside their own QAT modules and models
(torchao's QAT fake-quantizers re-derive scales from the weights; EfficientQAT's code is a research repository for
its own model wrappers), not for fixed integers in an ExecuTorch-format model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from spinquant.architectures import architecture_of
from spinquant.kl_loss import chunked_kl, layer_checkpointing
from spinquant.memory import heap_trimmed_before, trimming_pays
from spinquant.quant.fake_quant import QuantLinear, quant_linears
from spinquant.quant.scheme import DEFAULT_TUNE_LR


@dataclass
class ScaleTuningConfig:
    """``steps`` windows (one per step, each seen once), Adam ``lr`` on the log-scale offsets θ, cosine decay."""

    steps: int = 0
    lr: float = DEFAULT_TUNE_LR
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"scale tuning steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"scale tuning learning rate must be positive, got {self.lr}")


def tunable_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """The quantized linears whose scales are tuned: every QuantLinear fixed to integers (block linears, output layer)."""
    return [(name, lin) for name, lin in quant_linears(model) if lin.weight_mode == "fixed"]


def start_log_offsets(linears: list[QuantLinear]) -> list[torch.Tensor]:
    """θ = 0 on each fixed linear's scales (its forward then uses ``scales * exp(θ)``); returns the θs to train."""
    for lin in linears:
        lin.scale_log_offset = torch.zeros_like(lin.scales, requires_grad=True)
    return [lin.scale_log_offset for lin in linears]


def end_log_offsets(linears: list[QuantLinear], bake: bool) -> None:
    """Remove the θs, first multiplying the scales by exp(θ) when ``bake`` (a finished run; a failed one keeps them)."""
    with torch.no_grad():
        for lin in linears:
            if bake and lin.scale_log_offset is not None:
                lin.scales = (lin.scales * lin.scale_log_offset.detach().exp()).float()
            lin.scale_log_offset = None


def adam_cosine(params: list[torch.Tensor], lr: float, steps: int):
    """Adam with a cosine decay to 0 over ``steps``: the (optimizer, scheduler) both tunings use."""
    opt = torch.optim.Adam(params, lr=lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)


def descend(opt, sched, loss: torch.Tensor) -> float:
    """One step on ``loss``; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def relative_change(log_offsets: list[torch.Tensor]) -> dict[str, float]:
    """Mean and max |exp(θ) - 1| over all entries of ``log_offsets``."""
    change = torch.cat([t.detach().flatten() for t in log_offsets]).exp().sub(1.0).abs()
    return {"mean": change.mean().item(), "max": change.max().item()}


def tune_scales(model: nn.Module, teacher, windows: torch.Tensor, cfg: ScaleTuningConfig,
                progress: bool = True, extra_params: list[torch.Tensor] = ()) -> nn.Module:
    """Tune the scales of ``model``'s fixed linears in place (module docstring); returns ``model``.

    ``teacher``: a float model of the same function (the original, or the rotated float copy) on the same device, or
    anything with its ``final_hidden(ids)`` (the hidden states after the final norm, (1, T, dim)) and its ``head``
    (spinquant.streaming.FloatReference, built for ``windows``: the float model never whole in memory).
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
    amp = device.type == "cuda"
    arch = architecture_of(model.config)
    if isinstance(teacher, nn.Module):
        teacher.requires_grad_(False)
        teacher_head = teacher.get_submodule(arch.head)
        backbone = teacher.get_submodule(arch.backbone)

        def teacher_hidden_of(ids: torch.Tensor) -> torch.Tensor:
            return backbone(ids, use_cache=False).last_hidden_state
    else:
        teacher_head, teacher_hidden_of = teacher.head, teacher.final_hidden
    linears = [lin for _, lin in named]
    thetas = start_log_offsets(linears)
    was_training = model.training
    layer_checkpointing(model, True)
    opt, sched = adam_cosine(thetas + list(extra_params), cfg.lr, cfg.steps)
    losses: list[float] = []
    t0 = time.perf_counter()
    finished = False
    # a large model on the CPU: the heap trimmed where each layer's attention and MLP start, so that it holds one
    # half-layer's temporaries (the placements measured: benchmarks/RESULTS.md, table 16)
    try:
        with heap_trimmed_before(arch.sublayer_start_modules(model), enabled=trimming_pays(model)):
            for step in tqdm(range(cfg.steps), desc="tune scales", unit="step", disable=not progress):
                ids = windows[step : step + 1].to(device)
                with torch.no_grad():
                    teacher_hidden = teacher_hidden_of(ids)[:, :-1]
                hidden = model.get_submodule(arch.backbone)(ids, use_cache=False).last_hidden_state[:, :-1]
                loss = chunked_kl(model.get_submodule(arch.head), teacher_head, hidden, teacher_hidden, amp) / hidden.shape[1]
                losses.append(descend(opt, sched, loss))
        finished = True
    finally:  # a failed run leaves the scales as they were
        end_log_offsets(linears, bake=finished)
        layer_checkpointing(model, False)
        model.train(was_training)
    cfg.stats.update({"losses": losses, "seconds": time.perf_counter() - t0, "relative_change": relative_change(thetas)})
    return model
