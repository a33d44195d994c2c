"""Meta (ExecuTorch Llama) checkpoints: ``consolidated.00.pth`` (Meta names, interleaved RoPE rows) + ``params.json``.

Meta names exist only in this module and :mod:`spinquant.formats.executorch` (read off the family's map).
A pre-quantized checkpoint is dequantized on load (weight x per-group scales).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spinquant.architectures import LLAMA, rope_parameters
from spinquant.errors import SpinQuantError, unreadable_torch_file
from spinquant.formats.hf import check_finite, untie_embeddings

# HF module name -> Meta module name: inside a decoder layer, and at the top
HF_TO_META_LAYER = {k: v for k, v in LLAMA.meta_names.items() if not k.startswith(("model.", "lm_head"))}
HF_TO_META_TOP = {k: v for k, v in LLAMA.meta_names.items() if k not in HF_TO_META_LAYER}


def _meta_checkpoint_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return path
    if path.is_dir():
        found = sorted(path.glob("consolidated.*.pth"))
        if found and (path / "params.json").is_file():
            return found[0]
    return None


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k weight (n_heads*head_dim, dim) from Meta's interleaved RoPE pairs to HF's halves."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_meta_to_hf`: rows from HF's rotate-half layout to interleaved pairs."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_params_from_config(config: LlamaConfig) -> dict[str, Any]:
    """params.json for ExecuTorch's ModelArgs (only keys it accepts)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = rope_parameters(config)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    params: dict[str, Any] = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "hidden_dim": config.intermediate_size,
        "norm_eps": config.rms_norm_eps,
        "rope_theta": float(theta),
        "use_scaled_rope": rope.get("rope_type") == "llama3",
    }
    if hd * config.num_attention_heads != config.hidden_size:
        params["head_dim"] = hd
    if params["use_scaled_rope"]:
        params["rope_scale_factor"] = int(rope.get("factor", 8))
        params["high_freq_factor"] = int(rope.get("high_freq_factor", 4))
    return params


def config_from_meta_params(params: dict[str, Any], state: dict[str, torch.Tensor]) -> LlamaConfig:
    """An HF LlamaConfig from params.json, checked against the checkpoint's tensor shapes."""
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as exc:
        raise SpinQuantError(f"params.json lacks the key {exc.args[0]!r} (need dim, n_layers, n_heads)") from exc
    n_kv = int(params.get("n_kv_heads") or n_heads)
    hd = int(params.get("head_dim") or dim // n_heads)
    emb = state.get("tok_embeddings.weight")
    w1 = state.get("layers.0.feed_forward.w1.weight")
    if emb is None or w1 is None:
        raise SpinQuantError("the Meta checkpoint lacks tok_embeddings.weight or layers.0.feed_forward.w1.weight")
    vocab = int(params.get("vocab_size") or emb.shape[0])
    hidden = int(params.get("hidden_dim") or w1.shape[0])
    layer_ids = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    expected = {
        "tok_embeddings.weight": (vocab, dim),
        "layers.0.attention.wq.weight": (n_heads * hd, dim),
        "layers.0.attention.wk.weight": (n_kv * hd, dim),
        "layers.0.attention.wv.weight": (n_kv * hd, dim),
        "layers.0.attention.wo.weight": (dim, n_heads * hd),
        "layers.0.feed_forward.w1.weight": (hidden, dim),
        "layers.0.feed_forward.w2.weight": (dim, hidden),
    }
    for key, shape in expected.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise SpinQuantError(
                f"params.json does not match the checkpoint: {key} has shape {got}, params.json implies {shape}"
            )
    if len(layer_ids) != n_layers:
        raise SpinQuantError(
            f"params.json does not match the checkpoint: n_layers={n_layers} but the checkpoint has "
            f"{len(layer_ids)} layers"
        )
    rope: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 500000.0)), "rope_type": "default"}
    if params.get("use_scaled_rope"):
        rope.update(
            rope_type="llama3",
            factor=float(params.get("rope_scale_factor", 8)),
            high_freq_factor=float(params.get("high_freq_factor", 4)),
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        )
    return LlamaConfig(
        hidden_size=dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=hd,
        intermediate_size=hidden,
        vocab_size=vocab,
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_parameters=rope,
        max_position_embeddings=int(params.get("max_seq_len", 131072 if params.get("use_scaled_rope") else 8192)),
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def permute_rope_rows(hf_name: str, w: torch.Tensor, config: Any, to_meta: bool) -> torch.Tensor:
    """Rows of q_proj/k_proj (or of their per-row scales) between HF's and Meta's RoPE layouts; others unchanged."""
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}.get(hf_name)
    if heads is None:
        return w
    return permute_hf_to_meta(w, heads) if to_meta else permute_meta_to_hf(w, heads)


