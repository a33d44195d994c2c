"""Function-preserving weight transforms: untie, RMSNorm fusion, R1/R2/R4 rotations, channel scales.

Where each transform acts is read from the model family's map (:mod:`spinquant.architectures`, which also states
the side conventions: input side ``W <- W @ Q``, output side ``W <- Q.T @ W``). The residual stream is rotated as
``h -> h @ R1``, head values as ``v_h -> v_h @ R2``, the down_proj input as ``z -> z @ H4`` (online) with
``W_down <- W_down @ H4``. The arithmetic runs in float64 and the results are cast back to the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spinquant.architectures import Architecture, architecture_of, head_dim
from spinquant.errors import SpinQuantError
from spinquant.hadamard import HadamardInputLinear, apply_hadamard, random_hadamard_matrix
from spinquant.quant.primitives import row_slices

ONLINE_R4_KEY = "spinquant_online_r4"
ORTHOGONALITY_TOL = 1e-4


ROW_CHUNK_ELEMENTS = 1 << 23  # float64 transients of the row-wise transforms: 64 MiB a chunk


def transform_rows_(w: torch.Tensor, fn) -> torch.Tensor:
    """``w[rows] = fn(w[rows] in float64)`` cast back to w's dtype, in place, a chunk of rows at a time.

    Row-wise transforms (``W @ Q``, column scales) of a 128256 x 2048 embedding would need 2 GiB per float64
    copy done whole; in chunks of ROW_CHUNK_ELEMENTS the float64 transients stay at a few dozen MiB.
    """
    for rows in row_slices(w.shape[0], w.shape[-1], ROW_CHUNK_ELEMENTS):
        w[rows] = fn(w[rows].double()).to(w.dtype)
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


def _fold_norm(norm: nn.Module, linears: list[nn.Module]) -> None:
    """Fold an RMSNorm's scale into the input columns of ``linears`` (``W <- W diag(g)``, float64) and set it to 1."""
    g = norm.weight.double()
    for lin in linears:
        gd = g.to(lin.weight.device)[None, :]
        transform_rows_(lin.weight.data, lambda rows: rows * gd)
    norm.weight.fill_(1.0)


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module, arch: Architecture) -> None:
    """Fold one decoder layer's RMSNorms into the linears that read them (the map's ``norm``), in place."""
    for norm, readers in arch.norm_readers().items():
        _fold_norm(layer.get_submodule(norm), [layer.get_submodule(r) for r in readers])


@torch.no_grad()
def fuse_final_norm(model: nn.Module) -> None:
    """Fold the final RMSNorm into the output layer, in place."""
    arch = architecture_of(model.config)
    _fold_norm(model.get_submodule(arch.final_norm), [model.get_submodule(arch.head)])


@torch.no_grad()
def fuse_norms(model: nn.Module) -> nn.Module:
    """Fold every RMSNorm scale into the linears that read its output (the map's ``norm``); set the norms to 1.
    In place. Needs untied embeddings (the output layer changes, the embedding does not)."""
    arch = architecture_of(model.config)
    head = model.get_submodule(arch.head)
    if head.weight.data_ptr() == model.get_submodule(arch.embedding).weight.data_ptr():
        raise SpinQuantError("fuse_norms needs untied embeddings: call untie_embeddings first")
    for layer in arch.decoder_layers(model):
        fuse_layer_norms(layer, arch)
    fuse_final_norm(model)
    return model


def norms_are_fused(model: nn.Module) -> bool:
    return all(bool((n.weight == 1).all()) for _, n in architecture_of(model.config).norms(model))


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
    def random_hadamard(model: nn.Module, seed: int, r1: bool = True, r2: bool = True, r4: bool = True) -> "Rotations":
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


def install_online_r4(model: nn.Module) -> None:
    """Wrap every R4 linear (the map's input side "R4") in :class:`HadamardInputLinear` (the online ``x @ H``) and mark
    the config; no weight is read (the skeleton of a streamed model may be on the meta device)."""
    arch = architecture_of(model.config)
    for layer in arch.decoder_layers(model):
        for name in arch.rotated("R4", "input"):
            lin = layer.get_submodule(name)
            if not isinstance(lin, HadamardInputLinear):
                parent, attr = name.rsplit(".", 1)
                setattr(layer.get_submodule(parent), attr, HadamardInputLinear.wrap(lin))
    setattr(model.config, ONLINE_R4_KEY, True)


def has_online_r4(model: nn.Module) -> bool:
    return bool(getattr(model.config, ONLINE_R4_KEY, False))


def restore_online_rotations(model: nn.Module) -> nn.Module:
    """Re-install the online R4 modules a saved rotated model needs (its config carries the flag)."""
    if has_online_r4(model):
        install_online_r4(model)
    return model


def _check_shape(name: str, q: torch.Tensor, n: int) -> None:
    if tuple(q.shape) != (n, n):
        raise SpinQuantError(f"{name} has shape {tuple(q.shape)}, the model needs ({n}, {n})")


@torch.no_grad()
def apply_rotations(model: nn.Module, rot: Rotations) -> nn.Module:
    """Fuse ``rot`` into the weights of a norm-fused, untied model, in place (float64 arithmetic), where the map says:
    :func:`check_rotations`, the embedding and output layer (:func:`rotate_ends`), every decoder layer
    (:func:`rotate_layer`), then the online R4 modules."""
    if rot.r1 is not None and not norms_are_fused(model):
        raise SpinQuantError("R1 needs fused RMSNorms (a norm with a scale does not commute with rotation): call fuse_norms first")
    check_rotations(model.config, rot)
    rotate_ends(model, rot)
    for i, layer in enumerate(architecture_of(model.config).decoder_layers(model)):
        rotate_layer(layer, i, rot, model.config)
    if rot.r4:
        install_online_r4(model)
    return model


