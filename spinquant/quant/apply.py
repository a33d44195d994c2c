"""Quantize a (rotated) model's weights: RTN or GPTQ, each with or without range setting.

GPTQ runs decoder layer by decoder layer over the calibration windows; each layer's inputs come
from the already-quantized layers before it (weights and activations fake-quantized), and inside a
layer the linears are quantized in execution order ([q,k,v] -> o -> [gate,up] -> down, "true
sequential"), so every Hessian sees the inputs the quantized model will really produce. Only one
layer's Hessians are alive at a time. q/k/v (and gate/up) share one input, hence one Hessian.

Float target (``WeightQuantConfig.float_target``): plain GPTQ makes each quantized linear reproduce
its own float weight on the inputs it now receives, ``min ||(W - Q) X̃||`` with X̃ the quantized
model's inputs; the error the earlier layers left in X̃ is kept. With the float target it reproduces
the *float model's* output instead, ``min ||W X - Q X̃||`` (X: the float model's inputs to the same
linear on the same tokens; the objective of GPTAQ, Li et al. 2025). That objective splits exactly:
with the least-squares weight ``W* = W C H̃⁻¹`` (``C = X X̃ᵀ``, ``H̃ = X̃ X̃ᵀ``, both summed over the
calibration tokens), ``||W X - Q X̃||² = ||W X - W* X̃||² + ||(W* - Q) X̃||²``, so GPTQ of W* on H̃
solves it. The fit is ridge-damped towards W (``FloatTargetFit``, ``target_percdamp``).
A float copy of the current decoder layer runs beside the quantized one to give X: the float stream's hidden states
are one more copy of the calibration inputs, and the paired linear inputs are alive one batch at a time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from spinquant.architectures import architecture_of
from spinquant.quant.fake_quant import QuantLinear, make_fake_quant, set_embedding_quantized
from spinquant.quant.gptq import GptqSolver, HessianAccumulator
from spinquant.quant.primitives import dequantize_weight, quantize_weight, row_slices
from spinquant.quant.range_setting import choose_scales
from spinquant.quant.scale_refit import refit_group_scales
from spinquant.quant.scheme import FLOAT, FLOAT_TARGET_PERCDAMP, QuantScheme, check_damping



@dataclass
class WeightQuantConfig:
    """How the integers are chosen: method 'gptq' or 'rtn'; clip_search = range setting on/off."""

    method: str = "gptq"
    clip_search: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    float_target: bool = False  # GPTQ fits the float model's outputs, not the layer's own (module docstring)
    target_percdamp: float = FLOAT_TARGET_PERCDAMP  # the float target's ridge damping (FloatTargetFit; module docstring)
    scale_refit: bool = False  # after GPTQ, each row's group scales are refitted to its integers (quant/scale_refit.py)
    compare_rtn: bool = False  # also record RTN's (and the pre-refit) output error beside GPTQ's: diagnostics, costs time
    batch_size: int = 8
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_damping("--percdamp", self.percdamp)
        check_damping("--gptq-objective-damp", self.target_percdamp)

    @property
    def gptq_target(self) -> str:
        """What GPTQ fits, as recorded and named in run identities: "float" or "layer" (also for RTN)."""
        return "float" if self.float_target and self.method == "gptq" else "layer"


# rows quantized together (GPTQ, RTN): 128 MiB of float32 weights, a 1B layer's gate+up at once
GPTQ_CHUNK_ELEMENTS = 1 << 25


class _StopForward(Exception):
    """Raised by an observer once the inputs it needs are captured: the rest of the layer is skipped."""


@torch.no_grad()
def rtn_integers(w: torch.Tensor, bits: int, group_size: int | None, clip_search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest integers (int8, (out, in)) and scales (float32, (out, in/g)) of ``w``, with range setting
    when ``clip_search``; in chunks of GPTQ_CHUNK_ELEMENTS rows (rows are independent), so the float temporaries
    of a 128256-row embedding stay at a chunk's size."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], w.shape[1] // (group_size or w.shape[1]), dtype=torch.float32, device=w.device)
    for rows in row_slices(*w.shape, GPTQ_CHUNK_ELEMENTS):
        part = w[rows].float()
        scales[rows] = choose_scales(part, bits, group_size, clip_search)
        q[rows] = quantize_weight(part, scales[rows], bits, group_size)
    return q, scales


@torch.no_grad()
def quantize_embedding(model: nn.Module, scheme: QuantScheme, clip_search: bool) -> None:
    if scheme.embedding_bits >= FLOAT:
        return
    q, scales = rtn_integers(model.get_submodule(architecture_of(model.config).embedding).weight, scheme.embedding_bits, None, clip_search)  # scales (vocab, 1)
    set_embedding_quantized(model, q, scales[:, 0])


@torch.no_grad()
def rtn_quantize_linear(lin: QuantLinear, clip_search: bool) -> None:
    if lin.w_bits >= FLOAT:
        return
    lin.set_quantized(*rtn_integers(lin.weight, lin.w_bits, lin.group_size, clip_search))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """||W X - W_hat X||² / n for the calibration inputs X behind H = 2/n X Xᵀ: tr(D H Dᵀ) / 2, D = W - W_hat."""
    d = (w - w_hat).float()
    return 0.5 * torch.einsum("oi,ij,oj->", d, h, d).item()


def _row_chunks(parts: list[tuple[str, QuantLinear, slice]], max_rows: int):
    """The stacked rows of ``parts`` ((name, linear, its rows)) in pieces of at most ``max_rows``: lists of
    (name, linear, rows of it)."""
    piece, size = [], 0
    for name, lin, span in parts:
        a = span.start
        while a < span.stop:
            take = min(span.stop - a, max_rows - size)
            piece.append((name, lin, slice(a, a + take)))
            size, a = size + take, a + take
            if size == max_rows:
                yield piece
                piece, size = [], 0
    if piece:
        yield piece


@torch.no_grad()
def _gptq_rows(parts: list[tuple[str, QuantLinear, slice]], h: torch.Tensor, cfg: WeightQuantConfig,
               out: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """GPTQ (one Hessian ``h``) of the rows ``parts`` ((name, linear, rows)) of linears that read one input: the rows
    are stacked, since GPTQ treats rows independently given H, and one pass over the columns serves them all, in
    chunks of GPTQ_CHUNK_ELEMENTS (the 128256-row output layer in 8 pieces at 1B) with one inverse-Hessian factor.
    Integers and scales go into ``out[name] = (q (out, in) int8, scales (out, in/g))`` at those rows.

    With ``cfg.scale_refit`` GPTQ's group scales are then refitted to its integers by least squares on H.

    Adds, per linear, GPTQ's output reconstruction error on its calibration inputs to
    ``cfg.stats["output_error"][name]["gptq"]`` (a sum over the chunks); with ``cfg.compare_rtn`` also RTN's (same
    range setting) as ``"rtn"`` and, with the refit, GPTQ's before it as ``"gptq_before_refit"``.
    """
    lin0 = parts[0][1]
    bits, group = lin0.w_bits, lin0.group_size
    solver = GptqSolver(h, bits, group, cfg.clip_search, cfg.percdamp, cfg.blocksize)
    errors = cfg.stats.setdefault("output_error", {})
    compared = (["rtn"] + (["gptq_before_refit"] if cfg.scale_refit else [])) if cfg.compare_rtn else []
    for name, _, _ in parts:
        errors.setdefault(name, dict.fromkeys(["gptq", *compared], 0.0))
    for piece in _row_chunks(parts, max(1, GPTQ_CHUNK_ELEMENTS // lin0.in_features)):
        w = torch.cat([lin.weight.detach()[rows].float() for _, lin, rows in piece])
        q_c, s_c = solver.quantize(w)
        others = {}
        if "gptq_before_refit" in compared:
            others["gptq_before_refit"] = dequantize_weight(q_c, s_c, group)
        if cfg.scale_refit:
            s_c = refit_group_scales(w, q_c, s_c, h, group)
        if "rtn" in compared:
            others["rtn"] = dequantize_weight(*rtn_integers(w, bits, group, cfg.clip_search), group)
        w_gptq = dequantize_weight(q_c, s_c, group)
        row = 0
        for name, lin, rows in piece:
            r = slice(row, row + rows.stop - rows.start)
            errors[name]["gptq"] += output_error(w[r], w_gptq[r], h)
            for key, w_other in others.items():
                errors[name][key] += output_error(w[r], w_other[r], h)
            out[name][0][rows], out[name][1][rows] = q_c[r], s_c[r]
            row = r.stop
        del w, q_c, s_c, w_gptq, others


def _integer_buffers(lin: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (q int8 (out, in), scales float32 (out, in/g)) for ``lin``'s GPTQ result."""
    n_groups = lin.in_features // (lin.group_size or lin.in_features)
    return (torch.empty(lin.weight.shape, dtype=torch.int8, device=lin.weight.device),
            torch.empty(lin.out_features, n_groups, dtype=torch.float32, device=lin.weight.device))


