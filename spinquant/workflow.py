"""What users run: ``calibrate`` (the whole pipeline, resumable by stage) and ``requantize`` (another target
from learned rotations, no learning); ``batch`` (many models from a YAML file) is spinquant.batch.

A calibrate run directory holds at its top level: ``R.bin`` (+ ``losses.json``, ``learning_curve.png``),
the quantized run (``quantized.safetensors``, ``quant_config.json``, ``config.json``, tokenizer files),
the ExecuTorch checkpoint (``consolidated.00.pth``, ``params.json``), ``model.pte`` and
``verification.json``, ``report.json`` / ``report.md`` / plots, ``calibrate_config.json`` (every
option, versions, seeds) and ``stages.json`` (finished stages with their times). A re-run with the
same options skips finished stages; a stage's outputs are renamed into place only when it finished.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from spinquant.architectures import LLAMA, architecture_of
from spinquant.atomic import atomic_dir, atomic_file, remove_stale_partials
from spinquant.data import calibration_windows, resolve_calibration
from spinquant.errors import SpinQuantError
from spinquant.evaluate import (check_seqlen, evaluate, evaluation_ids, evaluation_windows,
                                hf_logits_fn)
from spinquant.formats import describe_source, load_config, load_model, try_load_tokenizer
from spinquant.formats.hf import weight_shapes
from spinquant.formats.meta import save_meta
from spinquant.formats.rbin import load_rbin, save_rbin, scales_path
from spinquant.formats.run_dir import versions
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.memory import release_memory
from spinquant.outputs import OWNER_FILE, claim_output, clear_directory, record_owner, resolve_input
from spinquant.pipeline import export_run, learn_rotations, max_rel_diff, probe_ids, quantize_to_run, resolve_device
from spinquant.preflight import (activation_bytes, check_data_path, check_executorch_rope, check_finite_weights, check_model,
                                 check_resources, check_rotation_sizes, executorch_rope_problem)
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.scale_tuning import ScaleTuningConfig
from spinquant.quant.scheme import check_damping
from spinquant.recipes import META_KEYS, RECIPES, RENAMED, check_recipe, read_recipe, unset_values
from spinquant.report import plot_residual_stats, residual_stats, write_report
from spinquant.rotation import LearnConfig
from spinquant.streaming import FloatReference
from spinquant.targets import DEFAULT_TARGET, Target, get_target

STAGES = ("learn", "quantize", "export", "report")
CONFIG_FILE = "calibrate_config.json"
STAGES_FILE = "stages.json"
TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "None": "null",
              "list[str]": "a list of strings"}
RECORD_NAMES = {new: old for old, new in RENAMED.items()}  # today's option name -> the name run identities record
# options that do not change what a stage computes: they may differ on a resume
RESUME_FREE = {"out", "pte", "device", "eval_windows", "eval_data", "compare_hadamard", "overwrite"}
# recipe keys moved to spinquant.experimental (docs/experimental.md), at the value every calibrate run has now
RETIRED_KEYS = {"learn_w_bits": 16, "learn_loss": "ce", "learn_weight_quant": "rtn"}
RETIRED_VALUES = {**RETIRED_KEYS, "tune_norms": False}  # a recipe or batch file may still name them at these values


@dataclass
class CalibrateOptions:
    """Every option of a calibrate run: the recipe keys (docs/recipe.md). The defaults are Meta's Llama 3.2 SpinQuant
    recipe except for the options left None here, which :func:`resolve_recipe` fills from the run's recipe, else the
    default recipe (spinquant/recipe_files/default.yaml). Build one with :meth:`build` to apply a recipe file."""

    model: str
    out: str | None = None
    calib: str = "wikitext2"
    calib_data: str | None = None
    target: str = DEFAULT_TARGET
    rotations: str = "learned"  # learned: Cayley SGD from random Hadamard; hadamard: the seeded random Hadamard, no learning
    steps: int = 100  # 0: the same as rotations="hadamard"
    nsamples: int | None = None  # default: steps * batch_size (800)
    seqlen: int = 2048
    batch_size: int = 8
    micro_batch: int = 1
    lr: float = 1.5
    max_angle: float | None = None  # radians: cap on one Cayley step's turn (rotation.bound_step_angles); 0: no cap; None: default
    gptq_nsamples: int = 128
    gptq_objective: str | None = None  # layer: plain GPTQ; float: fits the float model's outputs (quant/apply.py); None: default
    gptq_objective_damp: float | None = None  # the float objective's ridge damping (WeightQuantConfig.target_percdamp); None: default
    gptq_refit_scales: bool | None = None  # least-squares refit of GPTQ's group scales (WeightQuantConfig.scale_refit); None: default
    tune_scales_steps: int | None = None  # end-to-end scale tuning after GPTQ (quant/scale_tuning.py); 0: off; None: default
    tune_scales_lr: float | None = None  # its Adam learning rate on the log-scales; None: default
    r4: str = "auto"  # auto | on | off; calibrate() resolves auto to on/off (resolve_r4) before anything runs
    pte: bool | None = None  # None: a .pte when the target has one
    eval_data: str | list[str] = "wikitext2"  # one text or several: the report evaluates on each
    eval_windows: int = 20
    compare_hadamard: bool = False
    device: str = "auto"
    seed: int = 0
    tokenizer: str | None = None
    text_field: str | None = None  # field of jsonl/parquet rows holding the text [default: the set's, else "text"]
    overwrite: bool = False
    recipe: str | None = None  # a shipped recipe's name or a recipe file (spinquant.recipes); None: the default recipe

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(CalibrateOptions)]

    def resolved_out(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / Path(str(self.model).rstrip("/")).name

    @staticmethod
    def check_value(where: str, key: str, value: Any) -> None:
        """A value from YAML or ``--set`` must name an option and have its type (``steps: two`` is refused, named);
        a key moved to spinquant.experimental may only have the value calibrate runs (RETIRED_VALUES)."""
        if key in RETIRED_VALUES:
            if value != RETIRED_VALUES[key]:
                raise SpinQuantError(f"{where}: {key} {value}: a research setting, moved to spinquant.experimental "
                                     f"(docs/experimental.md); calibrate runs {key} {RETIRED_VALUES[key]}")
            return
        if key not in CalibrateOptions.names():
            raise SpinQuantError(f"{where}: unknown option '{key}' (options: {', '.join(CalibrateOptions.names())})")
        allowed = {t.strip() for t in str(next(f.type for f in fields(CalibrateOptions) if f.name == key)).split("|")}
        ok = ((value is None and "None" in allowed) or (isinstance(value, bool) and "bool" in allowed)
              or (isinstance(value, int) and not isinstance(value, bool) and ("int" in allowed or "float" in allowed))
              or (isinstance(value, float) and "float" in allowed) or (isinstance(value, str) and "str" in allowed)
              or (isinstance(value, list) and "list[str]" in allowed and all(isinstance(v, str) for v in value) and value))
        if not ok:
            want = " or ".join(TYPE_WORDS[t] for t in sorted(allowed) if t != "None")
            raise SpinQuantError(f"{where}: {key} must be {want} (got {value!r})")

    @staticmethod
    def build(model: str, recipe: str | None = None, **given: Any) -> "CalibrateOptions":
        """The options of a run: a recipe file's values (a shipped recipe's are resolved by :func:`calibrate`), with
        ``given`` over them. Names recorded before a rename are read as today's (spinquant.recipes.RENAMED)."""
        given = {RENAMED.get(k, k): yaml_value(k, v) for k, v in given.items()}
        values: dict[str, Any] = {}
        if recipe is not None and recipe not in RECIPES and recipe != "default":
            values = {RENAMED.get(k, k): yaml_value(k, v) for k, v in read_recipe(recipe).items() if k not in META_KEYS}
            if "model" in values:
                raise SpinQuantError(f"recipe {recipe}: model is not a recipe key (pass the model on its own)")
            recipe = str(Path(recipe).expanduser().resolve())
        for key, value in {**values, **given}.items():
            CalibrateOptions.check_value(f"recipe {recipe}" if key in values and key not in given else "option", key, value)
        return CalibrateOptions(model=model, recipe=recipe, **{k: v for k, v in {**values, **given}.items()
                                                               if k not in RETIRED_VALUES})


