"""Loading and saving models: one in-memory form, a float32 transformers ``LlamaForCausalLM``.

Sources: a local Hugging Face directory, a hub id (same code path; needs network), and a Meta
checkpoint directory (``consolidated.00.pth`` + ``params.json``, interleaved RoPE). Tied
embeddings are untied on load, so the embedding and lm_head can be rotated and quantized apart.

Meta names appear only here and in the export module, never inside the pipeline.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from spinquant.errors import SpinQuantError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# HF module name -> Meta module name, per decoder layer
HF_TO_META_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
HF_TO_META_TOP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def _meta_checkpoint_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return path
    if path.is_dir():
        found = sorted(path.glob("consolidated.*.pth"))
        if found and (path / "params.json").is_file():
            return found[0]
    return None


def describe_source(source: str | os.PathLike) -> str:
    """'hf' (a local HF directory), 'meta' (a Meta checkpoint), 'run' (a spinquant quantized run directory)
    or 'hub' (a hub id); errors otherwise."""
    path = Path(source).expanduser()
    if path.exists():
        if (path / "quant_config.json").is_file():
            return "run"
        if _meta_checkpoint_file(path) is not None:
            return "meta"
        if path.is_dir() and (path / "config.json").is_file():
            return "hf"
        raise SpinQuantError(
            f"{path} is not a model: expected a Hugging Face model directory (config.json + weights) or a "
            f"Meta checkpoint directory (consolidated.00.pth + params.json)"
        )
    if HUB_ID.match(str(source)) and not str(source).startswith((".", "~")):
        return "hub"
    raise SpinQuantError(
        f"no such path: {source} (pass a local model directory, a Meta checkpoint directory, or a hub id "
        f"such as meta-llama/Llama-3.2-1B)"
    )


def check_llama_config(config: Any, where: str) -> None:
    """Raise SpinQuantError unless ``config`` describes a Llama (LlamaForCausalLM) model."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
        raise SpinQuantError(
            f"unsupported architecture '{model_type}' ({archs}) in {where}: spinquant supports Llama models "
            f"(model_type 'llama', LlamaForCausalLM) such as Llama 3.2 1B/3B and their fine-tunes"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise SpinQuantError(f"unsupported Llama variant in {where}: {flag}=true (biases are not handled)")


def check_finite(named_tensors, where: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor (learning or GPTQ would fail much later).

    ``named_tensors``: (name, tensor) pairs, e.g. ``model.named_parameters()`` or a stream read from disk."""
    for name, p in named_tensors:
        if not p.is_floating_point():
            continue
        bad = (~torch.isfinite(p.detach())).sum().item()
        if bad:
            raise SpinQuantError(f"{where}: weight {name} holds {bad} non-finite values (NaN/Inf): the checkpoint is damaged "
                                 f"or the fine-tune diverged; fix the model (e.g. an earlier checkpoint) and re-run")


def untie_embeddings(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Give lm_head its own copy of the embedding matrix (in place) and mark the config untied."""
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}
    return model


def unreadable_torch_file(what: str, path: str | os.PathLike) -> str:
    """The one message for a torch file that ``torch.load(weights_only=True)`` refused."""
    return (f"cannot read {what} {path}: corrupt, not a torch file, or holding more than tensors "
            f"(spinquant never runs code from a file: weights_only=True)")


def _hub_fetch_error(source: str) -> str:
    return (f"could not fetch '{source}' from the Hugging Face hub (no network, wrong id, or a gated model without a "
            f"login): download it first and pass the local directory")


def upcast_to_float32_(model: torch.nn.Module) -> torch.nn.Module:
    """Every floating parameter and buffer to float32, one tensor at a time (in place; tied parameters stay tied).

    Loading at the checkpoint's dtype and upcasting here peaks near the float32 model alone (measured at 1B: 6.6 GiB)
    where ``from_pretrained(dtype=float32)`` also holds the mapped bf16 checkpoint while converting (7.3 GiB)."""
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.float()
                else:
                    setattr(module, name, tensor.float())
    if getattr(model, "config", None) is not None:
        model.config.dtype = torch.float32  # as from_pretrained(dtype=float32) records it (save_pretrained writes it)
    return model


def load_hf(source: str | os.PathLike, *, local_only: bool = False, untie: bool = True) -> LlamaForCausalLM:
    """Load an HF directory or hub id as float32 in eval mode; untied unless ``untie`` is False (evaluation only: a
    tied model computes the same and needs no copy of the embedding, 1 GiB at vocab 128256)."""
    where = str(source)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except OSError as exc:
        if Path(source).exists():
            raise SpinQuantError(f"cannot read the model config in {source}: {exc}".splitlines()[0]) from exc
        raise SpinQuantError(_hub_fetch_error(where)) from exc
    except ValueError as exc:  # unknown model_type and similar
        raise SpinQuantError(f"unsupported or unreadable model config in {where}: {exc}".splitlines()[0]) from exc
    check_llama_config(config, where)
    if local_only:
        from spinquant.preflight import check_weight_shapes, weight_shapes

        check_weight_shapes(weight_shapes(source), config, where)  # truncated shards, vocab_size vs embedding
    try:
        model = upcast_to_float32_(LlamaForCausalLM.from_pretrained(source, dtype="auto", local_files_only=local_only))
    except Exception as exc:  # OSError, SafetensorError, size mismatches: all mean a damaged or inconsistent model
        raise SpinQuantError(f"cannot load the weights of {where}: {str(exc).splitlines()[0]}") from exc
    check_finite(model.named_parameters(), where)
    model = (untie_embeddings(model) if untie else model).eval()
    from spinquant.fusion import restore_online_rotations  # local import: fusion imports this module

    return restore_online_rotations(model)


def save_hf(model: LlamaForCausalLM, out_dir: str | os.PathLike, tokenizer: Any = None) -> None:
    """Save as an HF directory (safetensors). Writes into ``out_dir`` directly; callers make it atomic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# --- Meta checkpoints -------------------------------------------------------------------------


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
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
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
        from spinquant.export import dequantize_meta_state_dict  # pre-quantized checkpoint

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


def load_model(source: str | os.PathLike, untie: bool = True) -> LlamaForCausalLM:
    """Load any supported source into the canonical form: float32 LlamaForCausalLM, untied, eval mode.

    ``untie=False``: an HF model stays as its config says (for evaluation only; every transform needs it untied).

    A quantized run directory loads as its fake-quantized model (weights fixed to their integers).
    """
    kind = describe_source(source)
    if kind == "run":
        from spinquant.run_dir import load_run

        return load_run(source)
    if kind == "meta":
        return load_meta(source)
    return load_hf(source, local_only=kind == "hf", untie=untie)


def load_config(source: str | os.PathLike) -> LlamaConfig:
    """The model's config alone (cheap: no weights), checked to be a Llama."""
    kind = describe_source(source)
    if kind == "run":
        return LlamaConfig.from_json_file(Path(source) / "config.json")
    if kind == "meta":
        ckpt = _meta_checkpoint_file(Path(source))
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
            params = json.loads((ckpt.parent / "params.json").read_text())
        except Exception as exc:
            raise SpinQuantError(unreadable_torch_file("the Meta checkpoint", ckpt)) from exc
        return config_from_meta_params(params, state.get("model", state))
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=kind == "hf")
    except OSError as exc:
        if kind == "hub":
            raise SpinQuantError(_hub_fetch_error(str(source))) from exc
        raise SpinQuantError(f"cannot read the model config of {source}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        raise SpinQuantError(f"unsupported or unreadable model config in {source}: {str(exc).splitlines()[0]}") from exc
    check_llama_config(config, str(source))
    return config


def load_tokenizer(source: str | os.PathLike, model_source: str | os.PathLike | None = None) -> Any:
    """The tokenizer from ``source`` (an HF directory or hub id); clear error if there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        hint = f" (the model {model_source} has none; pass --tokenizer DIR)" if model_source else ""
        raise SpinQuantError(f"cannot load a tokenizer from {source}{hint}: {str(exc).splitlines()[0]}") from exc
