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

Adding a family that computes the same graph under other module names is adding one :class:`Architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import LlamaForCausalLM

from spinquant.errors import SpinQuantError


@dataclass(frozen=True)
class Linear:
    """A linear of a decoder layer (``name``, its path inside the layer) and the transforms on each side of it.

    ``input``: "R1", "R2" (per attention head) or "R4" (Hadamard, online before it) or None;
    ``output``: "R1" or "R2" (per kv head) or None; ``norm``: the RMSNorm whose output it reads, folded into it."""

    name: str
    input: str | None = None
    output: str | None = None
    norm: str | None = None


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
    meta_names: dict[str, str]  # HF module path -> Meta (ExecuTorch) name: layer-level and top-level paths

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
)

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (LLAMA,)}


def architecture_of(config: Any, where: str = "the model") -> Architecture:
    """The map of a model config's family; SpinQuantError naming the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
        raise SpinQuantError(
            f"unsupported architecture '{model_type}' ({archs}) in {where}: spinquant supports Llama models "
            f"(model_type 'llama', LlamaForCausalLM) such as Llama 3.2 1B/3B and their fine-tunes")
    return arch


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