def check_rotations(cfg, rot: Rotations) -> None:
    """Shapes of R1, R2 (one per layer) and the channel scales against the model's config; SpinQuantError otherwise."""
    if rot.scales is not None:
        rot.scales.check(cfg)
    if rot.r1 is not None:
        _check_shape("R1", rot.r1, cfg.hidden_size)
    if rot.r2 and len(rot.r2) != cfg.num_hidden_layers:
        raise SpinQuantError(f"{len(rot.r2)} R2 matrices for a model with {cfg.num_hidden_layers} layers")
    for i, r2 in enumerate(rot.r2):
        _check_shape(f"R2 of layer {i}", r2, head_dim(cfg))


@torch.no_grad()
def rotate_ends(model: nn.Module, rot: Rotations, embedding: bool = True, head: bool = True) -> None:
    """R1 on the embedding's rows (residual vectors) and the output layer's input side: ``W <- W @ R1``, in place."""
    if rot.r1 is None:
        return
    arch = architecture_of(model.config)
    for name, wanted in ((arch.embedding, embedding), (arch.head, head)):
        if wanted:
            rotate_input_(model.get_submodule(name).weight.data, rot.r1)


@torch.no_grad()
def rotate_layer(layer: nn.Module, i: int, rot: Rotations, cfg) -> None:
    """Fuse ``rot`` into decoder layer ``i`` (norm-fused), in place, float64: R1 (input side ``W @ R1``, output side
    ``R1ᵀ @ W``), R2 (output side per kv head ``R2ᵀ @ W_h``, input side per attention head ``W_h @ R2``), the channel
    scales (after R1/R2), then R4's fold ``W @ H`` (its online half: :func:`install_online_r4`)."""
    arch = architecture_of(cfg)
    hd = head_dim(cfg)
    rows = arch.output_rows(cfg)
    if rot.r1 is not None:
        r1 = rot.r1.double()
        for name in arch.rotated("R1", "input"):
            rotate_input_(layer.get_submodule(name).weight.data, r1)
        for name in arch.rotated("R1", "output"):
            for t in _output_tensors(layer.get_submodule(name), rows.get(name)):
                t.copy_(rotate_output(t, r1))
    if rot.r2:
        r2 = rot.r2[i].double()
        for name in arch.rotated("R2", "output"):  # per kv head: (n_kv, hd, in)
            for t in _output_tensors(layer.get_submodule(name), rows.get(name)):
                heads = t.double().view(-1, hd, t.shape[1])
                t.copy_(torch.einsum("ji,hjd->hid", r2.to(t.device), heads).reshape(t.shape).to(t.dtype))
        for name in arch.rotated("R2", "input"):  # per attention head: (out, n_heads, hd)
            w = layer.get_submodule(name).weight
            w.copy_((w.double().view(w.shape[0], -1, hd) @ r2.to(w.device)).reshape(w.shape).to(w.dtype))
    if rot.scales is not None:
        _apply_layer_scales(layer, arch, rot.scales, i, cfg)
    if rot.r4:
        # W @ H4 by the fast Walsh-Hadamard transform of each row (float64): O(n log n) a row instead of a dense
        # n x n product (at n = 8192 the dense fold was most of the rotate time of a 3B model)
        for name in arch.rotated("R4", "input"):
            transform_rows_(layer.get_submodule(name).weight.data, apply_hadamard)


def _output_tensors(linear: nn.Module, rows: slice | None) -> list[torch.Tensor]:
    """The (out, in) weight and, if any, the (out, 1) bias of ``linear`` (views): the tensors an output-side transform
    acts on, restricted to ``rows`` for a fused linear."""
    sl = rows or slice(None)
    tensors = [linear.weight.data[sl]]
    if linear.bias is not None:
        tensors.append(linear.bias.data[sl, None])
    return tensors


def per_head_scales(v_out: torch.Tensor, hd: int, n_heads: int) -> torch.Tensor:
    """(n_heads, hd): the v_out scales (n_kv_heads * hd,) each attention head's output carries; head h reads kv head
    h // (n_heads / n_kv_heads), as transformers' repeat_kv. Differentiable."""
    per_kv = v_out.view(-1, hd)
    return per_kv.repeat_interleave(n_heads // per_kv.shape[0], dim=0)


def _apply_layer_scales(layer: nn.Module, arch: Architecture, scales: ChannelScales, i: int, cfg) -> None:
    """Fuse layer ``i``'s channel scales into its norms and linears, pair by pair as the map declares, in place, float64."""
    hd = head_dim(cfg)
    for pair in arch.scales:
        s = getattr(scales, pair.kind)[i].double()
        module = layer.get_submodule(pair.producer)  # a norm's weight (n,) or a linear's rows (n, in) and bias (n,)
        for producer in (module.weight, getattr(module, "bias", None)):
            if producer is not None:
                shape = (-1,) + (1,) * (producer.dim() - 1)
                producer.data.copy_((producer.double() * s.to(producer.device).view(shape)).to(producer.dtype))
        divisor = per_head_scales(s, hd, cfg.num_attention_heads).reshape(-1) if pair.per_head else s
        for name in pair.consumers:
            w = layer.get_submodule(name).weight.data
            inv = (1.0 / divisor).to(w.device)[None, :]
            transform_rows_(w, lambda rows: rows * inv)


def fuse_and_rotate(model: nn.Module, rot: Rotations) -> nn.Module:
    """Norm fusion then rotations: the full function-preserving transform, in place."""
    return apply_rotations(fuse_norms(model), rot)
