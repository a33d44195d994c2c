"""Stages composed into what the CLI commands do. Each function takes paths and options, writes atomically."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spinquant.architectures import architecture_of, longrope_original_context, rope_type
from spinquant.atomic import atomic_dir, publish_mode, remove_stale_partials
from spinquant.data import calibration_windows
from spinquant.errors import SpinQuantError
from spinquant.evaluate import (EvalResult, cached_logits_fn, check_seqlen, evaluate, evaluation_ids,
                                evaluation_windows, hf_logits_fn)
from spinquant.formats import describe_source, load_config, load_model, try_load_tokenizer
from spinquant.formats.executorch import (CHECKPOINT, FORBIDDEN_PATH_PARTS, PARAMS, PREQ_MODES, check_exportable,
                                          executorch_params, executorch_state_dict)
from spinquant.formats.hf import save_hf
from spinquant.formats.layer_progress import LayerProgress, default_folder, source_fingerprint
from spinquant.formats.rbin import SCALES_FILE, load_rbin, save_rbin
from spinquant.formats.streamed import LayeredCheckpoint
from spinquant.formats.run_dir import is_run_dir, load_run, read_quant_config, save_run
from spinquant.fusion import Rotations, fuse_and_rotate, has_online_r4
from spinquant.memory import release_memory
from spinquant.outputs import claim_output, clear_directory, record_owner, resolve_input
from spinquant.preflight import check_data_path, check_executorch_rope, check_model, check_rotation_sizes
from spinquant.pte import PteModel, run_export_llama
from spinquant.quant.apply import quantize_model
from spinquant.quant.scale_tuning import tune_scales
from spinquant.quant.scheme import QuantScheme
from spinquant.streaming import FloatReference, StreamedModel
from spinquant.rotation import LEARNED_DIR, REMOVED_OPTIONS, RotationLearner, later_option_defaults, main_learner, write_outputs




def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def probe_ids(vocab_size: int, length: int = 64, seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def rotate_model(model_src: str, out_dir: str, seed: int = 0, r4: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write the fused, random-Hadamard-rotated float model (HF directory) and R.bin; verify by reloading."""

    if describe_source(model_src) == "run":
        raise SpinQuantError(f"{model_src} is a quantized run: rotate the float model it came from")
    config, tokenizer = check_model(model_src, need_tokenizer=False)
    check_rotation_sizes(config, r4=r4)
    identity = {"model": resolve_input(model_src), "seed": seed, "r4": r4}
    claim_output(out_dir, "rotate", identity, {"--model": model_src}, overwrite)
    model = load_model(model_src)
    if has_online_r4(model) and r4:
        raise SpinQuantError(f"{model_src} already carries an online R4 rotation: pass --r4 off or the unrotated model")
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
        record_owner(tmp, "rotate", identity)
    return {"max_rel_diff": diff}


def evaluate_model(model_src: str, data: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
                   reference_src: str | None = None, tokenizer_src: str | None = None, text_field: str = "text",
                   progress: bool = True) -> EvalResult:
    """Perplexity of a model (and KL/top-1 against a reference) on the evaluation text's windows.

    ``model_src``: anything :func:`load_model` reads, or a ``.pte`` (run through executorch's runtime;
    its tokenizer is looked for beside it).
    """

    is_pte = str(model_src).endswith(".pte")
    if not is_pte:
        load_config(model_src)  # a missing path, another architecture, or a hub id offline: said before anything else
    if reference_src is not None:
        load_config(reference_src)
    check_data_path(data, "--data")
    tok_home = str(Path(model_src).parent) if is_pte else model_src
    tokenizer = try_load_tokenizer(tok_home, tokenizer_src)
    if tokenizer is None and reference_src is not None:
        tokenizer = try_load_tokenizer(reference_src)
    if tokenizer is None:
        raise SpinQuantError(f"{model_src} has no tokenizer: pass --tokenizer DIR")
    if is_pte:
        pte = PteModel(model_src)
        model_fn, vocab, max_pos = pte, pte.vocab_size, None
    else:
        model = load_model(model_src)
        model_fn, vocab, max_pos = hf_logits_fn(model), model.config.vocab_size, getattr(model.config, "max_position_embeddings", None)
    check_seqlen(seqlen, max_pos)
    windows = evaluation_windows(evaluation_ids(tokenizer, data, text_field), seqlen, max_windows)
    reference = None
    if reference_src is not None:
        ref_model = load_model(reference_src)
        if ref_model.config.vocab_size != vocab:
            raise SpinQuantError(f"the reference's vocabulary ({ref_model.config.vocab_size}) differs from the model's ({vocab})")
        reference = hf_logits_fn(ref_model)
    try:
        return evaluate(model_fn, windows, reference, progress=progress)
    except RuntimeError as exc:
        if is_pte:
            raise SpinQuantError(f"executorch failed to run {model_src} on windows of {seqlen} tokens ({exc}); a .pte "
                                 f"exported with --max-seq-len N takes windows of at most N - 1 tokens") from exc
        raise


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


