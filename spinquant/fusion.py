"""Function-preserving weight transforms: untie, RMSNorm fusion, R1/R2/R4 rotations, channel scales.

Conventions (used everywhere in spinquant):
- A linear weight ``W`` is (out, in) and computes ``y = x @ W.T`` on row vectors ``x``.
- A rotation ``Q`` on the *input* side means ``W <- W @ Q`` (the layer now expects ``x @ Q``).
- A rotation ``Q`` on the *output* side means ``W <- Q.T @ W`` (the layer now emits ``y @ Q``).
- The residual stream is rotated as ``h -> h @ R1``; head values as ``v_h -> v_h @ R2``;
  the down_proj input as ``z -> z @ H4`` (online) with ``W_down <- W_down @ H4``.
- A channel scale ``s`` (positive, one per channel of an activation) multiplies that activation
  ``x -> x * s`` where it is produced (an RMSNorm's weight, a producer's output rows ``W <- diag(s) W``)
  and divides the consumer's input columns ``W <- W diag(1/s)``; see :class:`ChannelScales`.
The arithmetic runs in float64 and the results are cast back to the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM

from spinquant.errors import SpinQuantError
from spinquant.hadamard import OnlineHadamard, apply_hadamard, random_hadamard_matrix

ONLINE_R4_KEY = "spinquant_online_r4"


ROW_CHUNK_ELEMENTS = 1 << 23  # float64 transients of the row-wise transforms: 64 MiB a chunk


def transform_rows_(w: torch.Tensor, fn) -> torch.Tensor:
    """``w[rows] = fn(w[rows] in float64)`` cast back to w's dtype, in place, a chunk of rows at a time.

    Row-wise transforms (``W @ Q``, column scales) of a 128256 x 2048 embedding would need 2 GiB per float64
    copy done whole; in chunks of ROW_CHUNK_ELEMENTS the float64 transients stay at a few dozen MiB.
    """
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, w.shape[-1]))
    for a in range(0, w.shape[0], rows):
        w[a : a + rows] = fn(w[a : a + rows].double()).to(w.dtype)
    return w


def rotate_input_(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """W <- W @ Q in place, W (out, in), Q (in, in) (float64 arithmetic, row chunks: see :func:`transform_rows_`)."""
    q = q.double().to(w.device)
    return transform_rows_(w, lambda rows: rows @ q)


def rotate_output(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Qᵀ @ W in float64, cast back to W's dtype. W (out, in), Q (out, out)."""
    return (q.double().to(w.device).T @ w.double()).to(w.dtype)


def orthogonality_error(q: torch.Tensor) -> float:
    """max |QᵀQ - I|."""
    q = q.double()
    return (q.T @ q - torch.eye(q.shape[0], dtype=torch.float64, device=q.device)).abs().max().item()


