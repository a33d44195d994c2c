"""Learning R1 and R2 (SpinQuant): Cayley SGD on the Stiefel manifold, weights frozen, fake-quant forward.

R1 (dim, dim) and R2 (n_layers, head_dim, head_dim) are ``geoopt.ManifoldParameter``s on
``CanonicalStiefel`` (whose retraction is the Cayley transform), optimised by ``geoopt``'s
``RiemannianSGD`` with a cosine learning-rate decay. Both start from random Hadamard matrices.

The model is prepared once: RMSNorms fused, R4 folded into down_proj with its online Hadamard, and
every linear wrapped in the fake-quant modules of the learning scheme (default W16A8: asymmetric
per-token int8 activations). Each step then
1. computes the rotated weights once from the frozen float32 weights (``W R1``, ``R1ᵀ W``, per-head
   ``R2``) as one autograd graph, and detaches them into leaf tensors;
2. runs the micro-batches with those leaves as the linears' ``weight_override`` (gradient
   checkpointing per decoder layer, bf16 autocast on CUDA), accumulating the leaves' gradients;
3. back-propagates the accumulated gradients through the rotation graph once, all-reduces the
   rotation gradients across ranks (torchrun), and takes one Riemannian SGD step.
So the rotations cost two matmul passes per step, not one per micro-batch, and the embedding is
rotated only for the tokens of the batch.

What the loss sees: Meta's recipe learns at W16A8 (or W16A4KV4) with the cross-entropy on the text. Gradients reach
the rotations through the straight-through rounding and through the quantization scales (quant/primitives.py
explains why the scale path matters). The research settings of :class:`LearnConfig` (int4 weights in the loop, RTN
or GPTQ's; KL to the float model as the loss; channel scales learned with R1/R2) are spinquant.experimental's
``ResearchLearner``, a subclass that sets the seams this class leaves empty (``log_scales``, ``teacher``,
:meth:`_install`); this class refuses them.

State (rotations, scales, optimizers, schedulers, losses) is saved every ``save_every`` steps; a restarted run
continues from the last save with the same result.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import geoopt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn
from tqdm.auto import tqdm

from spinquant.architectures import Architecture, architecture_of, head_dim
from spinquant.atomic import atomic_file
from spinquant.errors import SpinQuantError
from spinquant.formats.rbin import save_rbin
from spinquant.fusion import ORTHOGONALITY_TOL, Rotations, apply_rotations, fuse_norms, orthogonality_error, per_head_scales
from spinquant.kl_loss import chunk_ce, chunk_kl, layer_checkpointing
from spinquant.memory import heap_trimmed_before, trimming_pays
from spinquant.quant.fake_quant import make_fake_quant
from spinquant.quant.scheme import FLOAT, QuantScheme

STATE_FILE = "learn_state.pt"
LEARNED_DIR = "learned"  # where the learned rotations go when the start is kept (write_outputs)
LOSS_CHUNK_POSITIONS = 256  # positions whose full-vocabulary logits exist at once while the loss is computed


@dataclass
class LearnConfig:
    """Meta's recipe by default: 100 steps x 8 windows of 2048 tokens (800), lr 1.5 cosine, W16A8.

    It also holds the research options (w_bits < 16, loss, weight_quant, gptq_windows, scales, scale_lr, scale_init),
    so that every learning state and output records one format; only spinquant.experimental's learner takes them
    (:func:`research_options`)."""

    steps: int = 100
    batch_size: int = 8
    micro_batch: int = 1
    lr: float = 1.5
    w_bits: int = FLOAT
    group_size: int | None = 32
    a_bits: int = 8
    a_symmetric: bool = False
    kv_bits: int = FLOAT
    seed: int = 0
    save_every: int = 10
    grad_checkpoint: bool = True
    loss: str = "ce"  # "ce": next-token cross-entropy (Meta's); "kl": KL(float model || quantized model) per token
    weight_quant: str = "rtn"  # int4 weights in the loop (w_bits < 16): "rtn", or "gptq" (see rotation_gptq.py)
    gptq_windows: int = 64  # calibration windows whose inputs give the in-the-loop GPTQ Hessians
    r4: bool = True  # the online Hadamard before down_proj (off where the exported model cannot run it)
    max_angle: float | None = None  # radians: cap on how far one step may turn any vector (see bound_step_angles)
    scales: bool = False  # also learn channel scales (fusion.ChannelScales) jointly with R1/R2
    scale_lr: float = 0.01  # Adam's lr on the log-scales (cosine schedule like the rotations')
    scale_init: float | None = None  # None: scales start at 1; alpha: SmoothQuant's scales of that alpha (smoothing.py)

    def scheme(self) -> QuantScheme:
        """The fake-quant scheme the loss is computed under (output layer and embedding in float)."""
        return QuantScheme(w_bits=self.w_bits, group_size=self.group_size, a_bits=self.a_bits, a_symmetric=self.a_symmetric,
                           kv_bits=self.kv_bits, output_w_bits=FLOAT, output_a_bits=FLOAT, embedding_bits=FLOAT)

    def check(self) -> None:
        self.scheme()  # validates bits
        if self.steps < 1 or self.batch_size < 1 or self.micro_batch < 1 or self.batch_size % self.micro_batch:
            raise SpinQuantError(f"need steps >= 1 and a batch size ({self.batch_size}) divisible by the micro-batch ({self.micro_batch})")
        if self.lr <= 0:
            raise SpinQuantError(f"learning rate {self.lr} must be positive")
        if self.max_angle is not None and not 0 < self.max_angle < 3.0:
            raise SpinQuantError(f"--max-angle {self.max_angle}: the cap on one step's rotation angle must be in (0, 3) "
                                 f"radians (0.02-0.2 is useful; calibrate --max-angle 0 means no cap)")


def research_options(cfg: LearnConfig) -> list[str]:
    """The research settings ``cfg`` asks for (docs/experimental.md): what :class:`RotationLearner` refuses."""
    return [name for name, on in (("w_bits < 16", cfg.w_bits < FLOAT), ("loss kl", cfg.loss != "ce"),
                                  ("weight_quant gptq", cfg.weight_quant != "rtn"), ("scales", cfg.scales)) if on]


# LearnConfig options added after learning states and outputs were first saved: a saved state or output identity that
# lacks one had its default, and an identity names one only when it differs from that default
LATER_OPTIONS = ("r4", "max_angle", "scales", "scale_lr", "scale_init")
# options removed after they measured no gain (their results stay in benchmarks/): a saved state or identity that holds
# one at this value computed what LearnConfig computes now, so it still resumes
REMOVED_OPTIONS = {"momentum": 0.0, "frozen_channels": ()}


def later_option_defaults() -> dict[str, Any]:
    """The defaults of :data:`LATER_OPTIONS`, read off LearnConfig."""
    return {f.name: f.default for f in fields(LearnConfig) if f.name in LATER_OPTIONS}


def without_removed_options(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a recorded LearnConfig) less the :data:`REMOVED_OPTIONS` it holds at the value they have today."""
    def same(k: str, v: Any) -> bool:
        return (tuple(v) if isinstance(v, (list, tuple)) else v) == REMOVED_OPTIONS[k]

    return {k: v for k, v in saved.items() if not (k in REMOVED_OPTIONS and same(k, v))}


