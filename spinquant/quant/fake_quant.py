"""Fake-quantized model: the float model with every quantized tensor simulated exactly as ExecuTorch runs it.

``make_fake_quant(model, scheme)`` swaps, in place:
- every block linear the family's map names (Llama: q/k/v/o/gate/up/down) for a :class:`QuantLinear` (A: per-token
  activations of ``scheme.a_bits``, W: ``scheme.w_bits`` per group, bias kept in float), keeping down_proj's online
  Hadamard (R4) in front of the activation quantizer, as ExecuTorch's FeedForward does;
- lm_head for a :class:`QuantLinear` (W8 per channel, A8 per token, torchao's default eps);
- attention for the ``spinquant_sdpa`` function when the KV cache is quantized (per-token, per-head
  asymmetric K/V, with the R3 Hadamard on Q and K before it).
Weights start in float (``weight_mode='float'``); range setting/GPTQ fix them to integers with
:meth:`QuantLinear.set_quantized`. Parameter names are unchanged (``...q_proj.weight``), so
``torch.func.functional_call`` can feed rotated weights while rotations are learned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from spinquant.architectures import architecture_of
from spinquant.hadamard import HadamardInputLinear, OnlineHadamard, apply_hadamard
from spinquant.quant.primitives import (EPS_8DA4W, EPS_8DA8W, dequantize_weight, fake_quant_per_token_asym,
                                        fake_quant_per_token_sym, fake_quant_weight, fake_quant_weight_given_integers,
                                        fixed_linear, pack_int4, unpack_int4)
from spinquant.quant.scheme import FLOAT, QuantScheme

ATTN_IMPL = "spinquant_sdpa"


class QuantLinear(nn.Module):
    """``y = F.linear(Aq(R(x)), W, b)``: optional online rotation R, activation fake-quant Aq, weight W, float bias b.

    weight_mode: 'float' (W as is), 'dynamic' (W fake-quantized round-to-nearest on every forward, with
    STE: for learning rotations against a quantized-weight loss), 'fixed' (W = q * scales, integers set
    by range setting / GPTQ, read as ``qweight`` (int8, (out, in)) with the ``scales`` buffer for export). A fixed
    layer holds no float weight (``weight`` is None): the forward dequantizes ``q * scales`` when it runs, and the
    integers are kept packed, two 4-bit ones a byte (``qweight_storage`` uint8 (out, in / 2); int8 (out, in) for
    wider ones), so a quantized 3B model takes half a byte a 4-bit weight in memory, not its float32 size
    (bit-identical to storing the float product: the packing is lossless).
    ``observer``, when set, is called with the exact input of the matmul (for GPTQ Hessians).
    ``weight_override`` (and ``bias_override``), when set, replace ``weight`` (``bias``) in the forward (rotation
    learning feeds the rotated weights this way, so gradient-checkpoint recomputation sees the same tensors).
    ``weight_integers`` ('dynamic' mode only), when set to (q, scales), replaces round-to-nearest: the
    forward uses ``q * scales`` (rotation learning with GPTQ in the loop), the gradient is the STE plus
    the scale path (:func:`~spinquant.quant.primitives.fake_quant_weight_given_integers`).
    ``scale_log_offset`` ('fixed' mode only), when set to θ (out, in/g), multiplies the scales by exp(θ) in the
    forward, differentiably (end-to-end scale tuning, quant/scale_tuning.py, which then bakes them into ``scales``).
    """

    def __init__(self, linear: nn.Linear, w_bits: int, group_size: int | None, a_bits: int, a_symmetric: bool = False,
                 a_eps: float = EPS_8DA4W, a_clip: float = 1.0, input_rotation: OnlineHadamard | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the bias stays float (ExecuTorch's 8da4w linear adds it so)
        self.w_bits, self.group_size = w_bits, group_size
        self.a_bits, self.a_symmetric, self.a_eps, self.a_clip = a_bits, a_symmetric, a_eps, a_clip
        self.input_rotation = input_rotation
        self.weight_mode = "float"
        self.register_buffer("qweight_storage", None)
        self.register_buffer("scales", None)
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.weight_override: torch.Tensor | None = None
        self.bias_override: torch.Tensor | None = None
        self.weight_integers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scale_log_offset: torch.Tensor | None = None

    @property
    def qweight(self) -> torch.Tensor | None:
        """A fixed layer's integers, int8 (out, in) (unpacked from ``qweight_storage`` when packed); None before."""
        stored = self.qweight_storage
        return stored if stored is None or stored.dtype == torch.int8 else unpack_int4(stored)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        if self.a_bits >= FLOAT:
            return x
        if self.a_symmetric:
            return fake_quant_per_token_sym(x, self.a_bits, self.a_clip)
        return fake_quant_per_token_asym(x, self.a_bits, self.a_eps, self.a_clip)

    def effective_weight(self) -> torch.Tensor:
        if self.weight_mode == "fixed":
            scales = self.scales if self.scale_log_offset is None else self.scales * self.scale_log_offset.exp()
            return dequantize_weight(self.qweight, scales, self.group_size)
        w = self.weight if self.weight_override is None else self.weight_override
        if self.weight_mode == "dynamic" and self.w_bits < FLOAT:
            if self.weight_integers is not None:
                return fake_quant_weight_given_integers(w, *self.weight_integers, self.group_size)
            return fake_quant_weight(w, self.w_bits, self.group_size)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self.observer is not None:
            self.observer(x)
        b = self.bias if self.bias_override is None else self.bias_override
        if self.weight_mode == "fixed":  # dequantized a chunk of rows at a time (a large output layer never whole)
            return fixed_linear(x.to(self.scales.dtype), self.qweight, self.scales, self.group_size, self.scale_log_offset,
                                None if b is None else b.to(self.scales.dtype))
        w = self.effective_weight()
        return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Fix the weight to integers ``q`` (int8, (out, in)) times per-group ``scales`` (float32, (out, in/g)).

        The float weight is released (``weight`` becomes None; see the class docstring)."""
        q = q.to(torch.int8)
        self.qweight_storage = pack_int4(q) if self.w_bits <= 4 and q.shape[-1] % 2 == 0 else q
        self.scales = scales.to(torch.float32)
        self.weight = None
        self.weight_mode = "fixed"

    def extra_repr(self) -> str:
        g = self.group_size or "channel"
        return (f"in={self.in_features}, out={self.out_features}, W{self.w_bits} group={g} "
                f"A{self.a_bits}{'sym' if self.a_symmetric else 'asym'}, mode={self.weight_mode}")


def quantized_kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, **kwargs):
    """SDPA with R3 (Hadamard over head_dim) on Q and K, then K and V fake-quantized per token and head.

    query/key/value: (batch, heads, T, head_dim) after RoPE, as transformers passes them.
    """
    bits = getattr(module, "spinquant_kv_bits", FLOAT)
    if getattr(module, "spinquant_r3", False):
        query, key = apply_hadamard(query), apply_hadamard(key)
    if bits < FLOAT:
        key = fake_quant_per_token_asym(key, bits)
        value = fake_quant_per_token_asym(value, bits)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, quantized_kv_attention)


def make_fake_quant(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Swap in QuantLinear modules and the KV-quant attention, in place (see module docstring)."""
    scheme.check_model(model.config)
    arch = architecture_of(model.config)
    layers = arch.decoder_layers(model)
    for layer in layers:
        for name in arch.block_linears():
            parent_name, attr = name.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            lin = getattr(parent, attr)
            if isinstance(lin, QuantLinear):
                continue
            rot = lin.input_rotation if isinstance(lin, HadamardInputLinear) else None
            setattr(parent, attr, QuantLinear(lin, scheme.w_bits, scheme.group, scheme.a_bits, scheme.a_symmetric,
                                              EPS_8DA4W, scheme.a_clip, rot))
        attn = layer.get_submodule(arch.attention)
        attn.spinquant_kv_bits = scheme.kv_bits
        attn.spinquant_r3 = scheme.kv_bits < FLOAT
    head_parent, head_attr = ("", arch.head) if "." not in arch.head else arch.head.rsplit(".", 1)
    head = model.get_submodule(arch.head)
    if not isinstance(head, QuantLinear):
        setattr(model.get_submodule(head_parent), head_attr,
                QuantLinear(head, scheme.output_w_bits, None, scheme.output_a_bits, False, EPS_8DA8W))
    if scheme.kv_bits < FLOAT:
        model.config._attn_implementation = ATTN_IMPL
        for layer in layers:
            layer.get_submodule(arch.attention).config._attn_implementation = ATTN_IMPL
    model.spinquant_scheme = scheme
    return model


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(name, module) of every QuantLinear, block linears first in layer order, the output layer last."""
    head = architecture_of(model.config).head
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and name != head:
            yield name, mod
    if isinstance(model.get_submodule(head), QuantLinear):
        yield head, model.get_submodule(head)


class QuantEmbedding(nn.Module):
    """An int8 per-row embedding: rows ``qweight`` (vocab, dim) int8 times ``scales`` (vocab,), dequantized for the
    looked-up ids only (``q[ids] * s[ids]``, elementwise the same float32 product as dequantizing the whole table, so
    bit-identical to it), so a quantized model holds no float32 copy of the table (1 GiB at 128256 x 2048)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("scales", scales.to(torch.float32))
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(torch.float32) * self.scales[ids][..., None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


@torch.no_grad()
def set_embedding_quantized(model: nn.Module, q: torch.Tensor, scales: torch.Tensor) -> None:
    """Fix the embedding to int8 rows ``q`` (vocab, dim) times per-row ``scales`` (vocab,): a :class:`QuantEmbedding`
    takes its place (its float table is released)."""
    name = architecture_of(model.config).embedding
    parent, attr = name.rsplit(".", 1)
    old = model.get_submodule(name)
    setattr(model.get_submodule(parent), attr, QuantEmbedding(q, scales, getattr(old, "padding_idx", None)))
