"""ExecuTorch export: the pre-quantized checkpoint executorch 1.5.1's Llama loader reads unchanged.

``consolidated.00.pth`` (a plain ``torch.save`` dict, Meta names, ``norm.weight`` first because the
loader takes the checkpoint dtype from the first tensor) + ``params.json`` (ModelArgs keys only).
Block linears: int8-held int4 ``weight`` (out, in), float32 ``scales`` and all-zero ``zeros``
(out, in/g); output: int8 ``weight`` + ``scales``/``zeros`` (vocab,) (or a float weight for the
``8da4w`` mode); embedding: int8 ``weight`` + ``scales`` (vocab,). q/k rows are permuted to Meta's
interleaved RoPE (scales with them). R1/R2 and R4's weight half are already in the weights; the
exporter's ``--use_spin_quant native`` adds the online Hadamard before w2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from spinquant.architectures import architecture_of, longrope_original_context, rope_parameters, rope_type
from spinquant.errors import SpinQuantError
from spinquant.fusion import has_online_r4
from spinquant.hadamard import executorch_computes
from spinquant.formats.meta import meta_params_from_config, permute_rope_rows
from spinquant.quant.scheme import FLOAT, GROUP_SIZES, QuantScheme

CHECKPOINT = "consolidated.00.pth"
PARAMS = "params.json"
PREQ_MODES = ("8da4w_output_8da8w", "8da4w")
FORBIDDEN_PATH_PARTS = ("int8", "8da4w")  # the loader switches to other (broken) branches on these


def check_exportable(model: torch.nn.Module, scheme: QuantScheme) -> str:
    """The preq_mode this run exports as; SpinQuantError before any work if ExecuTorch cannot load it."""
    if scheme.w_bits != 4 or scheme.a_bits not in (8, FLOAT) or scheme.a_symmetric or scheme.kv_bits != FLOAT:
        raise SpinQuantError(f"scheme {scheme.describe()} has no ExecuTorch pre-quantized format: export needs W4 "
                             f"groups with A8 asymmetric per-token (8da4w) or float (weight-only) activations and a float KV cache")
    if scheme.group not in GROUP_SIZES:
        raise SpinQuantError(f"group size {scheme.group_size or 'per-channel'} is not accepted by ExecuTorch's "
                             f"pre-quantized loader: use one of {', '.join(map(str, GROUP_SIZES))}")
    if scheme.a_clip != 1.0:
        raise SpinQuantError(f"activation clip ratio {scheme.a_clip}: ExecuTorch quantizes activations over their full range; "
                             f"export needs --a-clip 1")
    if scheme.embedding_bits != 8:
        raise SpinQuantError(f"embedding_bits={scheme.embedding_bits}: the export writes an 8-bit per-row embedding")
    inter = model.config.intermediate_size
    if has_online_r4(model) and not executorch_computes(inter):
        raise SpinQuantError(f"intermediate size {inter} is not a power of two: ExecuTorch's online Hadamard "
                             f"(fast_hadamard_transform, R4) cannot compute it; quantize again with --r4 off (the default "
                             f"--r4 auto does this)")
    qkv = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj"}
    biased = biased_linears(model)
    if set(biased) - qkv:
        raise SpinQuantError(f"{', '.join(sorted(set(biased) - qkv))} has a bias: ExecuTorch's Transformer takes biases on "
                             f"q/k/v only (attention_qkv_bias), so this model has no ExecuTorch checkpoint; its quantized "
                             f"run stays usable (spinquant eval)")
    missing = [n for n, m in model.named_modules()  # qweight_storage: no unpacking of the integers to see they exist
               if hasattr(m, "weight_mode") and m.w_bits < FLOAT and m.qweight_storage is None]
    if missing or getattr(model.get_submodule(architecture_of(model.config).embedding), "qweight", None) is None:
        raise SpinQuantError(f"the run holds no quantized weights for {', '.join(missing) or 'the embedding'}: "
                             f"quantize it first (spinquant quantize)")
    if scheme.a_bits == FLOAT:
        return "4w"  # weight-only: the same layout, read by ExecuTorch's WeightOnlyInt4Linear (Vulkan path)
    return "8da4w_output_8da8w" if scheme.output_w_bits == 8 else "8da4w"


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is the whole of its storage, else a compact copy: torch.save writes a tensor's whole
    storage, so a view must be copied, but copying every tensor would hold the quantized model twice while saving."""
    t = t.detach()
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.contiguous().clone()