def prepare_model(model: nn.Module, cfg: LearnConfig) -> nn.Module:
    """Fused norms, R4 folded (online Hadamard kept; unless ``cfg.r4`` is off), fake-quant modules of the learning scheme; weights frozen."""
    fuse_norms(model)
    apply_rotations(model, Rotations(r4=cfg.r4))
    make_fake_quant(model, cfg.scheme())
    for mod in model.modules():
        if hasattr(mod, "weight_mode") and mod.w_bits < FLOAT:
            mod.weight_mode = "dynamic"  # RTN fake quant of the rotated weight on every forward (STE)
    model.requires_grad_(False)
    return model


def main_learner(model: nn.Module, windows: torch.Tensor, cfg: LearnConfig, device: torch.device,
                 state_dir: Path | None = None, progress: bool = True) -> "RotationLearner":
    """The learner of the main path for the original float ``model`` (prepared here, in place): the factory
    ``spinquant.pipeline.learn_rotations`` takes by default."""
    prepare_model(model, cfg)
    return RotationLearner(model, windows, cfg, device, state_dir=state_dir, progress=progress)


def hadamard_start(config, seed: int) -> Rotations:
    """The learner's starting R1 and R2 (seeded random Hadamard, the same as Rotations.random_hadamard_for)."""
    return Rotations.random_hadamard_for(config, seed, r4=False)


