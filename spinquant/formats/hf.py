"""Hugging Face model directories (and hub ids): read as the family's transformers class in float32, untied; written
with ``save_pretrained``. Headers of safetensors shards are read without the weights (shapes, truncation)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig

from spinquant.architectures import architecture_of
from spinquant.errors import SpinQuantError
from spinquant.fusion import restore_online_rotations


def check_llama_config(config: Any, where: str) -> None:
    """Raise SpinQuantError unless ``config`` is of a family in the map (spinquant.architectures) without biases."""
    architecture_of(config, where)
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


def untie_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """Give the output layer its own copy of the embedding matrix (in place) and mark the config untied."""
    arch = architecture_of(model.config)
    head, embedding = model.get_submodule(arch.head), model.get_submodule(arch.embedding)
    if head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}
    return model


def meta_model(config: Any) -> torch.nn.Module:
    """The family's model for ``config`` with every weight on the meta device (no memory) and its rotary embedding
    built for real (its buffers come from the config, not from the weights): the frame that loaders fill."""
    arch = architecture_of(config)
    with torch.device("meta"):
        model = arch.model_class(config)
    parent, attr = arch.rotary.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, type(model.get_submodule(arch.rotary))(config=config))
    return model


def _hub_fetch_error(source: str) -> str:
    return (f"could not fetch '{source}' from the Hugging Face hub (no network, wrong id, or a gated model without a "
            f"login): download it first and pass the local directory")


def upcast_to_float32_(model: torch.nn.Module) -> torch.nn.Module:
    """Every floating parameter and buffer to float32, one tensor at a time (in place; tied parameters stay tied).

    Loading at the checkpoint's dtype and upcasting here peaks near the float32 model alone, where
    ``from_pretrained(dtype=float32)`` also holds the mapped bf16 checkpoint while converting."""
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


def load_hf(source: str | os.PathLike, *, local_only: bool = False, untie: bool = True) -> torch.nn.Module:
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
        check_weight_shapes(weight_shapes(source), config, where)  # truncated shards, vocab_size vs embedding
    try:
        model = upcast_to_float32_(architecture_of(config).model_class.from_pretrained(source, dtype="auto", local_files_only=local_only))
    except Exception as exc:  # OSError, SafetensorError, size mismatches: all mean a damaged or inconsistent model
        raise SpinQuantError(f"cannot load the weights of {where}: {str(exc).splitlines()[0]}") from exc
    check_finite(model.named_parameters(), where)
    model = (untie_embeddings(model) if untie else model).eval()
    return restore_online_rotations(model)


def save_hf(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> None:
    """Save as an HF directory (safetensors). Writes into ``out_dir`` directly; callers make it atomic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# --- Meta checkpoints -------------------------------------------------------------------------


def weight_shapes(model_src: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a local HF directory's safetensors shards, read from their headers.

    A truncated or corrupt shard raises SpinQuantError naming it. Directories without safetensors
    (``pytorch_model.bin``) give {} (transformers reads those with ``weights_only=True``).
    """
    folder = Path(model_src).expanduser()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise SpinQuantError(f"cannot read {index} ({exc}): the model directory is damaged; re-save or re-download it") from exc
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise SpinQuantError(f"the model's shard {f} is missing: re-save or re-download the model")
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    shapes[key] = tuple(st.get_slice(key).get_shape())
        except Exception as exc:  # SafetensorError for truncated or corrupt headers
            raise SpinQuantError(f"the model's shard {f.name} is truncated or corrupt ({str(exc).splitlines()[0]}): "
                                 f"re-save or re-download the model") from exc
    return shapes


def check_weight_shapes(shapes: dict[str, tuple[int, ...]], config: Any, where: str) -> None:
    """The embedding (and the output layer, when stored) must agree with the config's vocab_size and hidden_size."""
    arch = architecture_of(config, where)
    for key in (f"{arch.embedding}.weight", f"{arch.head}.weight"):
        shape = shapes.get(key)
        if shape is not None and shape != (config.vocab_size, config.hidden_size):
            raise SpinQuantError(
                f"{where}: {key} has shape {list(shape)} but config.json says vocab_size {config.vocab_size} and "
                f"hidden_size {config.hidden_size}: fix config.json (vocab_size {shape[0]}?) or the weights")