def executorch_state_dict(model: torch.nn.Module, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """The checkpoint dict (Meta names, float32 scales, norms and biases, norm.weight first). A fused linear is split
    into one Meta linear per part (rows of its integers and scales: groups run along the input); q/k rows are
    permuted to interleaved RoPE where the family's Meta layout has it (Llama), else params.json says use_hf_rope.
    Tensors that are whole are the model's own (not copies): the dict is for saving, not for changing."""
    cfg = model.config
    arch = architecture_of(cfg)
    sd: dict[str, torch.Tensor] = {"norm.weight": _owned(model.get_submodule(arch.final_norm).weight.float())}
    emb = model.get_submodule(arch.embedding)
    sd["tok_embeddings.weight"] = _owned(emb.qweight)
    sd["tok_embeddings.scales"] = _owned(emb.scales.float())
    head = model.get_submodule(arch.head)
    if scheme.output_w_bits == 8:
        sd["output.weight"] = _owned(head.qweight)
        sd["output.scales"] = _owned(head.scales.float().reshape(-1))
        sd["output.zeros"] = torch.zeros_like(sd["output.scales"])
    else:
        sd["output.weight"] = _owned(head.weight.float())
    layer_names = {k: v for k, v in arch.meta_names.items() if not k.startswith((f"{arch.backbone}.", arch.head))}
    for i, layer in enumerate(arch.decoder_layers(model)):
        for hf, meta in layer_names.items():
            mod = layer.get_submodule(hf)
            if not hasattr(mod, "qweight_storage"):  # a norm: float weight
                sd[f"layers.{i}.{meta}.weight"] = _owned(mod.weight.float())
                continue
            q = mod.qweight  # unpacked once for all of a fused linear's parts
            parts = (arch.part_rows(cfg, hf).values() if hf in arch.parts else [slice(None)])
            metas = meta if isinstance(meta, tuple) else (meta,)
            for name, rows in zip(metas, parts):
                key = f"layers.{i}.{name}"

                def meta_rows(t: torch.Tensor) -> torch.Tensor:
                    t = t[rows]
                    if arch.interleaved_rope:  # (Llama: no fused linears, so hf names the whole q/k_proj)
                        t = permute_rope_rows(hf, t, cfg, to_meta=True)
                    return _owned(t)

                sd[f"{key}.weight"] = meta_rows(q)
                sd[f"{key}.scales"] = meta_rows(mod.scales.float())
                sd[f"{key}.zeros"] = torch.zeros_like(sd[f"{key}.scales"])
                if mod.bias is not None:
                    sd[f"{key}.bias"] = meta_rows(mod.bias.detach().float()[:, None])[:, 0].contiguous()
    return sd


def biased_linears(model: torch.nn.Module) -> list[str]:
    """The map's linears that carry a bias (read off the first decoder layer)."""
    arch = architecture_of(model.config)
    layer = arch.decoder_layers(model)[0]
    return [lin.name for lin in arch.linears if getattr(layer.get_submodule(lin.name), "bias", None) is not None]


def executorch_params(model: torch.nn.Module, scheme: QuantScheme) -> dict[str, Any]:
    params = meta_params_from_config(model.config)
    params.update(_family_params(model))
    params["quantization_args"] = {"scheme": "int4_weight_int8_dynamic_activation", "group_size": scheme.group,
                                   "spinquant": has_online_r4(model)}
    return params


def _family_params(model: torch.nn.Module) -> dict[str, Any]:
    """The ModelArgs fields that ExecuTorch's Transformer needs beyond Llama's, read off the model: HF RoPE layout,
    partial rotary and LongRoPE factors, q/k/v biases, per-head q/k norms."""
    cfg, arch = model.config, architecture_of(model.config)
    out: dict[str, Any] = {}
    if not arch.interleaved_rope:
        out["use_hf_rope"] = True
    rope = rope_parameters(cfg)
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        out["partial_rotary_factor"] = float(partial)
    if rope_type(cfg) == "longrope":
        out.update(rope_scaling_short_factor=list(rope["short_factor"]), rope_scaling_long_factor=list(rope["long_factor"]),
                   original_max_position_embeddings=longrope_original_context(cfg),
                   max_position_embeddings=int(cfg.max_position_embeddings))
        if rope.get("attention_factor") is not None:
            out["rope_scaling_attention_factor"] = float(rope["attention_factor"])
    if biased_linears(model):  # q/k/v only: check_exportable refuses others
        out["attention_qkv_bias"] = True
    if "self_attn.q_norm" in arch.meta_names:
        out.update(use_qk_norm=True, qk_norm_before_rope=True)
    return out


def write_executorch_checkpoint(model: torch.nn.Module, scheme: QuantScheme, out: Path) -> str:
    """Write consolidated.00.pth + params.json into ``out``; returns the preq_mode to export with."""
    mode = check_exportable(model, scheme)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(executorch_state_dict(model, scheme), out / CHECKPOINT)
    (out / PARAMS).write_text(json.dumps(executorch_params(model, scheme), indent=2))
    return mode