def rotated_weights(arch: Architecture, base: dict[str, torch.Tensor], r1: torch.Tensor, r2: torch.Tensor, n_layers: int,
                    hd: int, scales: dict[str, torch.Tensor] | None = None, h4: torch.Tensor | None = None,
                    rows: dict[str, slice] | None = None) -> dict[str, torch.Tensor]:
    """The rotated weights of every linear the map names (differentiable in r1 (dim, dim) and r2 (n_layers, hd, hd)),
    and the biases ``base`` holds that an output-side transform moves.

    Per layer, in this order (the map says which linear gets what): input-side R1 ``W @ R1``; R2 on the output side
    per kv head ``R2ᵀ W_h`` and on the input side per attention head ``W_h R2``; the channel scales (``scales``,
    optional, differentiable, each (n_layers, channels), keyed by fusion.SCALE_KINDS: producers' rows multiplied,
    consumers' columns divided; the norm producers are the caller's, they scale activations); R4 ``W @ h4`` (only
    with scales: then ``base``'s R4 linears hold the weight before R4, and ``h4`` (inter, inter) is folded after
    dividing its columns; None: no R4); output-side R1 ``R1ᵀ W``. Output-side transforms act on a bias as on a
    column of its rows, and on a fused linear's ``rows[name]`` only (:meth:`Architecture.output_rows`)."""
    rows = rows or {}
    head = f"{arch.head}.weight"
    out = {head: base[head] @ r1}
    linear_names = {lin.name for lin in arch.linears}
    for i in range(n_layers):
        p = f"{arch.layers}.{i}."
        w: dict[str, torch.Tensor] = {}
        bias: dict[str, torch.Tensor] = {}  # the biases an output-side transform moved (the others stay the module's)

        def get(name: str) -> torch.Tensor:
            return w[name] if name in w else base[f"{p}{name}.weight"]

        def output_side(name: str, fn) -> None:
            w[name] = _on_rows(get(name), rows.get(name), fn)
            b = bias.get(name, base.get(f"{p}{name}.bias"))
            if b is not None:
                bias[name] = _on_rows(b[:, None], rows.get(name), fn)[:, 0]

        for name in arch.rotated("R1", "input"):
            w[name] = base[f"{p}{name}.weight"] @ r1
        for name in arch.rotated("R2", "output"):
            output_side(name, lambda x: (r2[i].T @ x.reshape(-1, hd, x.shape[1])).reshape(x.shape))
        for name in arch.rotated("R2", "input"):
            x = get(name)
            w[name] = (x.view(x.shape[0], -1, hd) @ r2[i]).reshape(x.shape)
        if scales is not None:
            # each use indexes the scales anew (one autograd node per use), except that a per-head consumer shares its
            # producer's: the gradient sums then accumulate in the order the learned scales were first recorded with
            for pair in arch.scales:
                s = scales[pair.kind][i] if pair.producer in linear_names else None
                if s is not None:
                    output_side(pair.producer, lambda x, s=s: x * s[:, None])
                for name in pair.consumers:
                    x = get(name)
                    if pair.per_head:
                        heads = per_head_scales(s if s is not None else scales[pair.kind][i], hd, x.shape[1] // hd)
                        w[name] = (x.view(x.shape[0], -1, hd) / heads[None]).reshape(x.shape)
                    else:
                        w[name] = x / scales[pair.kind][i][None, :]
            if h4 is not None:
                for name in arch.rotated("R4", "input"):
                    w[name] = get(name) @ h4
        for name in arch.rotated("R1", "output"):
            output_side(name, lambda x: r1.T @ x)
        first = arch.rotated("R1", "input")  # insertion order as first recorded: the input-side R1 linears first
        out.update({f"{p}{name}.weight": get(name) for name in [*first, *(n for n in arch.block_linears() if n not in first)]})
        out.update({f"{p}{name}.bias": b for name, b in bias.items()})
    return out


def _on_rows(x: torch.Tensor, sl: slice | None, fn) -> torch.Tensor:
    """``fn`` applied to rows ``sl`` of ``x`` (all rows when None), the other rows kept; differentiable."""
    if sl is None:
        return fn(x)
    return torch.cat([x[: sl.start], fn(x[sl]), x[sl.stop :]])


class RotationLearner:
    """Learns R1/R2 for a prepared model on calibration windows (n, seqlen); see the module docstring.

    Seams for spinquant.experimental's subclass, empty here: ``log_scales`` (kind -> (n_layers, channels) trainable
    log channel scales, fed through :func:`rotated_weights`; ``scaled_norms`` maps (kind, layer) to the norm whose
    output ``norm_scale`` scales), ``h4`` (R4 refolded after the scales), ``teacher`` (a float model: the loss is KL to
    it instead of the cross-entropy), :meth:`_install`, :meth:`_load_state` and :meth:`_after_step`."""

    research = False  # whether this learner takes research_options (the experimental subclass does)

    def __init__(self, model: nn.Module, windows: torch.Tensor, cfg: LearnConfig, device: torch.device,
                 state_dir: Path | None = None, progress: bool = True) -> None:
        cfg.check()
        research = research_options(cfg)
        if research and not self.research:
            raise SpinQuantError(f"{', '.join(research)}: research settings of the rotation learning, not "
                                 f"on the main path: spinquant.experimental (docs/experimental.md)")
        self.teacher: nn.Module | None = None
        self.cfg, self.device, self.state_dir, self.progress = cfg, device, state_dir, progress
        self.model = model.to(device)
        self.windows = windows
        config = model.config
        self.n_layers, self.hd = config.num_hidden_layers, head_dim(config)
        self.arch = arch = architecture_of(config)
        params = dict(model.named_parameters())
        names = [f"{arch.head}.weight"] + [f"{arch.layers}.{i}.{n}.{t}" for i in range(self.n_layers)
                                           for n in arch.block_linears() for t in ("weight", "bias")
                                           if f"{arch.layers}.{i}.{n}.{t}" in params]
        self.base = {n: params[n].detach().float() for n in names}
        self.rows = arch.output_rows(config)
        self.embedding = params[f"{arch.embedding}.weight"].detach()
        modules = dict(model.named_modules())
        self.linears = {n: modules[n.rsplit(".", 1)[0]] for n in names}
        # a large model on the CPU: glibc's heap trimmed where each layer's attention and MLP start (spinquant.memory)
        self.trim_points = arch.sublayer_start_modules(model)
        self.trim = trimming_pays(self.model)
        start = hadamard_start(config, cfg.seed)
        r1, r2 = start.r1.float(), torch.stack(start.r2).float()
        manifold = geoopt.CanonicalStiefel()
        self.r1 = geoopt.ManifoldParameter(r1.to(device), manifold=manifold)
        self.r2 = geoopt.ManifoldParameter(r2.to(device), manifold=manifold)
        self.start_r1, self.start_r2 = self.r1.detach().clone(), self.r2.detach().clone()
        self.opt = geoopt.optim.RiemannianSGD([self.r1, self.r2], lr=cfg.lr, stabilize=None)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.steps, eta_min=0.0)
        self.log_scales: dict[str, torch.Tensor] = {}
        self.start_log_scales: dict[str, torch.Tensor] = {}
        self.h4: torch.Tensor | None = None
        self.scaled_norms: dict[tuple[str, int], nn.Module] = {}
        self.norm_scale: dict[int, torch.Tensor] = {}  # id(norm module) -> the scale its output is multiplied by
        self.step = 0
        self.losses: list[float] = []
        self.angles: list[list[float]] = []  # per step: [R1's angle, largest R2 angle] the gradient step asked for
        self.seconds = 0.0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        if cfg.grad_checkpoint:
            layer_checkpointing(model, True)
        model.train()  # activates checkpointing; Llama has no dropout

    # --- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        st = {"step": self.step, "r1": self.r1.detach().cpu(), "r2": self.r2.detach().cpu(), "opt": self.opt.state_dict(),
              "sched": self.sched.state_dict(), "losses": self.losses, "angles": self.angles, "seconds": self.seconds, "config": asdict(self.cfg),
              "windows_digest": _digest(self.windows)}
        return st

    def save_state(self) -> None:
        if self.state_dir is None or self.rank != 0:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.state_dir / STATE_FILE) as tmp:
            torch.save(self.state(), tmp)

    def try_resume(self) -> bool:
        """Continue from ``state_dir``'s saved state if there is one for the same configuration and data."""
        if self.state_dir is None or not (self.state_dir / STATE_FILE).is_file():
            return False
        try:
            # weights_only: tensors, numbers, strings and containers only; a pickled object (code) is refused unrun
            st = torch.load(self.state_dir / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SpinQuantError(f"cannot read {self.state_dir / STATE_FILE}: it is corrupt or holds more than tensors and "
                                 f"plain values (spinquant never runs code from a state file); delete it to start over") from exc
        if not isinstance(st, dict) or not {"config", "windows_digest", "r1", "r2", "opt", "sched", "step"} <= set(st):
            raise SpinQuantError(f"{self.state_dir / STATE_FILE} is not a spinquant learning state: delete it to start over")
        saved = without_removed_options({**later_option_defaults(), **st["config"]})  # states saved before these options
        if saved != asdict(self.cfg) or st["windows_digest"] != _digest(self.windows):
            raise SpinQuantError(f"{self.state_dir} holds a rotation-learning state of a different configuration or "
                                 f"calibration set: use another --out directory or delete {STATE_FILE}")
        self._load_state(st)
        return True

    def _load_state(self, st: dict[str, Any]) -> None:
        """Take over a checked saved state (:meth:`state`'s dict)."""
        with torch.no_grad():
            self.r1.copy_(st["r1"].to(self.device))
            self.r2.copy_(st["r2"].to(self.device))
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step, self.losses, self.seconds = st["step"], list(st["losses"]), st["seconds"]
        self.angles = [list(a) for a in st.get("angles", [])]

    # --- learning ------------------------------------------------------------------------------
    def _batch(self, step: int) -> torch.Tensor:
        n = self.windows.shape[0]
        idx = [(step * self.cfg.batch_size + j) % n for j in range(self.cfg.batch_size)]
        return self.windows[idx]

    def _micro_loss(self, r1_emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean loss over the next-token positions of ``ids`` (micro, T) with the linears' current weight overrides:
        cross-entropy, or KL(teacher || model) with ``loss="kl"``.

        The output layer and the loss run LOSS_CHUNK_POSITIONS positions at a time under activation checkpointing,
        so full-vocabulary logits are never held whole (at vocab 128256 and 2048 positions one float32 copy is
        1 GiB, and the softmax and its gradient take several).
        """
        emb = F.embedding(ids, self.embedding) @ r1_emb
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            hidden = self.model.get_submodule(self.arch.backbone)(inputs_embeds=emb, use_cache=False).last_hidden_state[:, :-1]
            teacher_hidden = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_hidden = self.teacher.get_submodule(self.arch.backbone)(ids, use_cache=False).last_hidden_state[:, :-1]
        targets = ids[:, 1:]
        total = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, hidden.shape[1], LOSS_CHUNK_POSITIONS):
            part = slice(a, a + LOSS_CHUNK_POSITIONS)
            if teacher_hidden is not None:
                total = total + checkpoint(self._chunk_kl, hidden[:, part], teacher_hidden[:, part], use_reentrant=False)
            else:
                total = total + checkpoint(self._chunk_ce, hidden[:, part], targets[:, part], use_reentrant=False)
        return total / targets.numel()

    def _chunk_ce(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one chunk of positions: h (micro, t, dim), targets (micro, t)."""
        return chunk_ce(self.model.get_submodule(self.arch.head), h, targets, amp=self.device.type == "cuda")

    def _chunk_kl(self, h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
        """Summed KL(teacher || model) of one chunk of positions (hidden states (micro, t, dim) of both)."""
        return chunk_kl(self.model.get_submodule(self.arch.head), self.teacher.get_submodule(self.arch.head), h, teacher_h, amp=self.device.type == "cuda")

    def _rotated(self, r1: torch.Tensor, r2: torch.Tensor, log_scales: dict[str, torch.Tensor]) -> dict[Any, torch.Tensor]:
        """The weights (and moved biases) rotated by ``r1``/``r2``, plus the norm scales the hooks apply (with scales)."""
        scales = {k: v.exp() for k, v in log_scales.items()} if log_scales else None
        rotated = rotated_weights(self.arch, self.base, r1, r2, self.n_layers, self.hd, scales, self.h4, self.rows)
        if scales is not None:  # the norm halves of attn_in / mlp_in: leaves the norm hooks multiply by
            rotated.update({("norm", kind, i): scales[kind][i] for kind, i in self.scaled_norms})
        return rotated

    def _install(self, leaves: dict[Any, torch.Tensor], r1: torch.Tensor, r2: torch.Tensor) -> None:
        """Make the forward use ``leaves`` (weights, biases, norm scales), made with ``r1``/``r2``."""
        for k, leaf in leaves.items():
            if isinstance(k, tuple):
                self.norm_scale[id(self.scaled_norms[k[1:]])] = leaf
            else:
                setattr(self.linears[k], "bias_override" if k.endswith(".bias") else "weight_override", leaf)

    def _uninstall(self, leaves: dict[Any, torch.Tensor]) -> None:
        self.norm_scale.clear()
        for k in leaves:
            if not isinstance(k, tuple):
                self.linears[k].weight_override = self.linears[k].bias_override = None
                self.linears[k].weight_integers = None

    @torch.no_grad()
    def loss_on(self, windows: torch.Tensor, start: bool = False) -> float:
        """Mean loss of the current rotations (``start``: of the rotations and scales learning started from) on
        ``windows`` (n, seqlen), no gradient, no step: the held-out check of :func:`spinquant.pipeline.learn_rotations`."""
        r1, r2, log_scales = ((self.start_r1, self.start_r2, self.start_log_scales) if start
                              else (self.r1, self.r2, self.log_scales))
        leaves = self._rotated(r1, r2, log_scales)
        self._install(leaves, r1, r2)
        try:
            total = sum(self._micro_loss(r1, w[None].to(self.device)).item() for w in windows)
        finally:
            self._uninstall(leaves)
        return total / windows.shape[0]

    def accumulate_gradients(self, batch: torch.Tensor) -> float:
        """Loss of ``batch`` (batch_size, seqlen) and its gradients in ``r1.grad`` / ``r2.grad`` (all ranks summed)."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        for v in self.log_scales.values():
            v.grad = None
        rotated = self._rotated(self.r1, self.r2, self.log_scales)
        leaves = {k: v.detach().requires_grad_(True) for k, v in rotated.items()}
        r1_leaf = self.r1.detach().requires_grad_(True)  # the embedding rotation, per batch
        self._install(leaves, self.r1, self.r2)
        total = 0.0
        try:
            micro = [batch[i : i + cfg.micro_batch] for i in range(0, batch.shape[0], cfg.micro_batch)]
            with heap_trimmed_before(self.trim_points, enabled=self.trim):
                for k, ids in enumerate(micro):
                    if k % self.world != self.rank:
                        continue
                    loss = self._micro_loss(r1_leaf, ids.to(self.device)) * (ids.shape[0] / batch.shape[0])
                    loss.backward()
                    total += loss.item()
        finally:
            self._uninstall(leaves)
        grads = [leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k]) for k in rotated]
        torch.autograd.backward(list(rotated.values()), grads)
        if r1_leaf.grad is not None:
            self.r1.grad = self.r1.grad + r1_leaf.grad
        if self.world > 1:
            for p in (self.r1, self.r2, *self.log_scales.values()):
                dist.all_reduce(p.grad)
            loss_t = torch.tensor([total], device=self.device)
            dist.all_reduce(loss_t)
            total = loss_t.item()
        return total

    def train_step(self) -> float:
        """One Riemannian SGD step on the next batch; returns its loss."""
        t = time.perf_counter()
        total = self.accumulate_gradients(self._batch(self.step))
        lr = self.opt.param_groups[0]["lr"]
        cap = None if self.cfg.max_angle is None else self.cfg.max_angle * lr / self.cfg.lr  # the cap follows the schedule
        self.angles.append([bound_step_angles(p, lr, cap) for p in (self.r1, self.r2)])
        self.opt.step()
        self.sched.step()
        self._after_step()
        self.step += 1
        self.losses.append(total)
        self.seconds += time.perf_counter() - t
        return total

    def _after_step(self) -> None:
        """Step the subclass's own optimisers (after the rotations')."""

    def run(self, stop_after: int | None = None) -> None:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` more steps: for tests of resume)."""
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="learn rotations", unit="step",
                   disable=not self.progress or self.rank != 0)
        done = 0
        while self.step < self.cfg.steps and (stop_after is None or done < stop_after):
            loss = self.train_step()
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self.save_state()
        bar.close()

    def rotations(self) -> Rotations:
        r1 = self.r1.detach().double().cpu()
        r2 = [m.detach().double().cpu() for m in self.r2]
        for name, q in [("R1", r1)] + [(f"R2[{i}]", m) for i, m in enumerate(r2)]:
            err = orthogonality_error(q)
            if not err < ORTHOGONALITY_TOL:
                raise SpinQuantError(f"learned {name} drifted off the manifold (max|QᵀQ-I| = {err:.2e}): lower --lr")
        return Rotations(r1=r1, r2=r2, r4=self.cfg.r4)

    def start_rotations(self) -> Rotations:
        """The rotations learning started from: the seeded random Hadamard, float64."""
        start = hadamard_start(self.model.config, self.cfg.seed)
        return Rotations(r1=start.r1, r2=start.r2, r4=self.cfg.r4)


def step_angles(x: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """The largest angle (radians) by which a plain Cayley SGD step turns any vector, per matrix.

    x (..., n, n) orthogonal, grad (..., n, n) its Euclidean gradient. geoopt's CanonicalStiefel step multiplies x on
    the left by the Cayley transform (I - A/2)⁻¹ (I + A/2) of the skew matrix A = u xᵀ - x uᵀ, u = -lr · rgrad(x, grad);
    A's eigenvalues are ±iσ (σ its singular values), and the transform turns the plane of each pair by 2·atan(σ/2).
    Returns shape x.shape[:-2]."""
    u = -lr * geoopt.CanonicalStiefel().egrad2rgrad(x, grad)
    a = u @ x.transpose(-1, -2) - x @ u.transpose(-1, -2)
    return 2 * torch.atan(torch.linalg.matrix_norm(a, ord=2) / 2)


@torch.no_grad()
def bound_step_angles(p: torch.Tensor, lr: float, cap: float | None) -> float:
    """Scale ``p.grad`` (in place) so that no matrix of ``p`` (one R1, or each layer's R2) turns by more than ``cap``
    radians in the coming step; returns the largest angle the unscaled step would have taken.

    Why: on a model with massive activations the gradient at Meta's lr asks R1 to turn by radians in one step, where
    the quantized loss is rough (docs/recipe.md). Capping the angle keeps the step's direction and bounds its size in
    the one unit that means the same for every model and loss. Hand-written: geoopt's optimisers have no step-size
    control beyond lr."""
    if p.grad is None:
        return 0.0
    angles = step_angles(p.detach(), p.grad, lr)
    if cap is not None:
        # σ ↦ 2·atan(σ/2) is increasing, so scaling A (linear in grad) by tan(cap/2)/tan(angle/2) lands on the cap
        scale = torch.where(angles > cap, torch.tan(torch.tensor(cap / 2)) / torch.tan(angles / 2), torch.ones_like(angles))
        p.grad.mul_(scale[..., None, None])
    return float(angles.max())


def _digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16]


def plot_learning_curve(losses: list[float], path: Path, title: str = "", loss: str = "ce") -> None:
    """Loss per step as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1.0, alpha=0.45, label="per step (each step sees other windows)")
    k = min(10, len(losses))
    if k > 1:
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2.0, label=f"mean of the last {k} steps")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("KL to float (nats/token)" if loss == "kl" else "cross-entropy (nats/token)")
    ax.set_title(title or "rotation learning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(learner: RotationLearner, out: Path, extra: dict[str, Any] | None = None,
                  keep_start: bool = False) -> dict[str, Any]:
    """R.bin, losses.json and learning_curve.png into ``out`` (the caller makes ``out`` atomic). ``keep_start``: R.bin
    holds the start rotations and ``learned/R.bin`` the learned ones (learning made the held-out loss worse)."""
    rot = learner.rotations()
    if keep_start:
        save_rbin(learner.start_rotations(), out / "R.bin")
        (out / LEARNED_DIR).mkdir()
        save_rbin(rot, out / LEARNED_DIR / "R.bin")
    else:
        save_rbin(rot, out / "R.bin")
    tokens = learner.cfg.batch_size * learner.windows.shape[1]
    summary = {"losses": learner.losses, "step_angles": learner.angles, "steps": learner.step, "seconds": learner.seconds,
               "steps_per_s": learner.step / learner.seconds if learner.seconds else None,
               "tokens_per_s": learner.step * tokens / learner.seconds if learner.seconds else None,
               "config": asdict(learner.cfg), "orthogonality_error": {"R1": orthogonality_error(rot.r1),
                                                                      "R2_max": max(orthogonality_error(m) for m in rot.r2)},
               **(extra or {})}
    (out / "losses.json").write_text(json.dumps(summary, indent=2))
    try:
        plot_learning_curve(learner.losses, out / "learning_curve.png", loss=learner.cfg.loss)
    except ImportError:  # matplotlib is optional: the numbers are in losses.json
        pass
    return summary
