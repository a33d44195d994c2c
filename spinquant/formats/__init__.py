"""Model files in and out, one dispatcher: every source (HF directory, hub id, Meta checkpoint, quantized run
directory) loads into the one in-memory form, the family's transformers class in float32, untied, eval mode."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from spinquant.errors import SpinQuantError, unreadable_torch_file
from spinquant.formats.hf import _hub_fetch_error, check_llama_config, load_hf
from spinquant.formats.meta import _meta_checkpoint_file, config_from_meta_params, load_meta
from spinquant.formats.run_dir import load_run


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def load_model(source: str | os.PathLike, untie: bool = True) -> torch.nn.Module:
    """Load any supported source into the canonical form: the family's transformers class in float32, untied, eval mode.

    ``untie=False``: an HF model stays as its config says (for evaluation only; every transform needs it untied).

    A quantized run directory loads as its fake-quantized model (weights fixed to their integers).
    """
    kind = describe_source(source)
    if kind == "run":
        return load_run(source)
    if kind == "meta":
        return load_meta(source)
    return load_hf(source, local_only=kind == "hf", untie=untie)


def load_config(source: str | os.PathLike) -> PretrainedConfig:
    """The model's config alone (cheap: no weights), checked to be a Llama."""
    kind = describe_source(source)
    if kind == "run":
        return AutoConfig.from_pretrained(Path(source))
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
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        hint = f" (the model {model_source} has none; pass --tokenizer DIR)" if model_source else ""
        raise SpinQuantError(f"cannot load a tokenizer from {source}{hint}: {str(exc).splitlines()[0]}") from exc


def try_load_tokenizer(model_src: str, tokenizer_src: str | None = None) -> Any | None:
    """The tokenizer named, else the model's own (None when a Meta/HF directory has none)."""
    if tokenizer_src:
        return load_tokenizer(tokenizer_src)
    try:
        return load_tokenizer(model_src, model_src)
    except SpinQuantError as exc:
        present = [f for f in TOKENIZER_FILES if (Path(model_src).expanduser() / f).is_file()]
        if present:  # the files are there but do not load: say which, rather than "has no tokenizer"
            raise SpinQuantError(f"the tokenizer of {model_src} ({', '.join(present)}) is corrupt or truncated: "
                                 f"{exc.__cause__ or exc}; restore the model's own tokenizer files or pass --tokenizer DIR") from exc
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