@torch.no_grad()
def _gptq_linears(named: list[tuple[str, QuantLinear]], h: torch.Tensor, cfg: WeightQuantConfig) -> None:
    """GPTQ of linears that share one input (hence one Hessian ``h``), all their rows (:func:`_gptq_rows`); each
    linear is then fixed to its integers."""
    named = [(n, lin) for n, lin in named if lin.w_bits < FLOAT]
    if not named:
        return
    out = {n: _integer_buffers(lin) for n, lin in named}
    _gptq_rows([(n, lin, slice(0, lin.out_features)) for n, lin in named], h, cfg, out)
    for name, lin in named:
        lin.set_quantized(*out[name])


def _run_layer(layer: nn.Module, inps: torch.Tensor, pos_emb, batch_size: int) -> torch.Tensor | None:
    """Run a decoder layer over all calibration inputs in batches; None if an observer stopped it."""
    outs, stopped = [], False
    for b in range(0, inps.shape[0], batch_size):
        try:
            outs.append(layer(inps[b : b + batch_size], attention_mask=None, position_embeddings=pos_emb))
        except _StopForward:
            stopped = True
    return None if stopped else torch.cat(outs)


def _observe(lin: QuantLinear, acc: HessianAccumulator, stop: bool) -> None:
    def observer(x: torch.Tensor) -> None:
        acc.add(x)
        if stop:
            raise _StopForward

    lin.observer = observer


