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
    if describe_source(model_src) == "run":
        raise SpinQuantError(f"{model_src} is a quantized run: rotate the float model it came from")
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SpinQuantError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpinQuantError(f"device {device} requested but CUDA is not available: use --device cpu")
    return dev


def resolve_rotations(spec: str, model, seed: int) -> Rotations | None:
    """'none' -> None; 'hadamard' -> seeded random Hadamard R1/R2 + R4; a path -> its R.bin (+ R4)."""
    from spinquant.fusion import load_rbin

    if spec == "none":
        return None
    if spec == "hadamard":
        return Rotations.random_hadamard(model, seed)
    path = Path(spec)
    if path.is_dir():
        path = path / "R.bin"
    if not path.is_file():
        raise SpinQuantError(f"--rotations {spec}: expected none, hadamard, or an R.bin file (or a directory holding one)")
    return load_rbin(path, r4=True)


def quantize_to_run(model_src: str, out_dir: str, scheme, wq, rotations: str = "hadamard", calib=None, seed: int = 0,
                    device: str = "auto", tokenizer_src: str | None = None, progress: bool = True,
                    extra_config: dict | None = None) -> dict[str, Any]:
    """Rotate (optionally), quantize (RTN/GPTQ, range setting) and write a verified run directory."""
    import time

    from spinquant.data import calibration_windows
    from spinquant.evaluate import check_seqlen
    from spinquant.run_dir import load_run, save_run

    times: dict[str, float] = {}
    kind = describe_source(model_src)
    if kind == "run":
        raise SpinQuantError(f"{model_src} is already a quantized run: quantize the float model (or use requantize)")
    dev = resolve_device(device)
    t = time.perf_counter()
    model = load_model(model_src)
    times["load"] = time.perf_counter() - t
    scheme.check_model(model.config)
    if has_online_r4(model) and rotations != "none":
        raise SpinQuantError(f"{model_src} is already rotated (online R4): pass --rotations none")
    rot = resolve_rotations(rotations, model, seed)
    tokenizer = try_load_tokenizer(model_src, tokenizer_src)
    windows = None
    if wq.method == "gptq":
        if tokenizer is None:
            raise SpinQuantError(f"{model_src} has no tokenizer, which GPTQ calibration needs: pass --tokenizer DIR")
        check_seqlen(calib.seqlen, getattr(model.config, "max_position_embeddings", None))
        t = time.perf_counter()
        windows = calibration_windows(calib, tokenizer)
        times["calibration_data"] = time.perf_counter() - t
    t = time.perf_counter()
    if rot is not None:
        fuse_and_rotate(model, rot)
    times["rotate"] = time.perf_counter() - t
    model.to(dev)
    from spinquant.quant.apply import quantize_model

    t = time.perf_counter()
    quantize_model(model, scheme, wq, windows, progress=progress)
    times["quantize"] = time.perf_counter() - t
    model.to("cpu")
    config = {
        "source_model": str(model_src),
        "scheme": scheme.to_dict(),
        "method": wq.method,
        "clip_search": wq.clip_search,
        "percdamp": wq.percdamp,
        "act_order": wq.act_order,
        "rotations": rotations if rotations in ("none", "hadamard") else str(Path(rotations).resolve()),
        "seed": seed,
        "calibration": None if windows is None else {**calib.__dict__},
        "device": str(dev),
        "times_s": times,
        "output_error": wq.stats.get("output_error"),
        **(extra_config or {}),
    }
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    with atomic_dir(out_dir) as tmp:
        save_run(model, tmp, config, tokenizer)
        if rot is not None:
            save_rbin(rot, tmp / "R.bin")
        with torch.no_grad():
            got = load_run(tmp)(ids).logits
        if not torch.equal(got, expected):
            raise SpinQuantError(f"verification failed: the saved run reproduces the logits only to {max_rel_diff(got, expected):.2e}")
    return config
