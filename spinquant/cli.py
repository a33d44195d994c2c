"""The ``spinquant`` command line (click). Each command is a thin shell over the stage functions."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import logging

# torchao (pulled in by transformers/executorch) warns on import about CUDA-only extensions it cannot load on a CPU
# machine, and torch about deprecated pytree registrations: noise for CLI users, silenced before the imports below
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import click  # noqa: E402
import yaml  # noqa: E402

from spinquant.batch import run_batch, write_summary  # noqa: E402
from spinquant.data import resolve_calibration  # noqa: E402
from spinquant.errors import SpinQuantError  # noqa: E402
from spinquant.formats import load_config  # noqa: E402
from spinquant.pipeline import evaluate_model, export_run, learn_rotations, quantize_to_run, rotate_model  # noqa: E402
from spinquant.quant.apply import WeightQuantConfig  # noqa: E402
from spinquant.quant.scale_tuning import ScaleTuningConfig  # noqa: E402
from spinquant.quant.scheme import QuantScheme  # noqa: E402
from spinquant.recipes import DEFAULTS  # noqa: E402
from spinquant.rotation import LearnConfig, main_learner  # noqa: E402
from spinquant.targets import DEFAULT_TARGET, TARGETS, get_target  # noqa: E402
from spinquant.workflow import CalibrateOptions, calibrate as run_calibrate, requantize as run_requantize, resolve_r4  # noqa: E402


# errors of the machine or file system, not of spinquant: one line naming the file, exit 2, no traceback
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                      errno.ENAMETOOLONG, errno.EFBIG}


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that cleanup (temp files, the exporter's process group) runs as on ^C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def environment_error(exc: BaseException) -> OSError | None:
    """The file-system error behind ``exc``: an OSError itself, or one that a library reports in its own exception
    type (safetensors: "... (os error 28)"; torch.save: "file write failed"). None for anything else (a bug)."""
    if isinstance(exc, OSError):
        return exc if exc.errno in ENVIRONMENT_ERRNOS else None
    text = str(exc)
    found = re.search(r"\(os error (\d+)\)", text)
    if found and int(found.group(1)) in ENVIRONMENT_ERRNOS:
        n = int(found.group(1))
        return OSError(n, os.strerror(n))
    if isinstance(exc, RuntimeError) and "file write failed" in text:  # torch's zip writer hides the errno
        return OSError(errno.EIO, "a file write failed (disk full?)")
    return None


def friendly_errors(fn):
    """Turn bad input (SpinQuantError) and file-system errors (disk full, read-only, no permission) into one line on
    stderr and exit status 2, no traceback; ^C / SIGTERM into one line and 130 / 143 after cleanup."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpinQuantError as exc:
            click.echo(f"error: {' '.join(str(exc).split())}", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - only file-system errors are turned into one line; the rest re-raised
            env = environment_error(exc)
            if env is None:
                raise
            where = f" ({env.filename})" if env.filename else ""
            click.echo(f"error: {env.strerror or env}{where}: nothing was half-written and earlier results are unharmed; "
                       f"free space or fix the permissions and re-run", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; finished stages are kept: re-run the same command to resume", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("error: terminated (SIGTERM); finished stages are kept: re-run the same command to resume", err=True)
            sys.exit(143)

    return wrapper


def overwrite_option(fn):
    return click.option("--overwrite", is_flag=True,
                        help="Replace an --out that holds something else (never an input). Without it such an --out is refused.")(fn)


R4_HELP = ("The online Hadamard R4 before down_proj. auto: on, unless ExecuTorch's runtime cannot compute it at the "
           "model's intermediate size (it takes powers of two): then off, said in one line.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spinquant")
def cli() -> None:
    """SpinQuant: learned rotations + GPTQ for Llama models, exported for ExecuTorch."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bars say what runs; weight loading is quick
    transformers.utils.logging.set_verbosity_error()  # load reports and deprecation notes are not for our users


def r4_option(fn):
    """``--r4 auto|on|off``, and ``--no-r4`` (hidden), the on/off flag's spelling kept for scripts: ``--r4 off``."""
    @functools.wraps(fn)
    def with_no_r4(*args: Any, no_r4: bool = False, **kwargs: Any) -> Any:
        if no_r4:
            if kwargs["r4"] == "on":
                raise click.UsageError("--no-r4 contradicts --r4 on")
            kwargs["r4"] = "off"
        return fn(*args, **kwargs)

    with_no_r4 = click.option("--no-r4", "no_r4", is_flag=True, hidden=True, help="The same as --r4 off.")(with_no_r4)
    return click.option("--r4", "r4", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                        help=R4_HELP)(with_no_r4)


def _r4_on(choice: str, model_src: str) -> tuple[bool, str | None]:
    """--r4 auto|on|off for the single-stage commands, as calibrate resolves it for the default target: (on, the line
    that says why auto chose off), the line printed once the command has run."""
    on, note = resolve_r4(choice, load_config(model_src).intermediate_size, get_target(DEFAULT_TARGET), pte=True)
    return on == "on", note


@cli.command()
@click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id.")
@click.option("--out", "out_dir", required=True, help="Output directory (new or empty; see --overwrite).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random Hadamard signs.")
@r4_option
@overwrite_option
@friendly_errors
def rotate(model_src: str, out_dir: str, seed: int, r4: str, overwrite: bool) -> None:
    """Fuse norms and apply random-Hadamard R1/R2 (and R4): a float model that computes the same function."""
    on, note = _r4_on(r4, model_src)
    report = rotate_model(model_src, out_dir, seed=seed, r4=on, overwrite=overwrite)
    if note:
        click.echo(note, err=True)
    click.echo(f"wrote {out_dir} (R.bin + HF model{' with online R4' if on else ''}); verified after reload: "
               f"max relative logit difference {report['max_rel_diff']:.2e}")


@cli.command("eval")
@click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id.")
@click.option("--data", default="wikitext2", show_default=True, help="'wikitext2' (hub test split) or a local text/jsonl/parquet file.")
@click.option("--seqlen", default=2048, show_default=True, help="Window length in tokens.")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--reference", "reference_src", default=None, help="Also report KL(reference || model) and top-1 agreement.")
@click.option("--tokenizer", "tokenizer_src", default=None, help="Tokenizer directory, if the model has none.")
@click.option("--text-field", default="text", show_default=True, help="Field of jsonl/parquet rows that holds the text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line of stdout.")
@friendly_errors
def eval_cmd(model_src: str, data: str, seqlen: int, max_windows: int | None, reference_src: str | None,
             tokenizer_src: str | None, text_field: str, as_json: bool) -> None:
    """WikiText-2 perplexity (and KL / top-1 agreement to a reference model)."""

    result = evaluate_model(model_src, data=data, seqlen=seqlen, max_windows=max_windows, reference_src=reference_src,
                            tokenizer_src=tokenizer_src, text_field=text_field, progress=not as_json)
    out = {"model": model_src, "data": data, **result.to_dict()}
    if as_json:
        click.echo(json.dumps(out))
        return
    rows = [("model", model_src), ("data", data), ("windows x seqlen", f"{result.windows} x {result.seqlen}"),
            ("tokens", str(result.tokens)), ("perplexity", f"{result.ppl:.4f}")]
    if result.kl is not None:
        rows += [("reference", str(reference_src)), ("KL(ref||model) nats/token", f"{result.kl:.3e}"),
                 ("top-1 agreement", f"{100 * result.top1:.2f}%")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def option_stack(options: list) -> Callable:
    """One decorator applying click ``options`` (decorators) in the order listed, as if stacked above a command."""

    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


def calibration_options(nsamples_default: int, windows_flag: str = "--nsamples", what: str = "Learning"):
    """--calib / --calib-data / NSAMPLES / --seqlen / --text-field, shared by the commands that calibrate; the windows
    are --nsamples (learning windows) or --gptq-nsamples (GPTQ's), one name per meaning in every command."""
    return option_stack([
        click.option("--calib", default="wikitext2", show_default=True, help="Calibration set: a bundled name or a YAML file (see calibration/README.md)."),
        click.option("--calib-data", default=None, help="Local calibration text (.txt/.raw/.jsonl/.parquet or a folder) or hub:NAME[:CONFIG[:SPLIT]]; replaces the set's source."),
        click.option(windows_flag, "nsamples", type=int, default=None,
                     help=f"{what} windows [default: the set's, else {nsamples_default}]."),
        click.option("--seqlen", type=int, default=None, help="Tokens per calibration window [default: the set's, else 2048]."),
        click.option("--text-field", default=None, help="Field of .jsonl/.parquet rows that holds the text [default: the set's, else text]; rows with 'messages' are chat."),
    ])


@cli.command()
@click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id.")
@click.option("--out", "out_dir", required=True, help="Run directory to write (new or empty; the same command and options re-make it).")
@click.option("--rotations", default="hadamard", show_default=True, help="none | hadamard (seeded random R1/R2) | PATH to an R.bin.")
@r4_option
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option("--w-bits", type=int, default=4, show_default=True, help="Block-linear weight bits (16 = float).")
@click.option("--group-size", type=int, default=32, show_default=True, help="Weight group size (32/64/128/256; 0 = per channel).")
@click.option("--a-bits", type=int, default=8, show_default=True, help="Per-token activation bits (4/8/16).")
@click.option("--kv-bits", type=int, default=16, show_default=True, help="KV-cache bits (4/8/16); <16 adds the online R3.")
@click.option("--clip/--no-clip", "clip_search", default=True, show_default=True, help="Range setting (weight clip search).")
@click.option("--gptq-objective", type=click.Choice(["layer", "float"]), default="layer", show_default=True,
              help="What GPTQ makes each linear reproduce on its quantized inputs: its own float output (layer), or the float "
                   "model's, so later layers absorb earlier layers' error (float; calibrate's default; docs/recipe.md).")
@click.option("--gptq-objective-damp", type=float, default=DEFAULTS["gptq_objective_damp"], show_default=True,
              help="With --gptq-objective float: ridge damping of its least-squares fit, a fraction of the mean Hessian diagonal.")
@click.option("--gptq-refit-scales/--no-gptq-refit-scales", default=False, show_default=True,
              help="After GPTQ, refit each row's group scales to its integers by least squares (the integers stay).")
@click.option("--tune-scales-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="After GPTQ, tune every quantized linear's scales end to end on KL to the float model, one calibration "
                   "window per step (integers fixed). 0: off.")
@click.option("--tune-scales-lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["tune_scales_lr"],
              show_default=True, help="Adam learning rate of the scale tuning, on the log-scales.")
@calibration_options(128, "--gptq-nsamples", "GPTQ calibration")
@click.option("--seed", default=0, show_default=True, help="Seed of rotations and calibration sampling.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--tokenizer", "tokenizer_src", default=None, help="Tokenizer directory, if the model has none.")
@overwrite_option
@friendly_errors
def quantize(model_src, out_dir, rotations, r4, method, w_bits, group_size, a_bits, kv_bits, clip_search, gptq_objective,
             gptq_objective_damp, gptq_refit_scales, tune_scales_steps, tune_scales_lr, calib, calib_data,
             nsamples, seqlen, text_field, seed, device, tokenizer_src, overwrite) -> None:
    """Rotate, then quantize with GPTQ or RTN (+ range setting) into a run directory that eval and export read."""
    scheme = QuantScheme(w_bits=w_bits, group_size=group_size, a_bits=a_bits, kv_bits=kv_bits)
    wq = WeightQuantConfig(method=method, clip_search=clip_search, float_target=gptq_objective == "float",
                           target_percdamp=gptq_objective_damp, scale_refit=gptq_refit_scales)
    tuning = ScaleTuningConfig(steps=tune_scales_steps, lr=tune_scales_lr)
    on, note = _r4_on(r4, model_src) if rotations != "none" else (False, None)
    calib_set = (resolve_calibration(calib, calib_data, nsamples, seqlen, seed, 128, text_field)
                 if method == "gptq" or tuning.steps else None)
    cfg = quantize_to_run(model_src, out_dir, scheme, wq, rotations=rotations, calib=calib_set, seed=seed,
                          device=device, tokenizer_src=tokenizer_src, overwrite=overwrite, r4=on, tuning=tuning)
    click.echo(f"wrote {out_dir}: {scheme.describe()} {method}{'+clip' if clip_search else ''}, rotations {rotations}"
               f"{'' if on or rotations == 'none' else ' without R4'}, "
               f"quantized in {cfg['times_s']['quantize']:.1f} s; verified after reload")
    if note:
        click.echo(note, err=True)
    if cfg.get("warning"):
        click.echo(f"warning: {cfg['warning']}", err=True)


@cli.command("export")
@click.option("--from", "run_dir", required=True, help="Run directory written by spinquant quantize.")
@click.option("--out", "out_dir", default=None, help="Where to write (default: the run directory).")
@click.option("--pte/--no-pte", default=True, show_default=True, help="Also build model.pte with executorch's export_llama and verify it.")
@click.option("--verify-data", default=None, help="Text to verify the .pte on (default: the run's calibration text, else WikiText-2).")
@click.option("--verify-windows", default=4, show_default=True, help="Windows of text the .pte and our model are compared on.")
@click.option("--verify-seqlen", default=512, show_default=True, help="Tokens per verification window.")
@click.option("--max-seq-len", default=2048, show_default=True, help="The .pte's maximum sequence length.")
@click.option("--full-logits", is_flag=True, help="Export a .pte that returns logits for every position (for evaluation).")
@click.option("--max-kl-ratio", default=0.2, show_default=True,
              help="Verification: largest KL(ours||pte) as a fraction of KL(float||ours) (its margins: benchmarks/RESULTS.md).")
@click.option("--max-kl", default=1e-3, show_default=True, help="Verification: largest KL(ours||pte) in nats/token when the float model is not at hand.")
@click.option("--max-ppl-diff", default=0.01, show_default=True, help="Verification: largest relative perplexity difference.")
@click.option("--min-top1", default=0.0, show_default=True, help="Verification: least top-1 agreement (reported; near-tied logits flip, so 0 by default).")
@overwrite_option
@friendly_errors
def export_cmd(run_dir, out_dir, pte, verify_data, verify_windows, verify_seqlen, max_seq_len, full_logits, max_kl_ratio, max_kl,
               max_ppl_diff, min_top1, overwrite) -> None:
    """ExecuTorch checkpoint (consolidated.00.pth + params.json) and a verified model.pte."""

    r = export_run(run_dir, out_dir, pte=pte, verify_data=verify_data, verify_windows=verify_windows,
                   verify_seqlen=verify_seqlen, max_seq_len=max_seq_len, full_logits=full_logits, max_kl_ratio=max_kl_ratio,
                   max_kl=max_kl, max_ppl_rel=max_ppl_diff, min_top1=min_top1, overwrite=overwrite)
    click.echo(f"wrote {r['checkpoint']} and {r['params']} (preq_mode {r['preq_mode']}, group {r['group_size']}, "
               f"spin_quant {'native' if r['spin_quant'] else 'off'})")
    if r.get("warning"):
        click.echo(f"warning: {r['warning']}", err=True)
    if r.get("pte_skipped"):
        click.echo(r["pte_skipped"])
    elif pte:
        v = r["verification"]
        click.echo(f"wrote {r['pte']} ({r['pte_bytes'] / 2**20:.1f} MiB) in {r['export']['seconds']:.0f} s; verified on "
                   f"{v['windows']} x {v['seqlen']} tokens of {v['data']}: KL(ours||pte) {v['kl_ours_to_pte']:.2e} nats/token "
                   f"(bound {v['kl_bound']:.2e}), top-1 agreement {100 * v['top1_agreement']:.2f}%, "
                   f"perplexity {v['ppl_pte']:.3f} (.pte) vs {v['ppl_ours']:.3f} (ours), max relative logit difference "
                   f"{v['max_rel_logit_diff']:.2e}")


MAX_ANGLE_HELP = ("Cap, in radians, on how far one Cayley step may turn any vector (scaled by the cosine schedule); steps "
                  "that would turn further are shortened, keeping their direction (for models with massive activations).")


LEARN_OPTIONS = [
    click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id."),
    click.option("--out", "out_dir", required=True, help="Directory for R.bin, losses and the learning state (a re-run with the same options resumes)."),
    calibration_options(800),
    click.option("--steps", default=100, show_default=True, help="Cayley SGD steps."),
    click.option("--batch-size", default=8, show_default=True, help="Windows per step (the effective batch across all ranks)."),
    click.option("--micro-batch", default=1, show_default=True, help="Windows per forward (gradient accumulation up to --batch-size)."),
    click.option("--lr", default=1.5, show_default=True, help="Cayley SGD learning rate (cosine decay to 0)."),
    click.option("--max-angle", type=float, default=DEFAULTS["max_angle"], show_default=True,
                 help=MAX_ANGLE_HELP + " The default recipe's cap, as in calibrate; 0: no cap (Meta's plain step)."),
    click.option("--a-bits", default=8, show_default=True, help="Per-token activation bits while learning (4/8/16)."),
    click.option("--kv-bits", default=16, show_default=True, help="KV-cache bits while learning (4/8/16)."),
    click.option("--seed", default=0, show_default=True, help="Seed of the random Hadamard start and the calibration windows."),
    click.option("--save-every", default=10, show_default=True, help="Save the learning state every N steps (resume point)."),
    r4_option,
    click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]."),
    click.option("--tokenizer", "tokenizer_src", default=None, help="Tokenizer directory, if the model has none."),
    overwrite_option,
]


learn_options = option_stack(LEARN_OPTIONS)  # spinquant.experimental's learn-rotations adds its own to them


def run_learn_rotations(model_src: str, out_dir: str, calib: str, calib_data: str | None, nsamples: int | None,
                        seqlen: int | None, text_field: str | None, r4: str, device: str, tokenizer_src: str | None,
                        overwrite: bool, max_angle: float, learner_factory=main_learner, **learn: Any) -> None:
    """learn-rotations' body: ``learn`` holds the LearnConfig fields given (experimental: its research options too)."""
    r4_on, note = _r4_on(r4, model_src)
    cfg = LearnConfig(r4=r4_on, max_angle=max_angle or None, **learn)
    calib_set = resolve_calibration(calib, calib_data, nsamples, seqlen, cfg.seed, cfg.steps * cfg.batch_size, text_field)
    s = learn_rotations(model_src, out_dir, cfg, calib_set, device=device, tokenizer_src=tokenizer_src, overwrite=overwrite,
                        learner_factory=learner_factory)
    if s.get("rank", 0) != 0:
        return
    if s.get("finished"):
        click.echo(f"wrote {out_dir}/R.bin{' + scales.safetensors' if cfg.scales else ''} after {s['steps']} steps (resumed "
                   f"from step {s['resumed_from']}); loss {s['losses'][0]:.4f} -> {s['losses'][-1]:.4f}; "
                   f"{s['steps_per_s']:.3f} steps/s, {s['tokens_per_s']:.0f} tokens/s")
    if s.get("held_out", {}).get("kept") == "start":
        click.echo(f"R.bin holds the random-Hadamard start (learning made the held-out loss worse); the learned rotations: "
                   f"{out_dir}/learned/R.bin")
    if note:
        click.echo(note, err=True)


@cli.command("learn-rotations")
@learn_options
@friendly_errors
def learn_rotations_cmd(**options: Any) -> None:
    """Learn R1/R2 (Cayley SGD on the Stiefel manifold) against the fake-quantized model's loss."""
    run_learn_rotations(**options)


def _target_help() -> str:
    return "Hardware target: " + ", ".join(TARGETS) + "."


def _set_values(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as calibrate options (values read as YAML: 0.05, true, layer, null)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SpinQuantError(f"--set {pair}: expected KEY=VALUE with KEY a recipe key, e.g. --set batch_size=4")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpinQuantError(f"--set {pair}: the value is not valid YAML ({str(exc).splitlines()[0]})") from exc
    return out


@cli.command()
@click.option("--model", required=True, help="Local model directory, Meta checkpoint directory or hub id.")
@click.option("--out", default=None, help="Run directory [default: runs/<model name>]; a re-run with the same options resumes it.")
@click.option("--target", default=None, help=_target_help() + f" [default: {DEFAULT_TARGET}]")
@click.option("--recipe", default=None, metavar="NAME|FILE",
              help="default, meta (Meta's published setting, pinned) or a YAML file of options; docs/recipe.md lists the keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set one recipe key, e.g. --set batch_size=4 --set device=cuda:1 (repeatable).")
@click.option("--calib-data", default=None, help="Calibration text (.txt/.raw/.jsonl/.parquet/folder) or hub:NAME [default: WikiText-2 train].")
@click.option("--eval-data", multiple=True, help="Evaluation text for the report, repeatable: one table per text "
              "[default: WikiText-2 test].")
@click.option("--rotations", type=click.Choice(["learned", "hadamard"]), default=None,
              help="learned (Cayley SGD from a random Hadamard start) or hadamard (that start, no learning: minutes on a CPU) [default: learned].")
@click.option("--steps", type=int, default=None, help="Rotation-learning steps [default: 100; 0 = --rotations hadamard].")
@click.option("--seqlen", type=int, default=None, help="Tokens per calibration window [default: 2048].")
@click.option("--gptq-nsamples", type=int, default=None, help="GPTQ calibration windows [default: 128].")
@click.option("--pte/--no-pte", default=None, help="Build and verify model.pte with executorch [default: when the target has one].")
@click.option("--seed", type=int, default=None, help="Seed of the random Hadamard start and the calibration windows [default: 0].")
@overwrite_option
@friendly_errors
def calibrate(model, recipe, overrides, overwrite, **given) -> None:
    """The whole pipeline: learn R1/R2 -> GPTQ + range setting -> ExecuTorch checkpoint -> .pte -> verification -> report."""
    given = {k: v for k, v in given.items() if v is not None and v != ()}
    if "eval_data" in given:  # --eval-data repeated: a list; once: the text itself, as runs have always recorded it
        given["eval_data"] = given["eval_data"][0] if len(given["eval_data"]) == 1 else list(given["eval_data"])
    extra = _set_values(overrides)
    if "model" in extra:
        raise SpinQuantError("--set model=...: pass --model")
    opts = CalibrateOptions.build(model, recipe, **{**extra, **given, "overwrite": overwrite})
    report = run_calibrate(opts)
    _print_run_summary(opts.resolved_out(), report)


def _print_run_summary(out: Path, report: dict[str, Any]) -> None:
    ev = report.get("evaluation") or {}
    msg = f"done: {out} (report: {out / 'report.md'})"
    evs = report.get("evaluations") or [ev]
    for e in evs:
        if e.get("quantized"):
            q, on = e["quantized"], f" on {Path(str(e['data'])).name}" if len(evs) > 1 else ""
            msg += (f"; perplexity{on} {e['float']['ppl']:.3f} (float) -> {q['ppl']:.3f}, KL {q['kl']:.4f}, "
                    f"top-1 {100 * q['top1']:.2f}%")
    v = (report.get("export") or {}).get("verification")
    if v:
        msg += f"; .pte verified (KL(ours||pte) {v['kl_ours_to_pte']:.1e}, top-1 agreement {100 * v['top1_agreement']:.2f}%)"
    click.echo(msg)


@cli.command()
@click.option("--from", "run_dir", required=True, help="A finished calibrate run directory.")
@click.option("--target", required=True, help=_target_help())
@click.option("--out", default=None, help="Directory for the new target [default: RUN-TARGET beside it].")
@click.option("--pte/--no-pte", default=None, help="Build and verify model.pte [default: when the target has one].")
@click.option("--device", default=None, help="auto | cpu | cuda[:N] [default: as the original run].")
@overwrite_option
@friendly_errors
def requantize(run_dir, target, out, pte, device, overwrite) -> None:
    """Quantize for another target re-using the learned rotations (no learning), exported and verified."""
    report = run_requantize(run_dir, target, out, pte=pte, device=device, overwrite=overwrite)
    _print_run_summary(Path(out) if out else Path(run_dir).parent / f"{Path(run_dir).name}-{target}", report)


@cli.command()
@click.argument("jobs_file", required=False)
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the jobs as Ray tasks: ADDRESS is auto, host:port or ray://host:port of an existing cluster; "
                   "--ray alone starts a local Ray instance. Needs pip install \"spinquant[ray]\" on every node.")
@click.option("--cpus-per-job", default=2, show_default=True, help="With --ray: CPUs a CPU job asks for (a CUDA job asks for one GPU).")
@friendly_errors
def batch(jobs_file: str | None, ray_address: str | None, cpus_per_job: int) -> None:
    """Calibrate many models from a YAML file; continue past failures; skip finished jobs; summary table.

    \b
    JOBS_FILE format (any recipe key of calibrate, docs/recipe.md):
      defaults:                      # applied to every job
        calib_data: data/chats.jsonl
        gptq_nsamples: 128
        pte: false
        out_root: /mnt/shared/runs   # optional: where outs go
      jobs:
        - {model: ft/customer-a, out: customer-a}
        - {model: ft/customer-b, target: xnnpack-8da4w-g64}
        - {models_glob: "ft/nightly-*", out: "{name}"}
    \b
    Relative paths resolve against the YAML file's folder, except out:,
    which resolves against out_root when set; a job without out: writes
    out_root/<model name> (else runs/<model name> beside the YAML). Values
    are checked against each option's type before any job runs.
    \b
    With --ray, every path written relative must resolve inside shared
    storage: out_root, or shared_root: when inputs live outside it.
    Each job's log goes to <out>.log. One line per job state change.
    \b
    Writes JOBS.summary.md and JOBS.summary.json beside the file;
    exit 1 if a job failed.
    """

    if jobs_file is None and ray_address and ray_address.endswith((".yaml", ".yml")):
        jobs_file, ray_address = ray_address, "local"  # `batch --ray JOBS.yaml`: the file is not an address
    if jobs_file is None:
        raise click.UsageError("Missing argument 'JOBS_FILE'.")
    rows = run_batch(jobs_file, ray_address=ray_address, cpus_per_job=cpus_per_job)
    table = write_summary(jobs_file, rows)
    click.echo(table)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        click.echo(f"error: {len(failed)} of {len(rows)} jobs failed: {', '.join(r['model'] for r in failed)}", err=True)
        sys.exit(1)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    if not sys.warnoptions:  # library warnings (torch, transformers, executorch) are not for our users; -W shows them
        warnings.simplefilter("ignore")
    try:
        code = cli.main(prog_name="spinquant", standalone_mode=False)
    except click.UsageError as exc:  # click's own: bad flag or value; one line like ours, with where to look
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `spinquant`: the help, not an error
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(0)
        where = f"spinquant {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx.parent is not None else "spinquant --help"
        click.echo(f"error: {' '.join(exc.format_message().split())} (see {where})", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