def _capture_input(layer: nn.Module, lin: QuantLinear, inps: torch.Tensor, pos_emb) -> torch.Tensor:
    """The exact matmul input of ``lin`` (inside ``layer``) for ``inps`` (batch, T, dim): (batch * T, in)."""
    got: list[torch.Tensor] = []

    def observer(x: torch.Tensor) -> None:
        got.append(x.reshape(-1, x.shape[-1]).float())
        raise _StopForward

    lin.observer = observer
    try:
        layer(inps, attention_mask=None, position_embeddings=pos_emb)
    except _StopForward:
        pass
    finally:
        lin.observer = None
    return got[0]


class CrossAccumulator:
    """Running H̃ = 2/n Σ x̃ x̃ᵀ and C = 2/n Σ x x̃ᵀ (float32, (in, in)) over paired rows x (float model's input)
    and x̃ (quantized model's input) of the same tokens; H̃ is exactly what :class:`HessianAccumulator` gives."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.c = torch.zeros_like(self.h)
        self.n = 0

    @torch.no_grad()
    def add(self, x_float: torch.Tensor, x_quant: torch.Tensor) -> None:
        m = x_quant.shape[0]
        keep = self.n / (self.n + m)
        self.h.mul_(keep)
        self.c.mul_(keep)
        self.n += m
        f = (2.0 / self.n) ** 0.5
        self.h.addmm_((x_quant * f).T, x_quant * f)
        self.c.addmm_((x_float * f).T, x_quant * f)


class FloatTargetFit:
    """W* = W (C + Λ)(H̃ + Λ)⁻¹ = W + W (C - H̃)(H̃ + Λ)⁻¹ for any W (out, in) reading the input of C and H̃ (in, in).

    The ridge solution of ``min ||W X - V X̃||² + λ ||V - W||²``: the damping pulls W* towards W, not towards 0
    (a plain ridge ``W C (H̃ + λI)⁻¹`` shrinks W along every direction of little input variance, and after
    rotation of a model with massive activations that is most directions): Λ = λI with
    λ = percdamp x mean diag(H̃), as GPTQ damps. With X̃ = X, W* = W whatever Λ. Dead inputs (zero variance) keep
    W's columns. The factor of H̃ + Λ is computed once and serves every linear of a shared input. Float32 (the damping
    bounds the condition number; the solve's error lands on the correction W* - W, a small part of W), through a
    Cholesky factor; float64 only if float32 cannot factor it. Rows are independent and go in chunks of
    GPTQ_CHUNK_ELEMENTS, so a 128256-row output layer's temporaries stay at a chunk's size.
    """

    @torch.no_grad()
    def __init__(self, c: torch.Tensor, h: torch.Tensor, percdamp: float) -> None:
        h = h.float()
        diag = torch.diag(h)
        dead = diag == 0
        damped = h.clone()
        damped[dead, dead] = 1.0
        damped.diagonal().add_(percdamp * torch.mean(diag))
        self.distortion = c.float() - h  # C - H̃: zero where the quantized inputs equal the float ones
        self.factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() != 0:
            self.factor = torch.linalg.cholesky(damped.double())

    @torch.no_grad()
    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """W* (float32, a new tensor) for ``w`` (out, in)."""
        out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        for rows in row_slices(*w.shape, GPTQ_CHUNK_ELEMENTS):
            part = w[rows].float()
            delta = (part @ self.distortion).to(self.factor.dtype)
            out[rows] = part + torch.cholesky_solve(delta.T, self.factor).T.float()  # H̃ symmetric: (H̃⁻¹ Δᵀ)ᵀ = Δ H̃⁻¹
        return out


def least_squares_target(w: torch.Tensor, c: torch.Tensor, h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W* for one weight (:class:`FloatTargetFit`), in ``w``'s dtype."""
    return FloatTargetFit(c, h, percdamp)(w).to(w.dtype)


