"""What the benchmark and diagnostic scripts share: where ../shared is, and "quantize a rotated copy".

The scripts run as ``python scripts/NAME.py``, so this directory is on ``sys.path`` and they import
``from _common import ...``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import cached_logits_fn, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.formats import load_model, load_tokenizer
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.scheme import QuantScheme

SHARED = Path(os.environ.get("SPINQUANT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def data_arguments(ap, windows: int, calib: bool = True) -> None:
    """The arguments every quality script shares: --model, --test-data, --calib-data (unless ``calib`` is False: a
    script without calibration), --seqlen, --windows, --seed (the shared model and WikiText-2 files by default)."""
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"), help="Hugging Face model directory")
    ap.add_argument("--test-data", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"), help="evaluation text")
    if calib:
        ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"), help="calibration text")
    ap.add_argument("--seqlen", type=int, default=1024, help="window length (evaluation and calibration)")
    ap.add_argument("--windows", type=int, default=windows, help="evaluation windows (first N of the test text)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random Hadamard rotation and the calibration sample")


def load_benchmark_data(args, nsamples: int):
    """What a quality script built on :func:`data_arguments` starts from: (float model, evaluation windows
    (the first ``args.windows`` of the test text), ``nsamples`` calibration windows (seeded by ``args.seed``), the float
    model's logits as a cached reference)."""
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    windows = evaluation_windows(evaluation_ids(tok, args.test_data), args.seqlen, args.windows)
    calib = calibration_windows(CalibrationSet(source=args.calib_data, nsamples=nsamples, seqlen=args.seqlen,
                                               seed=args.seed), tok)
    return base, windows, calib, cached_logits_fn(hf_logits_fn(base))


def result_path(out: Path, suffix: str) -> Path:
    """``--out STEM`` + ``suffix`` (".json", ".md"). Not ``Path.with_suffix``: a stem like ``w4a4_cap0.05`` would lose
    ``.05`` and two runs' results would land in the same file."""
    name = out.name
    for known in (".json", ".md"):
        name = name.removesuffix(known)
    return out.parent / (name + suffix)


def quantized_copy(base: LlamaForCausalLM, rot: Rotations | None, scheme: QuantScheme, wq: WeightQuantConfig,
                   calib: torch.Tensor | None = None, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A deep copy of ``base`` with norms fused and rotated by ``rot`` (None: left unrotated), fake-quantized
    under ``scheme`` on ``device`` (GPTQ uses ``calib`` windows); ``wq.stats["quantize_seconds"]`` then holds
    the quantization time alone."""
    model = copy.deepcopy(base)
    if rot is not None:
        fuse_and_rotate(model, rot)
    return quantize_model(model.to(device), scheme, wq, calib, progress=False)
