"""The rotation learner's research settings: int4 weights in the loop (round-to-nearest, or the integers GPTQ would
choose for the current rotation: rotation_gptq.py), KL to the float model as the loss, and per-channel scales
(fusion.ChannelScales) learned with R1/R2, optionally from SmoothQuant's closed-form scales (smoothing.py).

None of them won on the deployed 8da4w target (docs/experimental.md); they are kept for 4-bit-activation research.
:class:`ResearchLearner` subclasses spinquant.rotation's learner and fills the seams it leaves empty, so that the
rotated-weights graph, the loss and the step stay the main path's; :func:`research_learner` is the factory that
``spinquant.pipeline.learn_rotations`` takes, and ``python -m spinquant.experimental learn-rotations`` the command.

Channel scales: log-scales with Adam in the same graph as R1/R2. The linears' scaled weights come out of
``rotation.rotated_weights``; forward hooks multiply the two RMSNorm outputs by their scales (the norm weights the
checkpoint will carry).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spinquant.errors import SpinQuantError
from spinquant.experimental.rotation_gptq import collect_hessians, gptq_integers
from spinquant.experimental.smoothing import smooth_scales
from spinquant.fusion import ChannelScales, Rotations
from spinquant.hadamard import hadamard_matrix
from spinquant.quant.scheme import FLOAT
from spinquant.rotation import LearnConfig, RotationLearner, hadamard_start, prepare_model


def check_research(cfg: LearnConfig) -> None:
    """The research options' own checks (LearnConfig.check has the common ones)."""
    if cfg.weight_quant not in ("rtn", "gptq"):
        raise SpinQuantError(f"unknown weight quantizer '{cfg.weight_quant}': choose rtn or gptq")
    if cfg.weight_quant == "gptq" and cfg.w_bits >= FLOAT:
        raise SpinQuantError("GPTQ in the learning loop needs int4/int8 weights while learning: set --w-bits 4")
    if cfg.scales and cfg.weight_quant == "gptq":
        raise SpinQuantError("learned channel scales with GPTQ in the learning loop is not supported (the loop's GPTQ "
                             "Hessians are collected once, before the scales move): use --weight-quant rtn")
    if cfg.scale_init is not None and not (cfg.scales and 0.0 <= cfg.scale_init <= 1.0):
        raise SpinQuantError(f"--scale-init {cfg.scale_init}: SmoothQuant's alpha must be in [0, 1], and it needs --scales")
    if cfg.scale_lr <= 0:
        raise SpinQuantError(f"scale learning rate {cfg.scale_lr} must be positive")
    if cfg.loss not in ("ce", "kl"):
        raise SpinQuantError(f"unknown loss '{cfg.loss}': choose ce (cross-entropy) or kl (distillation from the float model)")


def initial_scales(model: nn.Module, cfg: LearnConfig, windows: torch.Tensor) -> ChannelScales | None:
    """The scales the learner starts from for ``cfg.scale_init`` (None: 1), measured on the original float ``model``
    rotated by the learner's Hadamard start, over the first 8 learning ``windows`` (deterministic: a resumed run
    recomputes the same start)."""
    if not cfg.scales or cfg.scale_init is None:
        return None
    return smooth_scales(model, hadamard_start(model.config, cfg.seed), windows[:8], alpha=cfg.scale_init)