def hf_to_meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Float state dict with Meta names, q/k rows permuted to interleaved RoPE. Order: norm first."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"norm.weight": sd["model.norm.weight"]}
    for hf, meta in HF_TO_META_TOP.items():
        out[f"{meta}.weight"] = sd[f"{hf}.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, meta in HF_TO_META_LAYER.items():
            out[f"layers.{i}.{meta}.weight"] = permute_rope_rows(hf, sd[f"model.layers.{i}.{hf}.weight"], cfg, to_meta=True)
    return out


def meta_to_hf_state_dict(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_meta_state_dict` (float tensors only). A checkpoint without ``output.weight``
    is tied: lm_head gets the embedding."""
    out: dict[str, torch.Tensor] = {}
    for hf, meta in HF_TO_META_TOP.items():
        key = f"{meta}.weight" if f"{meta}.weight" in state or meta != "output" else "tok_embeddings.weight"
        out[f"{hf}.weight"] = state[key]
    for i in range(config.num_hidden_layers):
        for hf, meta in HF_TO_META_LAYER.items():
            out[f"model.layers.{i}.{hf}.weight"] = permute_rope_rows(hf, state[f"layers.{i}.{meta}.weight"], config, to_meta=False)
    return out


def load_meta(path: str | os.PathLike) -> LlamaForCausalLM:
    """Load a float Meta checkpoint (``consolidated.00.pth`` + ``params.json``) as an HF Llama model."""
    ckpt = _meta_checkpoint_file(Path(path))
    if ckpt is None:
        raise SpinQuantError(f"{path} holds no consolidated.*.pth with a params.json beside it")
    params_file = ckpt.parent / "params.json"
    try:
        params = json.loads(params_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpinQuantError(f"cannot read {params_file}: {exc}") from exc
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise SpinQuantError(unreadable_torch_file("the Meta checkpoint", ckpt)) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if any(k.endswith(".scales") for k in state):
        state = dequantize_meta_state_dict(state)
    config = config_from_meta_params(params, state)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    hf_state = {k: v.to(torch.float32) for k, v in meta_to_hf_state_dict(state, config).items()}
    model.load_state_dict(hf_state, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # rebuild buffers off 'meta'
    check_finite(model.named_parameters(), str(ckpt))
    return untie_embeddings(model).eval()


def save_meta(model: LlamaForCausalLM, out_dir: str | os.PathLike) -> None:
    """Write a float Meta checkpoint: consolidated.00.pth + params.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous().clone() for k, v in hf_to_meta_state_dict(model).items()}
    torch.save(sd, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(meta_params_from_config(model.config), indent=2))


def dequantize_meta_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float Meta state dict from a pre-quantized one: weight * scales per group (zeros are 0)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith((".scales", ".zeros")):
            continue
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        scales = state.get(f"{base}.scales") if base else None
        if scales is None or t.dtype != torch.int8:
            out[key] = t.float()
            continue
        s = scales.float().reshape(t.shape[0], -1)
        g = t.shape[1] // s.shape[1]
        out[key] = (t.float().reshape(t.shape[0], s.shape[1], g) * s[..., None]).reshape(t.shape)
    return out
