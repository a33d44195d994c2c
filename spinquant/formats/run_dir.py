"""Quantized run directories: what ``spinquant quantize`` writes and ``eval`` / ``export`` read.

Layout (all written atomically by the caller):
- ``config.json``: the HF config of the (rotated) model; ``spinquant_online_r4`` marks the online R4.
- ``quantized.safetensors``: for each quantized tensor ``NAME.qweight`` (int8, (out, in)) and
  ``NAME.scales`` (float32, (out, in/g), or (vocab,) for the embedding); every other tensor (norms,
  float linears, biases) under its own name in float32. NAME is the HF module name (``model.layers.0.self_attn.q_proj``).
- ``quant_config.json``: the resolved scheme and method, rotation source, calibration, seeds,
  package versions and timings: everything needed to reproduce the run.
- ``R.bin`` when rotated; the tokenizer files when the model had them.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from spinquant.architectures import architecture_of
from spinquant.errors import SpinQuantError
from spinquant.formats.hf import meta_model, untie_embeddings
from spinquant.fusion import restore_online_rotations
from spinquant.quant.fake_quant import QuantLinear, make_fake_quant, set_embedding_quantized
from spinquant.quant.scheme import QuantScheme

QUANT_CONFIG = "quant_config.json"
WEIGHTS = "quantized.safetensors"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("spinquant", "torch", "transformers", "datasets", "torchao", "executorch", "geoopt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """qweight/scales of every quantized module, float weights of the rest (see module docstring)."""
    state: dict[str, torch.Tensor] = {}
    quantized_modules = set()
    for name, mod in model.named_modules():
        q = getattr(mod, "qweight", None)  # read once: a packed layer unpacks on each read
        if q is not None:
            state[f"{name}.qweight"] = q.contiguous()
            state[f"{name}.scales"] = mod.scales.contiguous()
            quantized_modules.add(name)
    for name, p in model.named_parameters():
        module_name, kind = name.rsplit(".", 1)
        if module_name not in quantized_modules or kind != "weight":  # a quantized linear's bias stays float
            state[name] = p.detach().float().contiguous()
    return state


def save_run(model: torch.nn.Module, out: Path, quant_config: dict[str, Any], tokenizer: Any = None) -> None:
    """Write a run directory into ``out`` (an empty temp dir the caller renames)."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out / "config.json")
    save_file(quantized_state(model), out / WEIGHTS)
    (out / QUANT_CONFIG).write_text(json.dumps({**quant_config, "versions": versions()}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def read_quant_config(run: str | Path) -> dict[str, Any]:
    path = Path(run) / QUANT_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpinQuantError(f"cannot read {path}: {exc}") from exc


@torch.no_grad()
def load_run(run: str | Path) -> torch.nn.Module:
    """The fake-quantized model of a run directory, weights fixed to its integers and scales."""
    run = Path(run)
    qc = read_quant_config(run)
    if not (run / WEIGHTS).is_file():
        raise SpinQuantError(f"{run} has no {WEIGHTS}: it is not a finished quantized run (re-run spinquant quantize)")
    try:
        state = load_file(run / WEIGHTS)
    except Exception as exc:
        raise SpinQuantError(f"cannot read {run / WEIGHTS} (corrupt?): {exc}") from exc
    config = AutoConfig.from_pretrained(run)
    architecture_of(config, str(run))  # another family is refused here, naming the run
    model = meta_model(config)
    float_state = {k: v for k, v in state.items() if not k.endswith((".qweight", ".scales"))}
    # quantized tensors stay on the meta device (no float32 placeholder of the whole model): set_quantized and
    # set_embedding_quantized below replace them by their integers and scales; one left on meta is an error
    model.load_state_dict(float_state, strict=False, assign=True)
    untie_embeddings(model).eval()  # a meta embedding's copy is meta too: no memory
    restore_online_rotations(model)
    scheme = QuantScheme.from_dict(qc["scheme"])
    make_fake_quant(model, scheme)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        mod = modules.get(name)
        if mod is None:
            raise SpinQuantError(f"{run / WEIGHTS}: {name} is not a module of this model")
        if isinstance(mod, QuantLinear):
            mod.set_quantized(state[key], state[f"{name}.scales"])
        else:
            set_embedding_quantized(model, state[key], state[f"{name}.scales"])
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise SpinQuantError(f"{run / WEIGHTS} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                             f"the run is incomplete or corrupt (re-run spinquant quantize)")
    return model
