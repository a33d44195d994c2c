"""Where the transforms act, per model family, declared as data: the one map fusion, the learner and GPTQ read.

Conventions (everywhere in spinquant): a linear weight ``W`` is (out, in) and computes ``y = x @ W.T``.
- ``input`` side, rotation Q: ``W <- W @ Q`` (the layer now expects ``x @ Q``).
- ``output`` side, rotation Q: ``W <- Q.T @ W`` (the layer now emits ``y @ Q``).
- R1 (hidden, hidden) rotates the residual stream; R2 (head_dim, head_dim) each head's values: on v_proj's output
  side per kv head, on o_proj's input side per attention head (GQA: one R2 per layer for all heads); R4 is a
  Hadamard of the intermediate size on down_proj's input side, with its other half computed online.
- An RMSNorm's weight folds into the input columns of the linears that read its output (``norm`` below).
- A channel scale ``s`` multiplies an activation where it is produced (a norm's weight, or a linear's output rows)
  and divides the input columns of its consumers (:class:`ScalePair`).

- A fused linear (Phi-3's qkv_proj, gate_up_proj) stacks parts along its rows (``parts``); an output-side transform
  of one part acts on that part's rows only (``Linear.rows``), and the ExecuTorch checkpoint splits it into one
  Meta linear per part. Biases follow their rows through every output-side transform.

Adding a family that computes the same graph under other module names is adding one :class:`Architecture`; a
family whose graph differs where a rotation must commute is refused by :func:`architecture_of` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from transformers import LlamaForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from spinquant.errors import SpinQuantError


@dataclass(frozen=True)
class Linear:
    """A linear of a decoder layer (``name``, its path inside the layer) and the transforms on each side of it.

    ``input``: "R1", "R2" (per attention head) or "R4" (Hadamard, online before it) or None;
    ``output``: "R1" or "R2" (per kv head) or None; ``norm``: the RMSNorm whose output it reads, folded into it;
    ``rows``: for a fused linear, the part (:attr:`Architecture.parts`) whose rows the output-side transform acts on."""

    name: str
    input: str | None = None
    output: str | None = None
    norm: str | None = None
    rows: str | None = None


@dataclass(frozen=True)
class ScalePair:
    """A function-preserving channel-scale pair (``kind`` of :class:`spinquant.fusion.ChannelScales`): the
    ``producer`` (an RMSNorm, whose weight becomes ``s``, or a linear whose output rows become ``diag(s) W``)
    and the ``consumers`` whose input columns become ``W diag(1/s)`` (``per_head``: the consumer reads every
    attention head, each dividing by its kv head's scales)."""

    kind: str
    producer: str
    consumers: tuple[str, ...]
    per_head: bool = False


@dataclass(frozen=True)
class Architecture:
    """One model family's geometry. Module paths: ``layers`` from the model, the rest inside a decoder layer;
    ``linears`` in execution order; ``groups``: linears that share one input (hence one GPTQ Hessian), in order."""

    model_type: str
    model_class: type
    backbone: str  # the decoder stack without the output layer (called with inputs_embeds, gives last_hidden_state)
    layers: str
    embedding: str
    final_norm: str
    head: str
    rotary: str  # the rotary-embedding module (position embeddings a decoder layer is called with)
    attention: str  # the attention module inside a decoder layer (the KV cache's owner)
    linears: tuple[Linear, ...]
    groups: tuple[tuple[str, ...], ...]
    scales: tuple[ScalePair, ...]
    meta_names: dict[str, str | tuple[str, ...]]  # HF module path -> Meta name (a fused linear: one per part)
    executorch_model: str  # export_llama's --model for this family
    interleaved_rope: bool = False  # Meta layout permutes q/k rows to interleaved RoPE pairs (else use_hf_rope)
    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused linear -> its parts, in row order

    def part_rows(self, config: Any, name: str) -> dict[str, slice]:
        """Part -> row range of the fused linear ``name`` (sizes: q = heads x head_dim, k and v = kv heads x
        head_dim, gate and up = intermediate size)."""
        hd = head_dim(config)
        size = {"q": config.num_attention_heads * hd, "k": config.num_key_value_heads * hd,
                "v": config.num_key_value_heads * hd, "gate": config.intermediate_size, "up": config.intermediate_size}
        out, start = {}, 0
        for part in self.parts[name]:
            out[part] = slice(start, start + size[part])
            start += size[part]
        return out

    def output_rows(self, config: Any) -> dict[str, slice]:
        """Linear -> the rows its output-side transform acts on, for the fused linears that have one (others: all)."""
        return {lin.name: self.part_rows(config, lin.name)[lin.rows] for lin in self.linears if lin.rows}

    def linear(self, name: str) -> Linear:
        return next(lin for lin in self.linears if lin.name == name)

    def rotated(self, rotation: str, side: str) -> tuple[str, ...]:
        """The linears whose ``side`` ("input"/"output") carries ``rotation``, in execution order."""
        return tuple(lin.name for lin in self.linears if getattr(lin, side) == rotation)

    def norm_readers(self) -> dict[str, tuple[str, ...]]:
        """RMSNorm path in a layer -> the linears reading its output (in execution order)."""
        out: dict[str, tuple[str, ...]] = {}
        for lin in self.linears:
            if lin.norm:
                out[lin.norm] = out.get(lin.norm, ()) + (lin.name,)
        return out

    def decoder_layers(self, model) -> Any:
        return model.get_submodule(self.layers)

    def norms(self, model) -> list[tuple[str, Any]]:
        """(path, module) of every RMSNorm that feeds linears: each layer's (the map's ``norm``s), then the final one."""
        names = [f"{self.layers}.{i}.{n}" for i in range(len(self.decoder_layers(model))) for n in self.norm_readers()]
        return [(name, model.get_submodule(name)) for name in names + [self.final_norm]]

    def block_linears(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)

    def sublayer_starts(self) -> tuple[str, ...]:
        """The first linear of each group that reads a norm's output: where a decoder layer's attention and its MLP
        begin (Llama: q_proj, gate_proj)."""
        readers = {lin.name for lin in self.linears if lin.norm is not None}
        return tuple(group[0] for group in self.groups if group[0] in readers)

    def sublayer_start_modules(self, model) -> list[Any]:
        """The :meth:`sublayer_starts` modules of every decoder layer of ``model``, layer by layer (where the CPU
        forwards trim glibc's heap: spinquant.memory.heap_trimmed_before)."""
        return [layer.get_submodule(name) for layer in self.decoder_layers(model) for name in self.sublayer_starts()]


LLAMA = Architecture(
    model_type="llama",
    model_class=LlamaForCausalLM,
    backbone="model",
    layers="model.layers",
    embedding="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    rotary="model.rotary_emb",
    attention="self_attn",
    linears=(
        Linear("self_attn.q_proj", input="R1", norm="input_layernorm"),
        Linear("self_attn.k_proj", input="R1", norm="input_layernorm"),
        Linear("self_attn.v_proj", input="R1", output="R2", norm="input_layernorm"),
        Linear("self_attn.o_proj", input="R2", output="R1"),
        Linear("mlp.gate_proj", input="R1", norm="post_attention_layernorm"),
        Linear("mlp.up_proj", input="R1", norm="post_attention_layernorm"),
        Linear("mlp.down_proj", input="R4", output="R1"),
    ),
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    scales=(
        ScalePair("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScalePair("v_out", "self_attn.v_proj", ("self_attn.o_proj",), per_head=True),
        ScalePair("up_out", "mlp.up_proj", ("mlp.down_proj",)),
    ),
    meta_names={
        "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
        "model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
    },
    executorch_model="llama3_2",
    interleaved_rope=True,
)

# Qwen2/2.5: Llama's graph with q/k/v biases (rotated with their rows). Qwen3: Llama's graph with a per-head RMSNorm
# on q and k before RoPE (R1 acts on q/k_proj's input side and R2 on v/o only, so the norms see unchanged q and k).
QWEN2 = replace(LLAMA, model_type="qwen2", model_class=Qwen2ForCausalLM, executorch_model="qwen2_5_0_5b",
                interleaved_rope=False)
QWEN3 = replace(LLAMA, model_type="qwen3", model_class=Qwen3ForCausalLM, executorch_model="qwen3_0_6b",
                interleaved_rope=False, meta_names={**LLAMA.meta_names, "self_attn.q_norm": "attention.q_norm_fn",
                                                    "self_attn.k_norm": "attention.k_norm_fn"})
# Phi-3 / Phi-4-mini: Llama's module paths with q, k, v stacked in one qkv_proj and gate, up in one gate_up_proj;
# partial rotary acts on q/k only. The value/up channel-scale pairs would scale part of a fused linear's rows: not
# declared.
PHI3 = replace(
    LLAMA,
    model_type="phi3",
    model_class=Phi3ForCausalLM,
    linears=(
        Linear("self_attn.qkv_proj", input="R1", output="R2", norm="input_layernorm", rows="v"),
        Linear("self_attn.o_proj", input="R2", output="R1"),
        Linear("mlp.gate_up_proj", input="R1", norm="post_attention_layernorm"),
        Linear("mlp.down_proj", input="R4", output="R1"),
    ),
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scales=(
        ScalePair("attn_in", "input_layernorm", ("self_attn.qkv_proj",)),
        ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    meta_names={
        "self_attn.qkv_proj": ("attention.wq", "attention.wk", "attention.wv"), "self_attn.o_proj": "attention.wo",
        "mlp.gate_up_proj": ("feed_forward.w1", "feed_forward.w3"), "mlp.down_proj": "feed_forward.w2",
        "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
        "model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
    },
    executorch_model="phi_4_mini",
    interleaved_rope=False,
    parts={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
)

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (LLAMA, QWEN2, QWEN3, PHI3)}

# model types refused with the reason (the generic message covers the rest)
_POST_NORMS = ("its post-attention and post-feedforward RMSNorms sit between o_proj/down_proj and the residual, so R1 "
               "cannot be folded into those weights exactly (it would need the norms' weights equal)")
REFUSED = {"gemma3_text": _POST_NORMS, "gemma2": _POST_NORMS}


def architecture_of(config: Any, where: str = "the model") -> Architecture:
    """The map of a model config's family; SpinQuantError naming the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
    reason = _unsupported_kind(config) or REFUSED.get(model_type)
    if reason:
        raise SpinQuantError(f"unsupported model '{model_type}' ({archs}) in {where}: {reason}; spinquant quantizes "
                             f"dense decoder-only text models of the families {', '.join(ARCHITECTURES)}")
    if arch is None:
        raise SpinQuantError(
            f"unsupported architecture '{model_type}' ({archs}) in {where}: spinquant supports the families "
            f"{', '.join(ARCHITECTURES)} (Llama 3.x, SmolLM2, Qwen2.5, Qwen3, Phi-4-mini and their fine-tunes)")
    return arch


def _unsupported_kind(config: Any) -> str | None:
    """Why a config is of a kind no family map covers (experts, other towers, linear-attention layers), or None."""
    if any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")):
        return "it is a mixture-of-experts model (one R4 per expert and routed GPTQ are not implemented)"
    towers = [k for k in ("vision_config", "audio_config", "speech_config") if getattr(config, k, None) is not None]
    if towers:
        return f"it has a {towers[0].split('_')[0]} tower ({towers[0]}); quantize its text decoder on its own"
    other_layers = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"}
    if other_layers:
        return f"it is a hybrid model with {', '.join(sorted(other_layers))} layers, which the rotations' maps do not cover"
    return None


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE parameters (``rope_parameters``, or ``rope_scaling`` in older configs), {} when it has none."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rope_type(config: Any) -> str:
    rope = rope_parameters(config)
    return rope.get("rope_type", rope.get("type")) or "default"


def longrope_original_context(config: Any) -> int:
    """The context LongRoPE's short factors cover (``original_max_position_embeddings``)."""
    return int(rope_parameters(config).get("original_max_position_embeddings") or config.original_max_position_embeddings)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
