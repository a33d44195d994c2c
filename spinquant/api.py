"""The Python API for notebooks and training pipelines: one verb per job, options as recipe keys.

    import spinquant
    report = spinquant.calibrate("my-ft-1b", out="runs/ft", recipe="default", rotations="hadamard")  # the whole job
    model = spinquant.quantize("my-ft-1b", recipe="default", calib_data="chats.jsonl")  # in memory, fake-quantized
    spinquant.export(model, "runs/ft-q")  # run directory + ExecuTorch checkpoint + verified model.pte

Options are the keys of a recipe (``spinquant calibrate --help``, docs/recipe.md). Nothing here writes outside the
``out`` it is given, and the same refusals as the command line apply (spinquant.outputs).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from spinquant.atomic import atomic_dir
from spinquant.data import calibration_windows, resolve_calibration
from spinquant.errors import SpinQuantError
from spinquant.formats import load_model, try_load_tokenizer
from spinquant.formats.hf import untie_embeddings
from spinquant.formats.rbin import save_rbin
from spinquant.formats.run_dir import save_run
from spinquant.fusion import fuse_and_rotate
from spinquant.outputs import claim_output, record_owner
from spinquant.pipeline import export_run, probe_ids, resolve_device, resolve_rotations, tuning_calibration
from spinquant.quant.apply import quantize_model
from spinquant.quant.scale_tuning import tune_scales
from spinquant.targets import get_target
from spinquant.workflow import (CalibrateOptions, calibrate as run_calibrate, gptq_config, resolve_r4, resolve_recipe,
                                scale_tuning_config)

__all__ = ["calibrate", "quantize", "export", "load_model"]


def calibrate(model: str | os.PathLike, out: str | os.PathLike | None = None, recipe: str | None = None,
              **options: Any) -> dict[str, Any]:
    """``spinquant calibrate`` from Python: learn (or draw) the rotations, GPTQ, ExecuTorch checkpoint, verified .pte
    and report into ``out``; returns the report (also ``out/report.json``). A re-run with the same options resumes.

    >>> report = spinquant.calibrate("my-ft-1b", out="runs/ft", rotations="hadamard", pte=False)  # doctest: +SKIP
    >>> report["evaluation"]["quantized"]["kl"]  # doctest: +SKIP
    """
    opts = CalibrateOptions.build(str(model), recipe, **({"out": str(out)} if out is not None else {}), **options)
    return run_calibrate(opts)


def quantize(model: str | os.PathLike | torch.nn.Module, recipe: str | None = None, *, tokenizer: Any = None,
             rotations: str = "hadamard", **options: Any) -> torch.nn.Module:
    """A fake-quantized model in memory, as ExecuTorch will run it: norms fused, rotated (``rotations``: "hadamard"
    for the seeded random Hadamard, "none", or an R.bin path), GPTQ with range setting and the recipe's objective,
    refit and scale tuning, at the target's scheme (``target=``, default xnnpack-8da4w-g32).

    ``model``: a path or hub id, or a float transformers model (not modified: a copy is quantized). ``options``: recipe
    keys (``calib_data``, ``gptq_nsamples``, ``seqlen``, ``seed``, ``device``, ``r4`` ...). Pass the result to
    :func:`export` to write it.

    >>> q = spinquant.quantize("my-ft-1b", calib_data="chats.jsonl", gptq_nsamples=64, seqlen=1024)  # doctest: +SKIP
    """
    source = None if isinstance(model, torch.nn.Module) else str(model)
    float_model = load_model(source) if source is not None else untie_embeddings(copy.deepcopy(model)).eval()
    if tokenizer is None and source is not None:
        tokenizer = try_load_tokenizer(source)
    opts = resolve_recipe(CalibrateOptions.build(source or "<in memory>", recipe, **options))
    target = get_target(opts.target)
    if not target.quantizes:
        raise SpinQuantError(f"target {target.name} does not quantize: use spinquant.calibrate for it")
    r4 = resolve_r4(opts.r4, float_model.config.intermediate_size, target, pte=True)[0] == "on"
    rot = resolve_rotations(rotations, float_model, opts.seed, r4)
    qmodel = copy.deepcopy(float_model)
    if rot is not None:
        fuse_and_rotate(qmodel, rot)
    calib = resolve_calibration(opts.calib, opts.calib_data, opts.gptq_nsamples, opts.seqlen, opts.seed,
                                opts.gptq_nsamples, opts.text_field)
    if tokenizer is None:
        raise SpinQuantError("GPTQ needs calibration text and a tokenizer: pass tokenizer=")
    device = resolve_device(opts.device)
    qmodel.to(device)
    quantize_model(qmodel, target.scheme, gptq_config(opts), calibration_windows(calib, tokenizer))
    tuning = scale_tuning_config(opts)
    if tuning.steps:
        tune_scales(qmodel, float_model.to(device), calibration_windows(tuning_calibration(calib, tuning), tokenizer), tuning)
    qmodel.spinquant_rotations = rot  # export() writes them beside the run as R.bin
    qmodel.spinquant_source = source  # export() records it: the verification's KL scale is the float model's
    qmodel.spinquant_tokenizer = tokenizer  # export() writes it beside the run: the .pte is verified on text
    return qmodel.to("cpu").eval()


def export(model: str | os.PathLike | torch.nn.Module, out: str | os.PathLike | None = None, *, tokenizer: Any = None,
           pte: bool = True, overwrite: bool = False, **verify: Any) -> dict[str, Any]:
    """The ExecuTorch checkpoint (consolidated.00.pth + params.json) and, with ``pte``, a model.pte verified against our
    model. ``model``: a quantized run directory (then ``out`` defaults to it), or a model from :func:`quantize`, which is
    first written as a run directory into ``out`` (checked after reload), with ``tokenizer`` (default: the one
    :func:`quantize` used). Returns the export's record.

    >>> spinquant.export(q, "runs/ft-q")  # doctest: +SKIP
    """
    if not isinstance(model, torch.nn.Module):
        return export_run(str(model), None if out is None else str(out), pte=pte, overwrite=overwrite, **verify)
    if out is None:
        raise SpinQuantError("exporting a model in memory needs out= (the run directory to write)")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "spinquant_tokenizer", None)
    scheme = getattr(model, "spinquant_scheme", None)
    if scheme is None:
        raise SpinQuantError("the model is not quantized: make it with spinquant.quantize first")
    identity = {"model": "in memory", "scheme": scheme.to_dict()}
    claim_output(out, "quantize", identity, {}, overwrite)
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    with atomic_dir(out) as tmp:
        save_run(model, tmp, {"source_model": getattr(model, "spinquant_source", None), "scheme": scheme.to_dict(),
                              "method": "gptq"}, tokenizer)
        if getattr(model, "spinquant_rotations", None) is not None:
            save_rbin(model.spinquant_rotations, tmp / "R.bin")
        with torch.no_grad():
            got = load_model(tmp)(ids).logits
        if not torch.equal(got, expected):
            raise SpinQuantError("verification failed: the written run does not reproduce the model's logits")
        record_owner(tmp, "quantize", identity)
    return export_run(str(out), pte=pte, claim=False, **verify)