def yaml_value(key: str, value: Any) -> Any:
    """YAML 1.1 reads on/off as booleans: for ``r4``, whose values are the words auto/on/off, they mean those words."""
    return ("on" if value else "off") if key == "r4" and isinstance(value, bool) else value


def eval_texts(opts: CalibrateOptions) -> list[str]:
    """The evaluation texts of a run, in order (``eval_data`` is one text or a list)."""
    return [opts.eval_data] if isinstance(opts.eval_data, str) else list(opts.eval_data)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _model_identity(model: str) -> str:
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


class Run:
    """A calibrate run directory and its stage bookkeeping."""

    def __init__(self, out: Path, opts: dict[str, Any]) -> None:
        self.dir = out
        self.opts = opts

    def done(self, stage: str) -> bool:
        return stage in _json(self.dir / STAGES_FILE)

    def mark(self, stage: str, seconds: float) -> None:
        stages = _json(self.dir / STAGES_FILE)
        stages[stage] = {"seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # this stage's peak (reset by start_stage)
            stages[stage]["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        _write_json(self.dir / STAGES_FILE, stages)

    @staticmethod
    def start_stage() -> None:
        """Reset CUDA's peak-memory counter, so that :meth:`mark` records the stage's own peak."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def unmark(self, stage: str) -> None:
        stages = _json(self.dir / STAGES_FILE)
        stages.pop(stage, None)
        _write_json(self.dir / STAGES_FILE, stages)

    def stage_seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in _json(self.dir / STAGES_FILE).items()}

    def move_in(self, src: Path) -> None:
        """Rename every file of a finished stage's temp directory into the run directory (not the stage's own
        output record: the run directory's record is calibrate's)."""

        for f in src.iterdir():
            if f.is_file() and f.name != OWNER_FILE:
                f.replace(self.dir / f.name)


def _log(msg: str) -> None:
    import click

    click.echo(msg, err=True)


def _calibration(opts: CalibrateOptions, nsamples: int):
    return resolve_calibration(opts.calib, opts.calib_data, nsamples, opts.seqlen, opts.seed, nsamples, opts.text_field)


def gptq_config(opts: CalibrateOptions):
    """The WeightQuantConfig of calibrate's GPTQ (range setting on; target and clip weighting as resolved in ``opts``)."""

    return WeightQuantConfig(method="gptq", clip_search=True, float_target=opts.gptq_objective == "float",
                             target_percdamp=opts.gptq_objective_damp,
                             scale_refit=bool(opts.gptq_refit_scales))


def scale_tuning_config(opts: CalibrateOptions):
    """The ScaleTuningConfig of calibrate's scale tuning after GPTQ (steps 0: none)."""

    return ScaleTuningConfig(steps=int(opts.tune_scales_steps or 0), lr=opts.tune_scales_lr)


GPTQ_PROGRESS = ".gptq-layers"  # the quantize stage's finished layers while it runs (formats/layer_progress.py)


def _stage_quantize(run: Run, opts: CalibrateOptions, model_src: str, rbin: Path) -> None:
    target = get_target(opts.target)
    tmp = Path(tempfile.mkdtemp(prefix=".stage-quantize-", dir=run.dir))
    try:
        if target.exporter == "float-rotated":
            write_float_rotated(model_src, rbin, tmp / "out")
        else:
            quantize_to_run(model_src, str(tmp / "out"), target.scheme, gptq_config(opts),
                            rotations=str(rbin), calib=_calibration(opts, opts.gptq_nsamples), seed=opts.seed,
                            device=opts.device, tokenizer_src=opts.tokenizer, extra_config={"target": target.name},
                            r4=opts.r4 == "on", tuning=scale_tuning_config(opts), progress_dir=run.dir / GPTQ_PROGRESS)
        run.move_in(tmp / "out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_float_rotated(model_src: str, rbin: Path, out: Path) -> None:
    """Target qnn-float-rotated: the original model as a float Meta checkpoint plus R.bin, checked by reloading
    both and applying the rotations ourselves (the float function must be unchanged)."""

    if scales_path(rbin).is_file():
        raise SpinQuantError(f"{rbin} comes with learned channel scales ({scales_path(rbin).name}), which a backend that "
                             f"applies R.bin to the original float checkpoint would drop: quantize with spinquant instead "
                             f"(an xnnpack target), or learn the rotations without --scales for this target")
    model = load_model(model_src)
    with atomic_dir(out) as tmp:
        save_meta(model, tmp)
        shutil.copy(rbin, tmp / "R.bin")
        tok = try_load_tokenizer(model_src)
        if tok is not None:
            tok.save_pretrained(tmp)
        back = load_model(tmp)
        ids = probe_ids(model.config.vocab_size)
        with torch.no_grad():
            expected = model(ids).logits
            fuse_and_rotate(back, load_rbin(tmp / "R.bin"))
            diff = max_rel_diff(back(ids).logits, expected)
        if diff > 1e-3:
            raise SpinQuantError(f"verification failed: the float checkpoint rotated by R.bin differs by {diff:.2e}")
        (tmp / "verification.json").write_text(json.dumps({"rotated_float_max_rel_logit_diff": diff}, indent=2))


def _stage_report(run: Run, opts: CalibrateOptions, model_src: str) -> dict[str, Any]:
    target = get_target(opts.target)
    report: dict[str, Any] = {"model": opts.model, "target": target.name, "target_description": target.description,
                              "options": run.opts, "plots": []}
    tokenizer = try_load_tokenizer(str(run.dir)) or try_load_tokenizer(model_src, opts.tokenizer)
    config = load_config(model_src)
    seqlen = min(opts.seqlen, getattr(config, "max_position_embeddings", opts.seqlen))
    texts: list[tuple[str, torch.Tensor | str]] = []  # (text, its windows) or (text, why it was skipped)
    for data in eval_texts(opts):
        try:
            texts.append((data, evaluation_windows(evaluation_ids(tokenizer, data), seqlen, opts.eval_windows)))
        except SpinQuantError as exc:
            texts.append((data, f"{exc} (pass --eval-data PATH)"))
    windows_of = [(data, w) for data, w in texts if not isinstance(w, str)]
    evs: list[dict[str, Any]] = [{"data": data, "skipped": w} if isinstance(w, str) else
                                 {"data": data, "windows": int(w.shape[0]), "seqlen": int(w.shape[1])} for data, w in texts]
    # memory: the float model's final hidden states on every window, computed layer by layer (streaming.FloatReference:
    # one float layer at a time from a local checkpoint), stand in for the model and its logits; its residual stream
    # on two windows' first 512 tokens gives the outlier statistics, before and after R1
    every = torch.cat([w for _, w in windows_of]) if windows_of else torch.randint(
        0, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(opts.seed))
    ref = FloatReference.build(model_src, every, probe=(2, 512))
    for ev, (_, w) in zip(evs, texts):
        if not isinstance(w, str):
            ev["float"] = evaluate(ref, w, progress=False).to_dict()
    if target.quantizes and opts.compare_hadamard and windows_of:
        m = load_model(model_src)
        fuse_and_rotate(m, Rotations.random_hadamard(m, opts.seed, r4=opts.r4 == "on"))
        quantize_model(m, target.scheme, gptq_config(opts), calibration_windows(_calibration(opts, opts.gptq_nsamples), tokenizer), progress=False)
        for ev, (_, w) in zip(evs, texts):
            if not isinstance(w, str):
                ev["random_hadamard"] = evaluate(hf_logits_fn(m), w, ref, progress=False).to_dict()
        del m
        release_memory()
    before = residual_stats(ref.residuals)
    after = residual_stats(ref.residuals, load_rbin(run.dir / "R.bin").r1)
    if target.quantizes and windows_of:
        quantized = hf_logits_fn(load_model(run.dir))
        for ev, (_, w) in zip(evs, texts):
            if not isinstance(w, str):
                ev["quantized"] = evaluate(quantized, w, ref, progress=False).to_dict()
    report["evaluation"] = evs[0]  # the first text (what a one-text run always reported)
    if len(evs) > 1:
        report["evaluations"] = evs
    report["residual_stats"] = {"original": before, "rotated": after}
    try:
        plot_residual_stats(before, after, run.dir / "residual_stats.png")
        report["plots"].append("residual_stats.png")
    except ImportError:
        pass
    if (run.dir / "learning_curve.png").is_file():
        report["plots"].append("learning_curve.png")
    report["learning"] = {k: v for k, v in _json(run.dir / "losses.json").items() if k != "config"}
    report["export"] = _json(run.dir / "verification.json")
    report["sizes"] = {f: (run.dir / f).stat().st_size for f in ("consolidated.00.pth", "model.pte", "quantized.safetensors")
                       if (run.dir / f).is_file()}
    report["stage_seconds"] = run.stage_seconds()
    write_report(run.dir, report)
    return report


def resolve_r4(choice: str, inter: int, target: Target, pte: bool) -> tuple[str, str | None]:
    """--r4 auto|on|off -> ("on" or "off", the line that says why auto chose off, else None). auto is on unless the
    target's runtime cannot compute the online Hadamard at the model's intermediate size ``inter`` (ExecuTorch's
    fast_hadamard_transform takes powers of two only): then off, since a model that cannot be deployed is worse than
    down_proj inputs left unrotated. "on" with such a size fails in the preflight with the fix named. The caller
    prints the line once its checks have passed (a refused start says one thing)."""
    if choice not in ("auto", "on", "off"):
        raise SpinQuantError(f"--r4 {choice}: choose auto, on or off")
    if choice != "auto":
        return choice, None
    if pte and not target.computes_online_hadamard(inter):
        return "off", (f"[spinquant] R4 off: {target.name}'s runtime cannot compute an online Hadamard of the intermediate "
                       f"size {inter} (ExecuTorch's fast_hadamard_transform takes powers of two); down_proj's inputs stay "
                       f"unrotated")
    return "on", None


def _preflight(opts: CalibrateOptions, target, pte: bool, learn: bool, learn_cfg, nsamples: int):
    """Every check calibrate can make before it creates anything (spinquant.preflight): the model and its weights'
    headers, tokenizer, scheme, Hadamard sizes, RoPE for ExecuTorch, sequence length, learning options and the
    calibration and evaluation data (tokenized now; the windows are cached for the stages), memory and disk. Returns the
    model's config and the line stating the resources estimate."""

    if describe_source(opts.model) == "run":
        raise SpinQuantError(f"{opts.model} is a quantized run: calibrate the float model (or use requantize)")
    config, tokenizer = check_model(opts.model, opts.tokenizer)
    if target.exporter == "float-rotated" and architecture_of(config) is not LLAMA:
        raise SpinQuantError(f"target {target.name} writes a float Llama (Meta) checkpoint for Qualcomm's Llama runner; "
                             f"{config.model_type} models have no such checkpoint: use an xnnpack target")
    if target.quantizes:
        target.scheme.check_model(config)
    check_rotation_sizes(config, r4=opts.r4 == "on", executorch_r4=pte)
    if pte:
        check_executorch_rope(config, opts.model)
    elif target.quantizes and executorch_rope_problem(config):
        _log(f"warning: {opts.model} uses {executorch_rope_problem(config)}: the ExecuTorch checkpoint's params.json "
             f"cannot describe it (the quantized run is correct; no .pte is made)")
    check_seqlen(opts.seqlen, getattr(config, "max_position_embeddings", None))
    if learn:
        learn_cfg.check()
        calibration_windows(_calibration(opts, nsamples), tokenizer)
    gptq_tokens = tuning_tokens = 0
    if target.quantizes:
        gptq_windows = calibration_windows(_calibration(opts, opts.gptq_nsamples), tokenizer)
        gptq_tokens, tuning_tokens = gptq_windows.numel(), scale_tuning_config(opts).steps * gptq_windows.shape[1]
    for data in eval_texts(opts):
        check_data_path(data, "--eval-data")
    check_finite_weights(opts.model)
    on_cpu = resolve_device(opts.device).type == "cpu"
    streamed = describe_source(opts.model) == "hf" and bool(weight_shapes(opts.model))  # safetensors: spinquant.streaming
    eval_tokens = len(eval_texts(opts)) * opts.eval_windows * min(opts.seqlen, getattr(config, "max_position_embeddings", opts.seqlen))
    activations = activation_bytes(config.hidden_size, gptq_tokens, opts.gptq_objective == "float", on_cpu, tuning_tokens,
                                   eval_tokens)
    resources = check_resources(config, opts.resolved_out(), learn and on_cpu, pte and target.quantizes,
                                target.exporter == "float-rotated", streamed, activations)
    return config, resources


def resolve_recipe(opts: CalibrateOptions) -> CalibrateOptions:
    """Fill the options ``opts`` leaves unset (None) from its recipe (else the default recipe), refuse what contradicts a
    pinned recipe, and check the values no click choice has checked (recipe files, batch YAML, the Python API). In
    place; returns ``opts``. Nothing is read but the recipe files."""
    if opts.recipe == "default":
        opts.recipe = None  # the default recipe is what an unnamed run runs (and how runs made before recipes record it)
    check_recipe(opts.recipe, asdict(opts))
    for name, value in unset_values(opts.recipe, asdict(opts)).items():
        setattr(opts, name, value)
    opts.max_angle = opts.max_angle or None  # 0: no cap, recorded as None (Meta's plain step)
    if opts.rotations not in ("learned", "hadamard"):
        raise SpinQuantError(f"--rotations {opts.rotations}: choose learned (Cayley SGD from random Hadamard) or hadamard "
                             f"(the seeded random Hadamard, no learning)")
    if opts.gptq_objective not in ("float", "layer"):
        raise SpinQuantError(f"gptq_objective {opts.gptq_objective}: choose float or layer")
    check_damping("gptq_objective_damp", opts.gptq_objective_damp)  # before any learning; GPTQ's config checks it again
    scale_tuning_config(opts)  # its checks before anything is created
    if opts.steps < 0:
        raise SpinQuantError(f"--steps {opts.steps} must be >= 0 (0: no learning, random Hadamard rotations)")
    if opts.steps == 0 or opts.rotations == "hadamard":  # the no-learning route: one name for both spellings
        opts.rotations, opts.steps = "hadamard", 0
    return opts


def calibrate(opts: CalibrateOptions, learn: bool = True, rotations_from: Path | None = None) -> dict[str, Any]:
    """Learn R1/R2 -> GPTQ with range setting -> ExecuTorch checkpoint -> .pte -> verification -> report.

    With ``learn=False`` the rotations are copied from ``rotations_from`` (requantize) and no learning runs.
    Everything is checked before the run directory is claimed (spinquant.outputs); a run that fails before
    it has anything to resume from removes the directory it created.
    """

    target = get_target(opts.target)
    resolve_recipe(opts)
    learn = learn and opts.rotations == "learned"
    if opts.pte and not target.pte:
        raise SpinQuantError(f"target {target.name} has no .pte on this machine ({target.description}): pass --no-pte "
                             f"or an xnnpack target")
    pte = target.pte and opts.pte is not False
    opts.r4, r4_note = resolve_r4(opts.r4, load_config(opts.model).intermediate_size, target, pte)
    learn_cfg = LearnConfig(steps=opts.steps, batch_size=opts.batch_size, micro_batch=opts.micro_batch, lr=opts.lr,
                            group_size=target.scheme.group if target.scheme else 32, seed=opts.seed, r4=opts.r4 == "on",
                            max_angle=opts.max_angle)
    nsamples = (opts.nsamples or opts.steps * opts.batch_size) if learn else 0
    config, resources = _preflight(opts, target, pte, learn, learn_cfg, nsamples)
    if r4_note:
        _log(r4_note)
    run_opts = {**asdict(opts), "nsamples": nsamples, "model_identity": _model_identity(opts.model), "versions": versions(),
                "learned": learn}
    identity = {k: v for k, v in run_opts.items() if k not in RESUME_FREE and k not in ("versions", "model_identity")}
    if identity["r4"] == "on":
        del identity["r4"]  # named only when off: runs made before the option existed keep their identity
    if identity["recipe"] is None:
        del identity["recipe"]  # likewise named only when given
    if identity["gptq_objective"] == "layer":
        del identity["gptq_objective"]  # likewise named only when not plain GPTQ
    if opts.gptq_objective != "float" or opts.gptq_objective_damp == 0.01:
        del identity["gptq_objective_damp"]  # named only when it changes the fit: 0.01 was its value until 2026-11-29
    identity = {RECORD_NAMES.get(k, k): v for k, v in identity.items()}  # the names runs were first recorded under
    identity.update(RETIRED_KEYS)  # always these values now; named as runs made before their move record them
    if not identity["gptq_refit_scales"]:
        del identity["gptq_refit_scales"]  # named only when on: runs made before the option existed keep their identity
    if not identity["tune_scales_steps"]:
        del identity["tune_scales_steps"], identity["tune_scales_lr"]  # likewise named only when on
    if identity["max_angle"] is None:
        del identity["max_angle"]  # likewise named only when the step is capped
    identity["model"] = resolve_input(opts.model)
    identity["tokenizer"] = resolve_input(opts.tokenizer)
    identity["calib_data"] = resolve_input(opts.calib_data)
    if rotations_from is not None:
        identity["rotations_from"] = resolve_input(rotations_from)
    out = opts.resolved_out()
    inputs = {"--model": opts.model, "--tokenizer": opts.tokenizer, "--calib-data": opts.calib_data,
              **{f"--eval-data {data}": data for data in eval_texts(opts)},
              "--from": rotations_from.parent if rotations_from is not None else None}
    status = claim_output(out, "calibrate", identity, inputs, opts.overwrite)
    created = not out.exists()
    if status == "replace":
        clear_directory(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    run = Run(out, run_opts)
    if status != "same":  # a resume keeps the record of the run it continues
        record_owner(out, "calibrate", identity)
        _write_json(out / CONFIG_FILE, run_opts)
    try:
        _run_stages(run, opts, target, pte, learn, learn_cfg, nsamples, rotations_from, config, resources)
    except BaseException:
        if created and not _json(out / STAGES_FILE) and not (out / "learn_state.pt").exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing to resume from: leave no stub behind
        raise
    return _json(run.dir / "report.json")


def _run_stages(run: Run, opts: CalibrateOptions, target, pte: bool, learn: bool, learn_cfg, nsamples: int,
                rotations_from: Path | None, config, resources: str) -> None:
    learning = learn and rotations_from is None and not run.done("learn")
    if not learning:  # the learning route says it once its state is read: a refused state stays the one line shown
        _log(resources)
    if pte and run.done("export") and not (run.dir / "model.pte").is_file():
        _log("[spinquant] a .pte is asked for and this run has none: the export and report stages run again")
        for stage in ("export", "report"):
            run.unmark(stage)
    if rotations_from is not None:  # requantize: the rotations another run learned
        if not run.done("learn"):
            if scales_path(rotations_from).is_file():  # learned channel scales go with their rotations
                shutil.copy(scales_path(rotations_from), scales_path(run.dir / "R.bin"))
            shutil.copy(rotations_from, run.dir / "R.bin")
            run.mark("learn", 0.0)
    elif not learn:  # --rotations hadamard / --steps 0: the random Hadamard start itself, from the config alone
        if not run.done("learn"):
            _log("[spinquant] stage learn ...")
            t = time.perf_counter()
            with atomic_file(run.dir / "R.bin") as tmp:
                save_rbin(Rotations.random_hadamard_for(config, opts.seed), tmp)
            run.mark("learn", time.perf_counter() - t)
            _log(f"[spinquant] stage learn: no learning (--rotations hadamard): seeded random Hadamard R1/R2, seed {opts.seed}")
    elif run.done("learn"):
        _log(f"[spinquant] stage learn: done, skipped ({run.dir / 'R.bin'})")
    else:  # no "stage learn ..." line here: a refused learning state must stay the one line the user sees
        run.start_stage()
        t = time.perf_counter()
        learned = learn_rotations(opts.model, str(run.dir), learn_cfg, _calibration(opts, nsamples), device=opts.device,
                                  tokenizer_src=opts.tokenizer, claim=False)
        _log(resources)
        if learned.get("resumed_from"):
            _log(f"[spinquant] stage learn: resumed from step {learned['resumed_from']} of its saved state")
        run.mark("learn", time.perf_counter() - t)
    for stage in ("quantize", "export", "report"):
        if run.done(stage):
            _log(f"[spinquant] stage {stage}: done, skipped")
            continue
        t = time.perf_counter()
        run.start_stage()
        _log(f"[spinquant] stage {stage} ...")
        if stage == "quantize":
            _stage_quantize(run, opts, opts.model, run.dir / "R.bin")
        elif stage == "export" and target.exporter == "executorch":
            first_text = eval_texts(opts)[0]
            export_run(str(run.dir), pte=pte, verify_data=None if first_text == "wikitext2" else first_text,
                       claim=False, runtime=target.runtime or "xnnpack")
        elif stage == "report":
            _stage_report(run, opts, opts.model)
        run.mark(stage, time.perf_counter() - t)


def requantize(from_run: str, target: str, out: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Re-quantize a calibrate run's model for another target with its learned rotations (no learning)."""
    src = Path(from_run)
    cfg = _json(src / CONFIG_FILE)
    if not cfg or not (src / "R.bin").is_file():
        raise SpinQuantError(f"{src} is not a finished calibrate run (needs {CONFIG_FILE} and R.bin): run spinquant calibrate first")
    get_target(target)
    cfg = {RENAMED.get(k, k): v for k, v in cfg.items()}  # runs recorded before options were renamed
    if cfg.get("tune_norms"):
        raise SpinQuantError(f"{src} also tuned the RMSNorm weights (tune_norms), a research setting now in "
                             f"spinquant.experimental (docs/experimental.md): calibrate the model again for {target}")
    opts = CalibrateOptions(**{k: cfg[k] for k in CalibrateOptions.names() if k in cfg})
    opts.model = cfg.get("model_identity", opts.model)
    opts.target = target
    opts.out = out or str(src.parent / f"{src.name}-{target}")
    # --pte/--no-pte: given, else the original run's --no-pte, else whatever the new target allows
    opts.pte, opts.overwrite = (False if cfg.get("pte") is False else None), False
    for k, v in overrides.items():
        if v is not None:
            setattr(opts, k, v)
    return calibrate(opts, learn=False, rotations_from=(src / "R.bin").resolve())