def float_copy(layer: nn.Module) -> nn.Module:
    """A copy of a (not yet quantized) decoder layer computing the float model: no activation or KV quantization
    (R3 and R4 are exact rotations, so they may stay)."""
    ref = copy.deepcopy(layer)
    for mod in ref.modules():
        if isinstance(mod, QuantLinear):
            mod.a_bits = FLOAT
            mod.observer = None
        if hasattr(mod, "spinquant_kv_bits"):  # the attention (make_fake_quant marks it)
            mod.spinquant_kv_bits = FLOAT
    return ref


def _float_target_statistics(layer: nn.Module, ref: nn.Module, name: str, inps: torch.Tensor, finps: torch.Tensor,
                             pos_emb, batch_size: int) -> CrossAccumulator:
    """H̃ and C of the linear ``name`` of ``layer`` (quantized stream ``inps``) and ``ref`` (float stream ``finps``)."""
    lin, ref_lin = layer.get_submodule(name), ref.get_submodule(name)
    acc = CrossAccumulator(lin.in_features, inps.device)
    for b in range(0, inps.shape[0], batch_size):
        x_quant = _capture_input(layer, lin, inps[b : b + batch_size], pos_emb)
        x_float = _capture_input(ref, ref_lin, finps[b : b + batch_size], pos_emb)
        acc.add(x_float, x_quant)
    return acc


def _fit_float_target(named: list[tuple[str, QuantLinear]], c: torch.Tensor, h: torch.Tensor, cfg: WeightQuantConfig) -> None:
    """Replace each quantized linear's weight by the float target's least-squares weight W* for the statistics C, H̃
    (:class:`FloatTargetFit`), which GPTQ then quantizes; the weight becomes float32."""
    fit = FloatTargetFit(c, h, cfg.target_percdamp)
    for _, lin in named:
        if lin.w_bits < FLOAT:
            lin.weight.data = fit(lin.weight.detach())


class LayerPreparer:
    """What a streamed model does before each decoder layer and the output layer are quantized: read them and
    apply the float transforms (pipeline's streamed quantize). The whole-model path passes none."""

    def layer(self, i: int, layer: nn.Module) -> None:
        """Make decoder layer ``i`` ready to quantize (float weights, fused and rotated), in place."""

    def head(self) -> None:
        """Make the output layer ready to quantize."""