def resolve_rotations(spec: str, model, seed: int, r4: bool = True) -> Rotations | None:
    """'none' -> None; 'hadamard' -> seeded random Hadamard R1/R2 (+ R4 if ``r4``); a path -> its R.bin (+ R4 if ``r4``)."""
    if spec == "none":
        return None
    if spec == "hadamard":
        return Rotations.random_hadamard(model, seed, r4=r4)
    return load_rbin(rotations_file(spec), r4=r4)


def rotations_file(spec: str) -> Path:
    """The R.bin a --rotations PATH names (a file, or a directory holding R.bin); error otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "R.bin"
    if not path.is_file():
        raise SpinQuantError(f"--rotations {spec}: expected none, hadamard, or an R.bin file (or a directory holding one)")
    return path


def quantize_identity(model_src: str, scheme, wq, rotations: str, calib, seed: int, tokenizer_src: str | None,
                      r4: bool = True, tuning=None) -> dict[str, Any]:
    """What decides a quantized run's contents (spinquant.outputs): resolved inputs and every option but the device.
    ``r4``, the GPTQ float target (and its damping), the weighted clip search, the scale refit and the scale tuning
    (``tuning``: quant/scale_tuning.py's config) are named only when they differ from the old behaviour, so runs made
    before those options existed keep their identity."""
    named = {"model": resolve_input(model_src),
             "rotations": rotations if rotations in ("none", "hadamard") else resolve_input(rotations),
             "scheme": scheme.to_dict(), "method": wq.method, "clip_search": wq.clip_search, "percdamp": wq.percdamp,
             "act_order": False,  # a removed option, always off now; kept so that runs made with it off still resume
             "calibration": asdict(calib) if calib is not None and wq.method == "gptq" else None,
             "seed": seed, "tokenizer": resolve_input(tokenizer_src)}
    if wq.gptq_target == "float":
        named["gptq_target"] = "float"
        if wq.target_percdamp != wq.percdamp:  # the float target was damped like GPTQ's Hessian until 2026-11-29
            named["target_percdamp"] = wq.target_percdamp
    if wq.scale_refit and wq.method == "gptq":
        named["scale_refit"] = True
    if tuning is not None and tuning.steps:
        named["scale_tuning"] = {"steps": tuning.steps, "lr": tuning.lr, "calibration": asdict(tuning_calibration(calib, tuning))}
    return named if r4 else {**named, "r4": False}


def tuning_calibration(calib, tuning):
    """The calibration set of the scale tuning: ``tuning.steps`` windows of ``calib``'s text and length, sampled with
    the next seed, so that it tunes on other text than GPTQ fitted (quant/scale_tuning.py)."""
    return replace(calib, nsamples=tuning.steps, seed=calib.seed + 1)


def quantize_to_run(model_src: str, out_dir: str, scheme, wq, rotations: str = "hadamard", calib=None, seed: int = 0,
                    device: str = "auto", tokenizer_src: str | None = None, progress: bool = True,
                    extra_config: dict | None = None, overwrite: bool = False, r4: bool = True,
                    tuning=None, progress_dir: str | Path | None = None) -> dict[str, Any]:
    """Rotate (optionally), quantize (RTN/GPTQ, range setting) and write a verified run directory.

    GPTQ saves each finished decoder layer to ``progress_dir`` (default: ``.NAME.gptq-layers`` beside ``out_dir``,
    formats/layer_progress.py) and a run of the same identity killed half way resumes after its last finished layer;
    the folder is removed once the run directory is written.

    ``tuning`` (quant/scale_tuning.ScaleTuningConfig, steps > 0): then tune the scales end to end on KL to the float
    model, on ``tuning.steps`` windows of ``calib``'s text other than GPTQ's (:func:`tuning_calibration`).

    ``r4``: with rotations, also fold R4 into down_proj and keep the online Hadamard before it (ExecuTorch runs it
    for power-of-two intermediate sizes only; off, down_proj's inputs stay unrotated).

    Every input is checked before ``out_dir`` is claimed (spinquant.outputs: a check, it writes nothing); the
    run is written to a temp directory and renamed into place once it reloads to the same logits.
    """
    times: dict[str, float] = {}
    kind = describe_source(model_src)
    if kind == "run":
        raise SpinQuantError(f"{model_src} is already a quantized run: quantize the float model (or use requantize)")
    dev = resolve_device(device)
    tuning = tuning if tuning is not None and tuning.steps else None
    if tuning is not None and calib is None:
        raise SpinQuantError("scale tuning needs calibration text (--calib / --calib-data)")
    config, tokenizer = check_model(model_src, tokenizer_src, need_tokenizer=wq.method == "gptq" or tuning is not None)
    scheme.check_model(config)  # bad group sizes fail before any weight is read
    if rotations not in ("none", "hadamard"):
        rotations_file(rotations)
    check_rotation_sizes(config, r4=rotations != "none" and r4)
    windows = None
    if wq.method == "gptq":
        check_seqlen(calib.seqlen, getattr(config, "max_position_embeddings", None))
        t = time.perf_counter()
        windows = calibration_windows(calib, tokenizer)
        times["calibration_data"] = time.perf_counter() - t
    tune_windows = tune_calib = None
    if tuning is not None:
        check_seqlen(calib.seqlen, getattr(config, "max_position_embeddings", None))
        tune_calib = tuning_calibration(calib, tuning)
        tune_windows = calibration_windows(tune_calib, tokenizer)
    identity = quantize_identity(model_src, scheme, wq, rotations, calib, seed, tokenizer_src, r4, tuning)
    inputs = {"--model": model_src, "--tokenizer": tokenizer_src, "--calib-data": calib.source if windows is not None else None,
              "--rotations": None if rotations in ("none", "hadamard") else rotations}
    claim_output(out_dir, "quantize", identity, inputs, overwrite)
    t = time.perf_counter()
    checkpoint = LayeredCheckpoint.open(model_src) if kind in ("hf", "hub") else None
    model = load_model(model_src) if checkpoint is None else checkpoint.skeleton()
    times["load"] = time.perf_counter() - t
    if has_online_r4(model) and rotations != "none":
        raise SpinQuantError(f"{model_src} is already rotated (online R4): pass --rotations none")
    rot = resolve_rotations(rotations, model, seed, r4)
    prepare = None
    if checkpoint is None:  # loaded whole (.bin weights, a Meta checkpoint, a hub id offline): transformed whole
        t = time.perf_counter()
        if rot is not None:
            fuse_and_rotate(model, rot)
        times["rotate"] = time.perf_counter() - t
        model.to(dev)
    else:  # read, fused and rotated layer by layer while it is quantized (spinquant.streaming)
        prepare = StreamedModel(checkpoint, model, rot, dev)

    store = None
    if wq.method == "gptq":
        files = source_fingerprint(checkpoint.folder if checkpoint is not None else Path(resolve_input(model_src)))
        if rotations not in ("none", "hadamard"):
            files |= {f"rotations/{k}": v for k, v in source_fingerprint(rotations_file(rotations)).items()}
        store = LayerProgress.open(progress_dir or default_folder(out_dir), {**identity, "source_files": files})
        if store.layers_done:
            print(f"[spinquant] gptq: resuming after decoder layer {store.layers_done} of {model.config.num_hidden_layers} "
                  f"(the finished layers are in {store.folder})", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        quantize_model(model, scheme, wq, windows, progress=progress, prepare=prepare, store=store)
    except SpinQuantError:  # bad input found on the way (NaN weights in a layer): the fixed model must start over
        if store is not None:
            store.remove()
        raise
    times["quantize"] = time.perf_counter() - t
    del prepare  # it holds the model too: the reload check below must find it freed
    if tuning is not None:
        t = time.perf_counter()
        # the float model (the rotation does not change its function) on the tuning windows, layer by layer
        teacher = FloatReference.build(model_src, tune_windows, dev, progress=progress)
        tune_scales(model, teacher, tune_windows, tuning, progress=progress)
        del teacher
        release_memory()
        times["tune_scales"] = time.perf_counter() - t
    model.to("cpu")
    config = {
        "source_model": str(model_src),
        "scheme": scheme.to_dict(),
        "method": wq.method,
        "clip_search": wq.clip_search,
        "percdamp": wq.percdamp,
        "gptq_target": wq.gptq_target,
        "target_percdamp": wq.target_percdamp if wq.gptq_target == "float" else None,
        "scale_refit": wq.scale_refit and wq.method == "gptq",
        "scale_tuning": None if tuning is None else {"steps": tuning.steps, "lr": tuning.lr,
                                                     "calibration": {**tune_calib.__dict__}, **tuning.stats},
        "rotations": rotations if rotations in ("none", "hadamard") else str(Path(rotations).resolve()),
        "seed": seed,
        "calibration": None if windows is None else {**calib.__dict__},
        "device": str(dev),
        "times_s": times,
        "output_error": wq.stats.get("output_error"),
        **(extra_config or {}),
    }
    if rot is not None and rot.scales is not None and wq.gptq_target == "float":
        config["warning"] = ("the float GPTQ objective with learned channel scales lost to plain GPTQ where it was measured "
                             "(docs/recipe.md): compare with --gptq-objective layer")
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    with atomic_dir(out_dir) as tmp:
        save_run(model, tmp, config, tokenizer)
        if rot is not None:
            save_rbin(rot, tmp / "R.bin")
        del model  # the reload below is the only model in memory while it is checked (one at a time: 1B/3B sizes)
        release_memory()
        with torch.no_grad():
            got = load_run(tmp)(ids).logits
        if not torch.equal(got, expected):
            raise SpinQuantError(f"verification failed: the saved run reproduces the logits only to {max_rel_diff(got, expected):.2e}")
        record_owner(tmp, "quantize", identity)
    if store is not None:
        store.remove()
    return config


def verification_windows(run_dir: Path, tokenizer: Any, data: str | None, n: int, seqlen: int) -> tuple[torch.Tensor, str]:
    """Windows to compare our model and the .pte on: ``data``, else the run's local calibration text, else
    WikiText-2 from the hub, else (offline, nothing local) seeded random tokens."""
    candidates = [data] if data else []
    calib = (json.loads((run_dir / "quant_config.json").read_text()).get("calibration") or {}) if (run_dir / "quant_config.json").is_file() else {}
    if calib.get("source") and Path(calib["source"]).exists():
        candidates.append(calib["source"])
    candidates.append("wikitext2")
    for source in candidates:
        try:
            ids = evaluation_ids(tokenizer, source)
            return evaluation_windows(ids, seqlen, n), source
        except SpinQuantError:
            if source == data:
                raise
    vocab = len(tokenizer) if tokenizer is not None else 256
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0)), "random tokens (no text available offline)"


def compare_logits(ours, theirs, windows: torch.Tensor) -> dict[str, float]:
    """Max relative logit difference, top-1 agreement and both perplexities over ``windows``."""
    max_rel, agree, count, nll_a, nll_b, kl = 0.0, 0, 0, 0.0, 0.0, 0.0
    for w in windows:
        a = ours(w[None])[0].float()
        b = theirs(w[None])[0].float()
        max_rel = max(max_rel, max_rel_diff(b, a))
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
        kl += (la.exp() * (la - lb)).sum().item()
        count += a.shape[0]
        t = w[1:]
        nll_a += F.cross_entropy(a[:-1], t, reduction="sum").item()
        nll_b += F.cross_entropy(b[:-1], t, reduction="sum").item()
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    return {"max_rel_logit_diff": max_rel, "top1_agreement": agree / count, "kl_ours_to_pte": kl / count,
            "ppl_ours": math.exp(nll_a / n_pred), "ppl_pte": math.exp(nll_b / n_pred)}


def quantization_kl(run: Path, ours, windows: torch.Tensor) -> float | None:
    """KL(float || ours) nats/token on ``windows``: the float model the run was quantized from (its
    quant_config's source_model), or None when it cannot be loaded here (moved, or a hub id offline)."""

    source = read_quant_config(run).get("source_model")
    try:
        reference = FloatReference.build(source, windows)  # layer by layer from a local checkpoint
    except (SpinQuantError, TypeError):
        return None
    kl = compare_logits(reference, ours, windows)["kl_ours_to_pte"]
    del reference
    release_memory()
    return kl


EXPORT_FILES = ("consolidated.00.pth", "params.json", "model.pte", "verification.json", "verification.failed.json",
                "export_llama.log")


def export_run(run_dir: str, out_dir: str | None = None, pte: bool = True, verify_data: str | None = None,
               verify_windows: int = 4, verify_seqlen: int = 512, max_seq_len: int = 2048, full_logits: bool = False,
               max_kl_ratio: float = 0.2, max_kl: float = 1e-3, max_ppl_rel: float = 0.01, min_top1: float = 0.0,
               overwrite: bool = False, claim: bool = True, runtime: str = "xnnpack") -> dict[str, Any]:
    """Write the ExecuTorch checkpoint of a run (and a verified .pte). Checks everything before any work.

    ``out_dir`` defaults to the run directory itself: the export adds its files (EXPORT_FILES) beside the run and
    never touches the run's own. Every file is written into a temp folder inside ``out`` and renamed into place
    only when all of them are finished (and the .pte verified), so a failure leaves the earlier export whole.
    ``claim=False``: the caller (calibrate) owns ``out`` and has checked it.

    The accept rule (its margins: benchmarks/RESULTS.md): the .pte must be much closer to our model than our model is
    to the float model, KL(ours || pte) <= ``max_kl_ratio`` x KL(float || ours) on the same windows, and its
    perplexity within ``max_ppl_rel``; top-1 agreement flips on near-tied logits and is only reported
    (``min_top1`` 0 by default). When the float model cannot be loaded, ``max_kl`` (absolute, nats/token) applies.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise SpinQuantError(f"no such run directory: {run}")
    if not is_run_dir(run):
        raise SpinQuantError(f"{run} is not a quantized run (no quant_config.json): make one with spinquant quantize")
    scheme = QuantScheme.from_dict(read_quant_config(run)["scheme"])
    check_data_path(verify_data, "--verify-data")
    model = load_run(run)
    mode = check_exportable(model, scheme)
    max_seq_len = min(max_seq_len, getattr(model.config, "max_position_embeddings", max_seq_len))
    if rope_type(model.config) == "longrope":
        # ExecuTorch picks LongRoPE's long factors for every position once its cache exceeds the original context;
        # transformers picks them per call by its length: within the original context both use the short factors
        max_seq_len = min(max_seq_len, longrope_original_context(model.config))
    make_pte = pte and mode in PREQ_MODES
    if make_pte:
        check_executorch_rope(model.config, str(run))
    out = Path(out_dir).expanduser() if out_dir else run
    same_dir = out.resolve() == run.resolve()  # the run's own export: "from" is the directory itself, wherever it moves
    identity = {"from": "." if same_dir else resolve_input(run), "pte": make_pte, "max_seq_len": max_seq_len,
                "full_logits": full_logits}
    if claim:
        claim_output(out, "export", identity, {"--from": run, "--verify-data": verify_data}, overwrite,
                     may_equal=("--from",), owned_files=EXPORT_FILES)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export.partial-", dir=out))
    try:
        torch.save(executorch_state_dict(model, scheme), stage / CHECKPOINT)
        (stage / PARAMS).write_text(json.dumps(executorch_params(model, scheme), indent=2))
        result: dict[str, Any] = {"preq_mode": mode, "group_size": scheme.group, "spin_quant": has_online_r4(model),
                                  "checkpoint": str(out / CHECKPOINT), "params": str(out / PARAMS)}
        bad = [p for p in FORBIDDEN_PATH_PARTS if p in str((out / CHECKPOINT).resolve())]
        if bad:
            result["warning"] = (f"the checkpoint path contains '{bad[0]}': executorch's loader switches to another (broken) branch "
                                 f"on it; move or link the checkpoint to a path without 'int8'/'8da4w' before running export_llama "
                                 f"yourself (spinquant's own .pte export does this)")
        if not make_pte:
            result["pte_skipped"] = None if not pte else f"no .pte for {mode} on this machine (ExecuTorch's {runtime} path takes 8da4w modes)"
        else:
            cfg, spin = model.config, has_online_r4(model)
            eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id] if cfg.eos_token_id is not None else []
            seqlen = min(verify_seqlen, max_seq_len - 1)
            windows, source = verification_windows(run, try_load_tokenizer(str(run)), verify_data, verify_windows, seqlen)
            # one model in memory at a time (1B/3B sizes): our logits are computed and cached, our model freed, then the
            # float model gives the KL scale and is freed, then executorch's exporter (a child process) and the .pte run
            # (the .pte runtime keeps memory after its program is released, so the float model comes before it)
            ours = cached_logits_fn(hf_logits_fn(model))
            for w in windows:
                ours(w[None])
            ours.release()
            del model
            release_memory()
            kl_quant = quantization_kl(run, ours, windows)
            result["export"] = run_export_llama(stage, stage / "model.pte", mode, scheme.group, spin,
                                                cfg.bos_token_id, eos, max_seq_len, full_logits, log_file=stage / "export_llama.log",
                                                runtime=runtime, model=architecture_of(cfg).executorch_model)
            pte_model = PteModel(stage / "model.pte")
            metrics = compare_logits(ours, pte_model, windows)
            del pte_model
            metrics.update(windows=int(windows.shape[0]), seqlen=int(windows.shape[1]), data=source)
            metrics["kl_float_to_ours"] = kl_quant
            kl_bound = max_kl_ratio * kl_quant if kl_quant is not None else max_kl
            metrics["kl_bound"] = kl_bound
            result["verification"] = metrics
            ppl_rel = abs(metrics["ppl_pte"] / metrics["ppl_ours"] - 1)
            ok = metrics["kl_ours_to_pte"] <= kl_bound and ppl_rel <= max_ppl_rel and metrics["top1_agreement"] >= min_top1
            result["verified"] = ok
            result["pte"] = str(out / "model.pte")
            result["pte_bytes"] = (stage / "model.pte").stat().st_size
            if not ok:
                failed = out / "verification.failed.json"
                failed.write_text(json.dumps(result, indent=2))
                raise SpinQuantError(
                    f"the .pte does not match our fake-quant model: KL(ours||pte) {metrics['kl_ours_to_pte']:.2e} nats/token "
                    f"(need <= {kl_bound:.2e}), perplexity {metrics['ppl_pte']:.3f} vs {metrics['ppl_ours']:.3f} "
                    f"({100 * ppl_rel:.2f}%, need <= {100 * max_ppl_rel:.2f}%), top-1 agreement {metrics['top1_agreement']:.4f}; "
                    f"nothing was written; details in {failed}")
            (stage / "verification.json").write_text(json.dumps(result, indent=2))
        publish_mode(stage)
        # every file is finished: replace the earlier export's files (and only those) by the new ones
        for name in EXPORT_FILES:
            if (stage / name).exists():
                (stage / name).replace(out / name)
            elif name in ("model.pte", "verification.json", "verification.failed.json", "export_llama.log") and (out / name).exists():
                (out / name).unlink()  # a previous export's .pte would not belong to this checkpoint
        record_owner(out, "export", identity)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group; each rank takes its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def learn_identity(model_src: str, cfg, calib, tokenizer_src: str | None) -> dict[str, Any]:
    """What decides learned rotations (spinquant.outputs): the model, every learning option but the save interval,
    the calibration set and the tokenizer."""
    # options added later are named only when set (r4 when off), so outputs made before them keep resuming
    unset = later_option_defaults()
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
              if k != "save_every" and not (k in unset and v == unset[k])}
    config["momentum"] = REMOVED_OPTIONS["momentum"]  # removed, always 0 now: named as outputs made before record it
    return {"model": resolve_input(model_src), "config": config, "calibration": asdict(calib), "tokenizer": resolve_input(tokenizer_src)}


HELD_OUT_WINDOWS = 8


def held_out_check(learner: RotationLearner, calib, tokenizer: Any) -> dict[str, Any]:
    """The learning loss of the start and of the learned rotations on HELD_OUT_WINDOWS calibration windows learning
    never trained on (the next start positions of the same seeded draw, so distinct from every learning window);
    ``kept`` says which R.bin holds. Learning that made the held-out loss worse keeps its start, said in one line."""
    try:
        more = calibration_windows(replace(calib, nsamples=calib.nsamples + HELD_OUT_WINDOWS), tokenizer)
    except SpinQuantError:
        return {"kept": "learned", "skipped": "the calibration text has no room for held-out windows"}
    windows = more[calib.nsamples:]
    start, learned = learner.loss_on(windows, start=True), learner.loss_on(windows)
    kept = "learned" if learned <= start else "start"
    if kept == "start" and learner.rank == 0:
        print(f"[spinquant] warning: the learned rotations are worse than their random-Hadamard start on "
              f"{len(windows)} held-out calibration windows (loss {learned:.4f} vs {start:.4f}): R.bin keeps the start, "
              f"the learned ones are in {LEARNED_DIR}/R.bin (fewer steps, a lower --lr or --max-angle may help)",
              file=sys.stderr, flush=True)
    return {"windows": int(windows.shape[0]), "start_loss": start, "learned_loss": learned, "kept": kept}


def learn_rotations(model_src: str, out_dir: str, cfg, calib, device: str = "auto", tokenizer_src: str | None = None,
                    progress: bool = True, stop_after: int | None = None, overwrite: bool = False,
                    claim: bool = True, learner_factory=main_learner) -> dict[str, Any]:
    """Learn R1/R2 on ``calib`` and write R.bin, losses.json and learning_curve.png into ``out_dir``.

    The learning state is saved in ``out_dir`` every ``cfg.save_every`` steps; a re-run with the same
    ``out_dir`` and options continues from it. ``stop_after`` stops after that many steps (tests).
    Every input is checked and the model loaded before anything is written to ``out_dir``
    (spinquant.outputs); ``claim=False``: the caller (calibrate) owns ``out_dir``. ``learner_factory(model, windows,
    cfg, device, state_dir, progress)`` prepares the original float model and returns its learner (rotation.main_learner;
    spinquant.experimental's takes the research options).
    """
    cfg.check()
    kind = describe_source(model_src)
    if kind == "run":
        raise SpinQuantError(f"{model_src} is a quantized run: learn rotations on the float model")
    out = Path(out_dir)
    config, tokenizer = check_model(model_src, tokenizer_src)
    check_rotation_sizes(config, r4=cfg.r4)
    check_seqlen(calib.seqlen, getattr(config, "max_position_embeddings", None))
    windows = calibration_windows(calib, tokenizer)
    identity = learn_identity(model_src, cfg, calib, tokenizer_src)
    status = "same"
    if claim:
        status = claim_output(out, "learn-rotations", identity, {"--model": model_src, "--tokenizer": tokenizer_src,
                                                                 "--calib-data": calib.source}, overwrite)
    dev = init_distributed(resolve_device(device))
    model = load_model(model_src)
    if has_online_r4(model):
        raise SpinQuantError(f"{model_src} is already rotated: learn rotations on the original float model")
    learner = learner_factory(model, windows, cfg, dev, state_dir=out, progress=progress)
    if learner.rank == 0 and claim:
        if status == "replace":
            clear_directory(out)
        out.mkdir(parents=True, exist_ok=True)
        record_owner(out, "learn-rotations", identity)
        remove_stale_partials(out)  # a state file half-written when an earlier run of this output was killed
    resumed_from = learner.step if learner.try_resume() else 0
    learner.run(stop_after=stop_after)
    summary: dict[str, Any] = {"steps": learner.step, "resumed_from": resumed_from, "finished": learner.step >= cfg.steps,
                               "rank": learner.rank}
    if summary["finished"]:
        summary["held_out"] = held_out_check(learner, calib, tokenizer)
    if learner.rank == 0 and summary["finished"]:
        tmp = Path(tempfile.mkdtemp(prefix=".learn.partial-", dir=out))
        try:
            keep_start = summary["held_out"].get("kept") == "start"
            summary.update(write_outputs(learner, tmp, {"model": model_src, "calibration": {**calib.__dict__}, "device": str(dev),
                                                        "held_out": summary["held_out"]}, keep_start=keep_start))
            publish_mode(tmp)
            if (out / LEARNED_DIR).is_dir():
                shutil.rmtree(out / LEARNED_DIR)  # this output's own earlier copy: replaced (or gone) with the new R.bin
            for name in (SCALES_FILE, "R.bin", "losses.json", "learning_curve.png", LEARNED_DIR):  # scales before their R.bin
                if (tmp / name).exists():
                    (tmp / name).replace(out / name)
        finally:

            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return summary
