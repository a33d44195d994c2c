"""Stages composed into what the CLI commands do. Each function takes paths and options, writes atomically."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from spinquant.atomic import atomic_dir
from spinquant.errors import SpinQuantError
from spinquant.evaluate import EvalResult, check_seqlen, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.fusion import Rotations, fuse_and_rotate, has_online_r4, save_rbin
from spinquant.models import describe_source, load_model, load_tokenizer, save_hf


def try_load_tokenizer(model_src: str, tokenizer_src: str | None = None) -> Any | None:
    """The tokenizer named, else the model's own (None when a Meta/HF directory has none)."""
    if tokenizer_src:
        return load_tokenizer(tokenizer_src)
    try:
        return load_tokenizer(model_src, model_src)
    except SpinQuantError:
        return None


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def probe_ids(vocab_size: int, length: int = 64, seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def rotate_model(model_src: str, out_dir: str, seed: int = 0, r4: bool = True) -> dict[str, Any]:
    """Write the fused, random-Hadamard-rotated float model (HF directory) and R.bin; verify by reloading."""
    model = load_model(model_src)
    if has_online_r4(model) and r4:
        raise SpinQuantError(f"{model_src} already carries an online R4 rotation: pass --no-r4 or the unrotated model")
    tokenizer = try_load_tokenizer(model_src)
    ids = probe_ids(model.config.vocab_size)
    before = model(ids).logits
    rot = Rotations.random_hadamard(model, seed, r4=r4)
    fuse_and_rotate(model, rot)
    with atomic_dir(out_dir) as tmp:
        save_hf(model, tmp, tokenizer)
        save_rbin(rot, tmp / "R.bin")
        after = load_model(tmp)(ids).logits
        diff = max_rel_diff(after, before)
        if diff > 1e-3:
            raise SpinQuantError(f"verification failed: the rotated model's logits differ by {diff:.2e} (relative)")
    return {"max_rel_diff": diff}


def evaluate_model(model_src: str, data: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
                   reference_src: str | None = None, tokenizer_src: str | None = None, text_field: str = "text",
                   progress: bool = True) -> EvalResult:
    """Perplexity of a model (and KL/top-1 against a reference) on the evaluation text's windows."""
    describe_source(model_src)
    if reference_src is not None:
        describe_source(reference_src)
    tokenizer = try_load_tokenizer(model_src, tokenizer_src)
    if tokenizer is None and reference_src is not None:
        tokenizer = try_load_tokenizer(reference_src)
    if tokenizer is None:
        raise SpinQuantError(f"{model_src} has no tokenizer: pass --tokenizer DIR")
    model = load_model(model_src)
    check_seqlen(seqlen, getattr(model.config, "max_position_embeddings", None))
    windows = evaluation_windows(evaluation_ids(tokenizer, data, text_field), seqlen, max_windows)
    reference = None
    if reference_src is not None:
        ref_model = load_model(reference_src)
        if ref_model.config.vocab_size != model.config.vocab_size:
            raise SpinQuantError(f"the reference's vocabulary ({ref_model.config.vocab_size}) differs from the model's ({model.config.vocab_size})")
        reference = hf_logits_fn(ref_model)
    return evaluate(hf_logits_fn(model), windows, reference, progress=progress)
