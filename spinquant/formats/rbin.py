"""R.bin (SpinQuant's rotation file: {"R1": (dim, dim), "model.layers.{i}.self_attn.R2": (hd, hd)}, float32) and the
learned channel scales beside it (``scales.safetensors``). Every matrix is checked orthogonal when saved and loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spinquant.errors import SpinQuantError, unreadable_torch_file
from spinquant.fusion import ORTHOGONALITY_TOL, SCALE_KINDS, ChannelScales, Rotations, orthogonality_error


SCALES_FILE = "scales.safetensors"  # beside an R.bin: the learned channel scales that go with its rotations


def scales_path(rbin) -> Path:
    """Where the channel scales of the rotations in ``rbin`` live: ``scales.safetensors`` in the same directory.

    R.bin keeps the SpinQuant layout (square orthogonal matrices only, which other tools read); the scales are
    another file, and the two are one unit: every spinquant reader of an R.bin applies the scales beside it."""
    return Path(rbin).with_name(SCALES_FILE)


def save_scales(scales: ChannelScales, path) -> None:
    """Write the scales as float32 safetensors: ``model.layers.{i}.{kind}_scale`` (kind in SCALE_KINDS)."""
    state = {f"model.layers.{i}.{kind}_scale": s.to(torch.float32).contiguous()
             for kind in SCALE_KINDS for i, s in enumerate(getattr(scales, kind))}
    save_file(state, str(path))


def load_scales(path) -> ChannelScales:
    """Read a scales.safetensors written by :func:`save_scales` (safetensors: data only, no code)."""
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise SpinQuantError(f"cannot read the channel scales {path}: {exc}. It is corrupt or not a spinquant scales "
                             f"file; re-run the learning that wrote it") from exc
    per_kind: dict[str, list[torch.Tensor]] = {}
    for kind in SCALE_KINDS:
        keys = sorted((k for k in state if k.endswith(f".{kind}_scale")), key=lambda k: int(k.split(".")[2]))
        per_kind[kind] = [state[k].double() for k in keys]
    counts = {len(v) for v in per_kind.values()}
    if len(counts) != 1 or not next(iter(counts)) or len(state) != sum(len(v) for v in per_kind.values()):
        raise SpinQuantError(f"{path} is not a spinquant scales file (expected model.layers.<i>.<kind>_scale for kind in "
                             f"{', '.join(SCALE_KINDS)}, the same layers for each)")
    for kind, per_layer in per_kind.items():
        for i, v in enumerate(per_layer):
            if v.ndim != 1 or not bool(torch.isfinite(v).all() and (v > 0).all()):
                raise SpinQuantError(f"{path}: '{kind}' of layer {i} is not a vector of finite positive scales")
    return ChannelScales(**per_kind)


def save_rbin(rot: Rotations, path) -> None:
    """Write R.bin in the SpinQuant layout: {"R1": (dim, dim), "model.layers.{i}.self_attn.R2": (hd, hd)}, float32;
    with channel scales, also :data:`SCALES_FILE` beside it (:func:`scales_path`)."""
    state: dict[str, torch.Tensor] = {}
    if rot.r1 is not None:
        state["R1"] = rot.r1.to(torch.float32).contiguous()
    for i, r2 in enumerate(rot.r2):
        state[f"model.layers.{i}.self_attn.R2"] = r2.to(torch.float32).contiguous()
    for name, q in state.items():
        err = orthogonality_error(q)
        if err > ORTHOGONALITY_TOL:
            raise SpinQuantError(f"refusing to save {name}: not orthogonal (max|QᵀQ-I| = {err:.2e})")
    if rot.scales is not None:
        save_scales(rot.scales, scales_path(path))
    torch.save(state, path)


def load_rbin(path, r4: bool = True) -> Rotations:
    """Read an R.bin (SpinQuant layout), checking each matrix is orthogonal, and the channel scales beside it if there
    are any (:func:`scales_path`). R4 is not stored; pass it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise SpinQuantError(f"no such rotation file: {path}") from exc
    except Exception as exc:
        raise SpinQuantError(unreadable_torch_file("rotation file", path)) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpinQuantError(f"{path} is not an R.bin: expected a dict of tensors")
    for name, q in state.items():
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            raise SpinQuantError(f"{path}: {name} is not a square matrix (shape {tuple(q.shape)})")
        err = orthogonality_error(q)
        if err > ORTHOGONALITY_TOL:
            raise SpinQuantError(f"{path}: {name} is not orthogonal (max|QᵀQ-I| = {err:.2e})")
    r2_keys = sorted((k for k in state if k.endswith(".self_attn.R2")), key=lambda k: int(k.split(".")[2]))
    return Rotations(
        r1=state["R1"].double() if "R1" in state else None,
        r2=[state[k].double() for k in r2_keys],
        r4=r4,
        scales=load_scales(scales_path(path)) if scales_path(path).is_file() else None,
    )