class LayerStore(Protocol):
    """Where GPTQ keeps each finished decoder layer, so that a killed run resumes after its last one
    (formats/layer_progress.LayerProgress). Its first ``layers_done`` layers are restored from it instead of
    quantized again; ``output_error`` holds their output errors (full linear names, as ``cfg.stats`` keeps them)."""

    layers_done: int
    output_error: dict

    def load(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer ``i``'s quantized linears: {name relative to the layer: (q int8 (out, in), scales float32)}."""

    def save(self, i: int, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], output_error: dict) -> None:
        """Record layer ``i`` as finished: its linears' integers and scales, and their output errors."""


def _device(model: nn.Module) -> torch.device:
    """The model's device, read from its final norm (a streamed model's first parameters are not read yet)."""
    return model.get_submodule(architecture_of(model.config).final_norm).weight.device


def _embed(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The embedding's output for ``windows`` (n, T): (n, T, dim), the start of a calibration stream, written batch by
    batch into one tensor (n x T x dim float32 is GiBs at GPTQ's default budget: never twice)."""
    embedding = model.get_submodule(architecture_of(model.config).embedding)
    first = embedding(windows[:batch_size])
    stream = first.new_empty(windows.shape[0], *first.shape[1:])
    stream[:batch_size] = first
    for b in range(batch_size, windows.shape[0], batch_size):
        stream[b : b + batch_size] = embedding(windows[b : b + batch_size])
    return stream


def _advance(layer: nn.Module, stream: torch.Tensor, pos_emb, batch_size: int) -> None:
    """Run a decoder layer over a calibration stream (n, T, dim) in batches, writing each batch's output over its
    input (a batch's output depends on its own inputs only): one copy of the stream is alive, not two."""
    for b in range(0, stream.shape[0], batch_size):
        stream[b : b + batch_size] = layer(stream[b : b + batch_size], attention_mask=None, position_embeddings=pos_emb)


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, windows: torch.Tensor, cfg: WeightQuantConfig, progress: bool = True,
                        float_inputs: torch.Tensor | None = None, prepare: LayerPreparer | None = None,
                        store: LayerStore | None = None, after_layer: Callable[..., None] | None = None) -> None:
    """Sequential GPTQ over ``windows`` (n, seqlen) int64 on the model's device (see module docstring).

    ``float_inputs`` (n, seqlen, dim): the float model's embedding output, the start of the float stream that
    ``cfg.float_target`` needs (taken before the embedding was quantized; overwritten layer by layer).
    ``prepare``: reads each layer (and the output layer) just before it is quantized (a streamed model).
    ``store``: each finished layer is saved to it; its first ``store.layers_done`` layers are restored from it (the
    calibration streams are run through them again, which reproduces them exactly) instead of quantized again.
    ``after_layer(i, layer, ref, inps, finps, pos_emb)``: called once a layer is quantized, before it is saved and
    the streams advance (``ref``: its float copy, ``finps``: the float stream; None without the float objective):
    research's seam (experimental/block_tuning.py)."""
    arch = architecture_of(model.config)
    device = _device(model)
    windows = windows.to(device)
    inps = _embed(model, windows, cfg.batch_size)
    finps = float_inputs.to(device) if cfg.float_target else None
    pos_ids = torch.arange(windows.shape[1], device=device)[None]
    pos_emb = model.get_submodule(arch.rotary)(inps[:1], pos_ids)
    errors = cfg.stats.setdefault("output_error", {})
    done = 0 if store is None else store.layers_done
    for i, layer in enumerate(tqdm(arch.decoder_layers(model), desc="gptq", unit="layer", disable=not progress)):
        if prepare is not None:
            prepare.layer(i, layer)
        ref = float_copy(layer) if cfg.float_target else None
        prefix = f"{arch.layers}.{i}."
        if i < done:
            for name, (q, s) in store.load(i).items():
                layer.get_submodule(name).set_quantized(q.to(device), s.to(device))
            errors.update({k: v for k, v in store.output_error.items() if k.startswith(prefix)})
        else:
            for group in arch.groups:
                named = [(prefix + name, layer.get_submodule(name)) for name in group]
                if ref is not None:
                    acc = _float_target_statistics(layer, ref, group[0], inps, finps, pos_emb, cfg.batch_size)
                    _fit_float_target(named, acc.c, acc.h, cfg)
                else:
                    first = layer.get_submodule(group[0])
                    acc = HessianAccumulator(first.in_features, device)
                    _observe(first, acc, stop=True)
                    _run_layer(layer, inps, pos_emb, cfg.batch_size)
                    first.observer = None
                _gptq_linears(named, acc.h, cfg)
                del acc
            if after_layer is not None:
                after_layer(i, layer, ref, inps, finps, pos_emb)
            if store is not None:
                linears = [(n, layer.get_submodule(n)) for n in arch.block_linears()]
                store.save(i, {n: (lin.qweight, lin.scales) for n, lin in linears if lin.weight_mode == "fixed"},
                           {k: v for k, v in errors.items() if k.startswith(prefix)})
        _advance(layer, inps, pos_emb, cfg.batch_size)
        if ref is not None:
            _advance(ref, finps, pos_emb, cfg.batch_size)
            del ref
    head = model.get_submodule(arch.head)
    if prepare is not None:
        prepare.head()
    if head.w_bits < FLOAT:
        norm = model.get_submodule(arch.final_norm)
        if cfg.float_target:
            acc = CrossAccumulator(head.in_features, device)
            for b in range(0, inps.shape[0], cfg.batch_size):
                acc.add(norm(finps[b : b + cfg.batch_size]).reshape(-1, head.in_features).float(),
                        head.quantize_input(norm(inps[b : b + cfg.batch_size])).reshape(-1, head.in_features).float())
            _fit_float_target([(arch.head, head)], acc.c, acc.h, cfg)
        else:
            acc = HessianAccumulator(head.in_features, device)
            for b in range(0, inps.shape[0], cfg.batch_size):
                acc.add(head.quantize_input(norm(inps[b : b + cfg.batch_size])))
        _gptq_linears([(arch.head, head)], acc.h, cfg)


def quantize_model(model: nn.Module, scheme: QuantScheme, cfg: WeightQuantConfig,
                   windows: torch.Tensor | None = None, progress: bool = True,
                   prepare: LayerPreparer | None = None, store: LayerStore | None = None,
                   after_layer: Callable[..., None] | None = None) -> nn.Module:
    """Fake-quantize ``model`` in place under ``scheme`` and fix every quantized weight to integers.

    ``prepare`` (a streamed model, :class:`LayerPreparer`): each layer is read just before it is quantized, so the
    float weights of one layer at a time are in memory. ``store`` (GPTQ): resume from / save finished layers;
    ``after_layer``: a seam after each quantized layer (both: :func:`gptq_quantize_model`)."""
    t0 = time.perf_counter()
    make_fake_quant(model, scheme)
    model.requires_grad_(False)
    if cfg.method == "gptq" and windows is None:
        raise ValueError("GPTQ needs calibration windows")
    float_inputs = None
    if cfg.method == "gptq" and cfg.float_target:  # the float stream starts from the float embedding
        float_inputs = _embed(model, windows.to(_device(model)), cfg.batch_size)
    quantize_embedding(model, scheme, cfg.clip_search)
    if cfg.method == "gptq":
        gptq_quantize_model(model, windows, cfg, progress, float_inputs, prepare, store, after_layer)
    elif cfg.method == "rtn":
        arch = architecture_of(model.config)
        for i, layer in enumerate(arch.decoder_layers(model)):
            if prepare is not None:
                prepare.layer(i, layer)
            for name in arch.block_linears():
                rtn_quantize_linear(layer.get_submodule(name), cfg.clip_search)
        if prepare is not None:
            prepare.head()
        rtn_quantize_linear(model.get_submodule(arch.head), cfg.clip_search)
    else:
        raise ValueError(f"unknown method {cfg.method!r}")
    cfg.stats["quantize_seconds"] = time.perf_counter() - t0
    return model