class ResearchLearner(RotationLearner):
    """RotationLearner with the research options of its LearnConfig (module docstring)."""

    research = True

    def __init__(self, model: nn.Module, windows: torch.Tensor, cfg: LearnConfig, device: torch.device,
                 state_dir: Path | None = None, progress: bool = True, teacher: nn.Module | None = None,
                 initial_scales: ChannelScales | None = None) -> None:
        """``teacher``: the original float model, needed for ``cfg.loss == "kl"`` (its logits are the target).
        ``initial_scales``: where the channel scales start (:func:`initial_scales`); None: 1."""
        check_research(cfg)
        if initial_scales is not None and not cfg.scales:
            raise ValueError("initial_scales without cfg.scales")
        if cfg.loss == "kl" and teacher is None:
            raise ValueError("loss 'kl' needs the float teacher model")
        super().__init__(model, windows, cfg, device, state_dir, progress)
        self.teacher = teacher.to(device).eval().requires_grad_(False) if teacher is not None else None
        if cfg.scales:
            self._prepare_scales(model, initial_scales)
        self.start_log_scales = {k: v.detach().clone() for k, v in self.log_scales.items()}
        self.hessians = collect_hessians(model, windows[: cfg.gptq_windows]) if cfg.weight_quant == "gptq" else None

    def _prepare_scales(self, model: nn.Module, initial: ChannelScales | None) -> None:
        """Channel scales as log-scales from 0 (scale 1), their Adam optimiser, and the hooks that scale the RMSNorm
        outputs by the current attn_in / mlp_in (the norms' weights are 1 after fusion).

        With R4 on, prepare_model folded H4 into down_proj; the scales divide its columns before H4, so the base
        weight is unfolded once here (W = (W H4) H4ᵀ) and H4 is refolded in ``rotation.rotated_weights``."""
        config = model.config
        self.log_scales = {k: torch.zeros(self.n_layers, n, device=self.device) for k, n in ChannelScales.channels(config).items()}
        if initial is not None:
            initial.check(config, "initial channel scales")
            for k, v in self.log_scales.items():
                v.copy_(torch.stack(getattr(initial, k)).log().float())
        for v in self.log_scales.values():
            v.requires_grad_(True)
        self.scale_opt = torch.optim.Adam(list(self.log_scales.values()), lr=self.cfg.scale_lr)
        self.scale_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.scale_opt, T_max=self.cfg.steps, eta_min=0.0)
        arch = self.arch
        if self.cfg.r4:
            self.h4 = hadamard_matrix(config.intermediate_size, "R4 (intermediate size)").float().to(self.device)
            for i in range(self.n_layers):
                for name in arch.rotated("R4", "input"):
                    key = f"{arch.layers}.{i}.{name}.weight"
                    self.base[key] = self.base[key] @ self.h4.T
        norm_pairs = [p for p in arch.scales if p.producer in arch.norm_readers()]
        for i, layer in enumerate(arch.decoder_layers(model)):
            for pair in norm_pairs:
                norm = layer.get_submodule(pair.producer)
                self.scaled_norms[(pair.kind, i)] = norm
                norm.register_forward_hook(self._scale_norm_output)

    def _scale_norm_output(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        scale = self.norm_scale.get(id(module))
        return output if scale is None else output * scale.to(output.dtype)

    def state(self) -> dict[str, Any]:
        st = super().state()
        if self.log_scales:
            st.update(log_scales={k: v.detach().cpu() for k, v in self.log_scales.items()}, scale_opt=self.scale_opt.state_dict(),
                      scale_sched=self.scale_sched.state_dict())
        return st

    def _load_state(self, st: dict[str, Any]) -> None:
        super()._load_state(st)
        if self.log_scales:
            with torch.no_grad():
                for k, v in self.log_scales.items():
                    v.copy_(st["log_scales"][k].to(self.device))
            self.scale_opt.load_state_dict(st["scale_opt"])
            self.scale_sched.load_state_dict(st["scale_sched"])

    def _install(self, leaves: dict[Any, torch.Tensor], r1: torch.Tensor, r2: torch.Tensor) -> None:
        """As the main learner's; with GPTQ in the loop, the forward also takes GPTQ's integers of the leaves, whose
        Hessians are rotated by the ``r1``/``r2`` the leaves were made with."""
        super()._install(leaves, r1, r2)
        if self.hessians is not None:
            chosen = gptq_integers(self.arch, leaves, self.hessians, r1, r2, self.model.config.num_attention_heads,
                                   self.cfg.w_bits, self.cfg.group_size, clip_search=True)
            for k, integers in chosen.items():
                self.linears[k].weight_integers = integers

    def _after_step(self) -> None:
        if self.log_scales:
            self.scale_opt.step()
            self.scale_sched.step()

    def _scales(self, log_scales: dict[str, torch.Tensor]) -> ChannelScales | None:
        if not log_scales:
            return None
        return ChannelScales(**{k: [row.detach().double().exp().cpu() for row in v] for k, v in log_scales.items()})

    def rotations(self) -> Rotations:
        rot = super().rotations()
        rot.scales = self._scales(self.log_scales)
        return rot

    def start_rotations(self) -> Rotations:
        rot = super().start_rotations()
        rot.scales = self._scales(self.start_log_scales)
        return rot


def research_learner(model: nn.Module, windows: torch.Tensor, cfg: LearnConfig, device: torch.device,
                     state_dir: Path | None = None, progress: bool = True) -> ResearchLearner:
    """The learner factory for ``spinquant.pipeline.learn_rotations``: the float teacher (loss kl) and the start scales
    (scale_init) are taken from the original ``model``, which is then prepared as the main path prepares it."""
    teacher = copy.deepcopy(model) if cfg.loss == "kl" else None
    start = initial_scales(model, cfg, windows)
    prepare_model(model, cfg)
    return ResearchLearner(model, windows, cfg, device, state_dir=state_dir, progress=progress, teacher=teacher,
                           initial_scales=start)