@torch.no_grad()
def fuse_norms(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Fold every RMSNorm scale into the linears that read its output; set the norms to 1. In place.

    input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, model.norm -> lm_head.
    Needs untied embeddings (lm_head changes, the embedding does not).
    """
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        raise SpinQuantError("fuse_norms needs untied embeddings: call models.untie_embeddings first")

    def fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
        g = norm.weight.double()
        for lin in linears:
            gd = g.to(lin.weight.device)[None, :]
            transform_rows_(lin.weight.data, lambda rows: rows * gd)
        norm.weight.fill_(1.0)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold(model.model.norm, [model.lm_head])
    return model


def norms_are_fused(model: LlamaForCausalLM) -> bool:
    norms = [model.model.norm] + [n for l in model.model.layers for n in (l.input_layernorm, l.post_attention_layernorm)]
    return all(bool((n.weight == 1).all()) for n in norms)


SCALE_KINDS = ("attn_in", "mlp_in", "v_out", "up_out")


@dataclass
class ChannelScales:
    """Learned per-channel scales of each layer (OSTQuant's "orthogonal + scaling"), float64 on CPU, all positive.

    Each is a function-preserving pair fused into weights the ExecuTorch checkpoint already carries, applied after
    R1/R2 (so in the rotated basis) and before R4:
    - ``attn_in[i]`` (dim,): layer i's input_layernorm weight becomes ``s``, q/k/v input columns ``W diag(1/s)``;
    - ``mlp_in[i]`` (dim,): post_attention_layernorm weight ``s``, gate/up input columns ``W diag(1/s)``;
    - ``v_out[i]`` (n_kv_heads * head_dim,): v_proj output rows ``diag(s) W``, o_proj input columns of every
      attention head divided by its kv head's ``s`` (attention mixes positions, never channels, so this commutes);
    - ``up_out[i]`` (intermediate,): up_proj output rows ``diag(s) W``, down_proj input columns ``W diag(1/s)``
      (silu(gate) * up is linear in up), then R4 folds ``H4`` on top.
    The quantized activations (norm outputs, attention output, down_proj input) are the scaled ones: a scale moves
    quantization difficulty between an activation channel and the weight columns that read it.
    """

    attn_in: list[torch.Tensor]
    mlp_in: list[torch.Tensor]
    v_out: list[torch.Tensor]
    up_out: list[torch.Tensor]

    @staticmethod
    def channels(cfg) -> dict[str, int]:
        """Channels per layer of each kind (fusion.SCALE_KINDS) for a model config."""
        return {"attn_in": cfg.hidden_size, "mlp_in": cfg.hidden_size,
                "v_out": cfg.num_key_value_heads * head_dim(cfg), "up_out": cfg.intermediate_size}

    def check(self, cfg, where: str = "channel scales") -> None:
        """Shapes match the model, one per layer, every value finite and positive."""
        for kind, n in self.channels(cfg).items():
            shape = (n,)
            per_layer = getattr(self, kind)
            if len(per_layer) != cfg.num_hidden_layers:
                raise SpinQuantError(f"{where}: {len(per_layer)} '{kind}' scales for a model with {cfg.num_hidden_layers} layers")
            for i, s in enumerate(per_layer):
                if tuple(s.shape) != shape:
                    raise SpinQuantError(f"{where}: '{kind}' of layer {i} has shape {tuple(s.shape)}, the model needs {shape}")
                if not bool(torch.isfinite(s).all() and (s > 0).all()):
                    raise SpinQuantError(f"{where}: '{kind}' of layer {i} holds values that are not finite and positive")


@dataclass
class Rotations:
    """The rotations of one model. r1: (dim, dim); r2: one (head_dim, head_dim) per layer; r4: online H on down_proj;
    scales: optional learned channel scales (:class:`ChannelScales`), fused with the rotations.

    Any of them may be absent (None / empty list / False). Matrices are float64 on CPU.
    """

    r1: torch.Tensor | None = None
    r2: list[torch.Tensor] = field(default_factory=list)
    r4: bool = False
    scales: ChannelScales | None = None

    @staticmethod
    def random_hadamard(model: LlamaForCausalLM, seed: int, r1: bool = True, r2: bool = True, r4: bool = True) -> "Rotations":
        """Seeded random Hadamard R1 and per-layer R2 (each D @ H with its own signs), and R4."""
        return Rotations.random_hadamard_for(model.config, seed, r1, r2, r4)

    @staticmethod
    def random_hadamard_for(cfg, seed: int, r1: bool = True, r2: bool = True, r4: bool = True) -> "Rotations":
        """:meth:`random_hadamard` from a model's config alone (no weights needed)."""
        hd = head_dim(cfg)
        return Rotations(
            r1=random_hadamard_matrix(cfg.hidden_size, seed, "R1 (hidden size)") if r1 else None,
            r2=[random_hadamard_matrix(hd, seed * 1_000_003 + 1 + i, "R2 (head_dim)") for i in range(cfg.num_hidden_layers)]
            if r2
            else [],
            r4=r4,
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class HadamardInputLinear(nn.Linear):
    """nn.Linear whose input is first rotated online: ``y = (x @ H_n) @ W.T``. Same state-dict keys as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_rotation = OnlineHadamard(in_features)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "HadamardInputLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.input_rotation = OnlineHadamard(linear.in_features)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_rotation(x))


def _install_online_r4(model: LlamaForCausalLM) -> None:
    for layer in model.model.layers:
        if not isinstance(layer.mlp.down_proj, HadamardInputLinear):
            layer.mlp.down_proj = HadamardInputLinear.wrap(layer.mlp.down_proj)
    setattr(model.config, ONLINE_R4_KEY, True)


def has_online_r4(model: LlamaForCausalLM) -> bool:
    return bool(getattr(model.config, ONLINE_R4_KEY, False))


def restore_online_rotations(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Re-install the online R4 modules a saved rotated model needs (its config carries the flag)."""
    if has_online_r4(model):
        _install_online_r4(model)
    return model


def _check_shape(name: str, q: torch.Tensor, n: int) -> None:
    if tuple(q.shape) != (n, n):
        raise SpinQuantError(f"{name} has shape {tuple(q.shape)}, the model needs ({n}, {n})")


@torch.no_grad()
def apply_rotations(model: LlamaForCausalLM, rot: Rotations) -> LlamaForCausalLM:
    """Fuse ``rot`` into the weights of a norm-fused, untied model, in place (float64 arithmetic).

    R1: embedding rows and every residual reader (q/k/v/gate/up/lm_head) ``W @ R1``; residual writers
    (o_proj, down_proj) ``R1ᵀ @ W``. R2: v_proj output per kv head ``R2ᵀ @ W_h``, o_proj input per
    attention head ``W_h @ R2`` (GQA: one R2 per layer shared by all heads). R4: down_proj ``W @ H``
    plus an online ``x @ H`` before it. Channel scales (if any) between R1/R2 and R4, see :class:`ChannelScales`.
    """
    cfg = model.config
    if rot.scales is not None:
        rot.scales.check(cfg)
    if rot.r1 is not None and not norms_are_fused(model):
        raise SpinQuantError("R1 needs fused RMSNorms (a norm with a scale does not commute with rotation): call fuse_norms first")
    hd = head_dim(cfg)
    if rot.r1 is not None:
        _check_shape("R1", rot.r1, cfg.hidden_size)
        r1 = rot.r1.double()
        rotate_input_(model.model.embed_tokens.weight.data, r1)  # the embedding's rows are residual vectors
        rotate_input_(model.lm_head.weight.data, r1)
    if rot.r2 and len(rot.r2) != cfg.num_hidden_layers:
        raise SpinQuantError(f"{len(rot.r2)} R2 matrices for a model with {cfg.num_hidden_layers} layers")
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if rot.r1 is not None:
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                rotate_input_(lin.weight.data, r1)
            for lin in (attn.o_proj, mlp.down_proj):
                lin.weight.copy_(rotate_output(lin.weight, r1))
        if rot.r2:
            r2 = rot.r2[i].double()
            _check_shape(f"R2 of layer {i}", r2, hd)
            wv = attn.v_proj.weight
            v = wv.double().view(-1, hd, wv.shape[1])  # (n_kv, hd, dim)
            wv.copy_(torch.einsum("ji,hjd->hid", r2.to(wv.device), v).reshape(wv.shape).to(wv.dtype))
            wo = attn.o_proj.weight
            o = wo.double().view(wo.shape[0], -1, hd)  # (dim, n_heads, hd)
            wo.copy_((o @ r2.to(wo.device)).reshape(wo.shape).to(wo.dtype))
        if rot.scales is not None:
            _apply_layer_scales(layer, rot.scales, i, cfg)
        if rot.r4:
            # W @ H4 by the fast Walsh-Hadamard transform of each row (float64): O(n log n) a row instead of a dense
            # n x n product (at n = 8192 the dense fold was most of the rotate time of a 3B model)
            transform_rows_(mlp.down_proj.weight.data, apply_hadamard)
    if rot.r4:
        _install_online_r4(model)
    return model


def per_head_scales(v_out: torch.Tensor, hd: int, n_heads: int) -> torch.Tensor:
    """(n_heads, hd): the v_out scales (n_kv_heads * hd,) each attention head's output carries; head h reads kv head
    h // (n_heads / n_kv_heads), as transformers' repeat_kv. Differentiable."""
    per_kv = v_out.view(-1, hd)
    return per_kv.repeat_interleave(n_heads // per_kv.shape[0], dim=0)


def _apply_layer_scales(layer: nn.Module, scales: ChannelScales, i: int, cfg) -> None:
    """Fuse layer ``i``'s channel scales (see :class:`ChannelScales`) into its norms and linears, in place, float64."""
    attn, mlp = layer.self_attn, layer.mlp
    hd = head_dim(cfg)

    def divide_columns(lin: nn.Linear, s: torch.Tensor) -> None:
        inv = (1.0 / s.double()).to(lin.weight.device)[None, :]
        transform_rows_(lin.weight.data, lambda rows: rows * inv)

    def multiply_rows(lin: nn.Linear, s: torch.Tensor) -> None:
        w = lin.weight
        w.copy_((w.double() * s.double().to(w.device)[:, None]).to(w.dtype))

    for norm, s, readers in ((layer.input_layernorm, scales.attn_in[i], (attn.q_proj, attn.k_proj, attn.v_proj)),
                             (layer.post_attention_layernorm, scales.mlp_in[i], (mlp.gate_proj, mlp.up_proj))):
        norm.weight.copy_((norm.weight.double() * s.double().to(norm.weight.device)).to(norm.weight.dtype))
        for lin in readers:
            divide_columns(lin, s)
    multiply_rows(attn.v_proj, scales.v_out[i])
    divide_columns(attn.o_proj, per_head_scales(scales.v_out[i], hd, cfg.num_attention_heads).reshape(-1))
    multiply_rows(mlp.up_proj, scales.up_out[i])
    divide_columns(mlp.down_proj, scales.up_out[i])


def fuse_and_rotate(model: LlamaForCausalLM, rot: Rotations) -> LlamaForCausalLM:
    """Norm fusion then rotations: the full function-preserving transform, in place."""
    return apply_rotations(fuse_norms(model), rot)


# --- R.bin -------------------------------------------------------------------------------------

ORTHOGONALITY_TOL = 1e-4


SCALES_FILE = "scales.safetensors"  # beside an R.bin: the learned channel scales that go with its rotations


def scales_path(rbin) -> Path:
    """Where the channel scales of the rotations in ``rbin`` live: ``scales.safetensors`` in the same directory.

    R.bin keeps the SpinQuant layout (square orthogonal matrices only, which other tools read); the scales are
    another file, and the two are one unit: every spinquant reader of an R.bin applies the scales beside it."""
    return Path(rbin).with_name(SCALES_FILE)


def save_scales(scales: ChannelScales, path) -> None:
    """Write the scales as float32 safetensors: ``model.layers.{i}.{kind}_scale`` (kind in SCALE_KINDS)."""
    from safetensors.torch import save_file

    state = {f"model.layers.{i}.{kind}_scale": s.to(torch.float32).contiguous()
             for kind in SCALE_KINDS for i, s in enumerate(getattr(scales, kind))}
    save_file(state, str(path))


def load_scales(path) -> ChannelScales:
    """Read a scales.safetensors written by :func:`save_scales` (safetensors: data only, no code)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise SpinQuantError(f"cannot read the channel scales {path}: {exc}. It is corrupt or not a spinquant scales "
                             f"file; re-run the learning that wrote it") from exc
    per_kind: dict[str, list[torch.Tensor]] = {}
    for kind in SCALE_KINDS:
        keys = sorted((k for k in state if k.endswith(f".{kind}_scale")), key=lambda k: int(k.split(".")[2]))
        per_kind[kind] = [state[k].double() for k in keys]
    counts = {len(v) for v in per_kind.values()}
    if len(counts) != 1 or not next(iter(counts)) or len(state) != sum(len(v) for v in per_kind.values()):
        raise SpinQuantError(f"{path} is not a spinquant scales file (expected model.layers.<i>.<kind>_scale for kind in "
                             f"{', '.join(SCALE_KINDS)}, the same layers for each)")
    for kind, per_layer in per_kind.items():
        for i, v in enumerate(per_layer):
            if v.ndim != 1 or not bool(torch.isfinite(v).all() and (v > 0).all()):
                raise SpinQuantError(f"{path}: '{kind}' of layer {i} is not a vector of finite positive scales")
    return ChannelScales(**per_kind)


def save_rbin(rot: Rotations, path) -> None:
    """Write R.bin in the SpinQuant layout: {"R1": (dim, dim), "model.layers.{i}.self_attn.R2": (hd, hd)}, float32;
    with channel scales, also :data:`SCALES_FILE` beside it (:func:`scales_path`)."""
    state: dict[str, torch.Tensor] = {}
    if rot.r1 is not None:
        state["R1"] = rot.r1.to(torch.float32).contiguous()
    for i, r2 in enumerate(rot.r2):
        state[f"model.layers.{i}.self_attn.R2"] = r2.to(torch.float32).contiguous()
    for name, q in state.items():
        err = orthogonality_error(q)
        if err > ORTHOGONALITY_TOL:
            raise SpinQuantError(f"refusing to save {name}: not orthogonal (max|QᵀQ-I| = {err:.2e})")
    if rot.scales is not None:
        save_scales(rot.scales, scales_path(path))
    torch.save(state, path)


def load_rbin(path, r4: bool = True) -> Rotations:
    """Read an R.bin (SpinQuant layout), checking each matrix is orthogonal, and the channel scales beside it if there
    are any (:func:`scales_path`). R4 is not stored; pass it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise SpinQuantError(f"no such rotation file: {path}") from exc
    except Exception as exc:
        from spinquant.models import unreadable_torch_file  # local import: models imports this module inside load_hf

        raise SpinQuantError(unreadable_torch_file("rotation file", path)) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpinQuantError(f"{path} is not an R.bin: expected a dict of tensors")
    for name, q in state.items():
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            raise SpinQuantError(f"{path}: {name} is not a square matrix (shape {tuple(q.shape)})")
        err = orthogonality_error(q)
        if err > ORTHOGONALITY_TOL:
            raise SpinQuantError(f"{path}: {name} is not orthogonal (max|QᵀQ-I| = {err:.2e})")
    r2_keys = sorted((k for k in state if k.endswith(".self_attn.R2")), key=lambda k: int(k.split(".")[2]))
    return Rotations(
        r1=state["R1"].double() if "R1" in state else None,
        r2=[state[k].double() for k in r2_keys],
        r4=r4,
        scales=load_scales(scales_path(path)) if scales_path(path).is_file() else None,
    )
