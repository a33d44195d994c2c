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
from typing import Any

import logging

import click

from spinquant.errors import SpinQuantError
from spinquant.quant.scheme import DEFAULT_TUNE_LR, DEFAULT_TUNE_STEPS, FLOAT_TARGET_PERCDAMP

# torchao (pulled in by transformers/executorch) warns on import about CUDA-only extensions it cannot
# load on a CPU machine, and torch about deprecated pytree registrations: noise for CLI users.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


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


GPTQ_CLIP_HELP = ("Range setting inside GPTQ: each group's clip ratio minimises the weights' error with every input column "
                  "counted equally (plain) or by GPTQ's own cost of an error there, 1 / [H^-1]_jj (weighted; no extra time; "
                  "SmolLM2 8da4w KL 0.91x with plain GPTQ, 0.99x with --gptq-target float, +2% on the 25M model: "
                  "benchmarks/results/gptq_weighted_clip.md).")

GPTQ_REFIT_HELP = ("After GPTQ, refit each row's group scales to its integers by least squares on the calibration inputs "
                   "(the integers stay; seconds per model; quant/scale_refit.py; README Results).")

TUNE_STEPS_HELP = ("After GPTQ, tune every quantized linear's scales end to end (integers fixed) on KL to the float model, "
                   "one calibration window per step, windows other than GPTQ's (quant/scale_tuning.py; SmolLM2 8da4w: KL "
                   "-5%, about 12 s/step on 2 CPU cores at 1024 tokens; README Results). 0: off.")
TUNE_LR_HELP = "Adam learning rate of the scale tuning, on the log-scales (a relative change per step)."
TUNE_NORMS_HELP = ("The scale tuning also tunes the RMSNorm weights (per channel, in the rotated basis; the checkpoint carries "
                   "them): SmolLM2 W4A4KV4 KL -5.8% more, 8da4w no gain (benchmarks/results/scale_tuning.md).")

GPTQ_TARGET_DAMP_HELP = ("With --gptq-target float: ridge damping of its least-squares fit to the float model, as a fraction "
                         "of the mean Hessian diagonal; larger pulls the fit towards the layer's own weights, infinity = --gptq-target "
                         "layer (SmolLM2 8da4w: 0.1 gives 0.82x the KL of 0.01 over three Hadamard seeds: "
                         "benchmarks/results/gptq_float_target_damping.md).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spinquant")
def cli() -> None:
    """SpinQuant: learned rotations + GPTQ for Llama models, exported for ExecuTorch."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bars say what runs; weight loading is quick
    transformers.utils.logging.set_verbosity_error()  # load reports and deprecation notes are not for our users


@cli.command()
@click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id.")
@click.option("--out", "out_dir", required=True, help="Output directory (new or empty; see --overwrite).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random Hadamard signs.")
@click.option("--r4/--no-r4", default=True, show_default=True, help="Fold R4 into down_proj and keep an online Hadamard before it.")
@overwrite_option
@friendly_errors
def rotate(model_src: str, out_dir: str, seed: int, r4: bool, overwrite: bool) -> None:
    """Fuse norms and apply random-Hadamard R1/R2 (and R4): a float model that computes the same function."""
    from spinquant.pipeline import rotate_model

    report = rotate_model(model_src, out_dir, seed=seed, r4=r4, overwrite=overwrite)
    click.echo(
        f"wrote {out_dir} (R.bin + HF model{' with online R4' if r4 else ''}); verified after reload: "
        f"max relative logit difference {report['max_rel_diff']:.2e}"
    )


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
    from spinquant.pipeline import evaluate_model

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


def calibration_options(nsamples_default: int):
    """--calib / --calib-data / --nsamples / --seqlen, shared by the commands that calibrate."""

    def deco(fn):
        for opt in reversed([
            click.option("--calib", default="wikitext2", show_default=True, help="Calibration set: a bundled name or a YAML file (see calibration/README.md)."),
            click.option("--calib-data", default=None, help="Local calibration text (.txt/.raw/.jsonl/.parquet or a folder) or hub:NAME[:CONFIG[:SPLIT]]; replaces the set's source."),
            click.option("--nsamples", type=int, default=None, help=f"Calibration windows [default: the set's, else {nsamples_default}]."),
            click.option("--seqlen", type=int, default=None, help="Tokens per calibration window [default: the set's, else 2048]."),
            click.option("--text-field", default=None, help="Field of .jsonl/.parquet rows that holds the text [default: the set's, else text]; rows with 'messages' are chat."),
        ]):
            fn = opt(fn)
        return fn

    return deco


@cli.command()
@click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id.")
@click.option("--out", "out_dir", required=True, help="Run directory to write (new or empty; the same command and options re-make it).")
@click.option("--rotations", default="hadamard", show_default=True, help="none | hadamard (seeded random R1/R2 + R4) | PATH to an R.bin.")
@click.option("--r4/--no-r4", default=True, show_default=True, help="With rotations: fold R4 into down_proj and keep the "
              "online Hadamard before it (ExecuTorch runs it for power-of-two intermediate sizes only).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option("--w-bits", type=int, default=4, show_default=True, help="Block-linear weight bits (16 = float).")
@click.option("--group-size", type=int, default=32, show_default=True, help="Weight group size (32/64/128/256; 0 = per channel).")
@click.option("--a-bits", type=int, default=8, show_default=True, help="Per-token activation bits (4/8/16).")
@click.option("--a-sym", is_flag=True, help="Symmetric activation quantization (default asymmetric, as ExecuTorch).")
@click.option("--a-clip", default=1.0, show_default=True, help="Activation clip ratio (range setting for activations; 1 = none, as ExecuTorch runs).")
@click.option("--kv-bits", type=int, default=16, show_default=True, help="KV-cache bits (4/8/16); <16 adds the online R3.")
@click.option("--clip/--no-clip", "clip_search", default=True, show_default=True, help="Range setting (weight clip search).")
@click.option("--act-order", is_flag=True, help="GPTQ act-order with static groups.")
@click.option("--percdamp", type=float, default=0.01, show_default=True, help="GPTQ Hessian damping.")
@click.option("--gptq-target", type=click.Choice(["layer", "float"]), default="layer", show_default=True,
              help="What GPTQ makes each linear reproduce on its quantized inputs: its own float weight's output (layer), "
                   "or the float model's output, so later layers also absorb the earlier layers' error (float; GPTAQ; "
                   "calibrate's default; 2.2x the GPTQ time; better on Hadamard rotations at 8da4w, W4A4KV4 and W4A16, "
                   "but much worse with learned channel scales at W4A4KV4: README Results).")
@click.option("--gptq-clip", type=click.Choice(["plain", "weighted"]), default="plain", show_default=True,
              help=GPTQ_CLIP_HELP)
@click.option("--gptq-target-damp", type=float, default=FLOAT_TARGET_PERCDAMP, show_default=True,
              help=GPTQ_TARGET_DAMP_HELP)
@click.option("--gptq-refit-scales/--no-gptq-refit-scales", default=False, show_default=True, help=GPTQ_REFIT_HELP)
@click.option("--tune-scales-steps", type=click.IntRange(min=0), default=0, show_default=True, help=TUNE_STEPS_HELP)
@click.option("--tune-scales-lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TUNE_LR, show_default=True,
              help=TUNE_LR_HELP)
@click.option("--tune-norms", is_flag=True, help=TUNE_NORMS_HELP)
@calibration_options(128)
@click.option("--seed", default=0, show_default=True, help="Seed of rotations and calibration sampling.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--tokenizer", "tokenizer_src", default=None, help="Tokenizer directory, if the model has none.")
@overwrite_option
@friendly_errors
def quantize(model_src, out_dir, rotations, r4, method, w_bits, group_size, a_bits, a_sym, a_clip, kv_bits, clip_search, act_order,
             percdamp, gptq_target, gptq_clip, gptq_target_damp, gptq_refit_scales, tune_scales_steps, tune_scales_lr, tune_norms, calib,
             calib_data, nsamples, seqlen, text_field, seed, device, tokenizer_src, overwrite) -> None:
    """Rotate, then quantize with GPTQ or RTN (+ range setting) into a run directory that eval reads."""
    from spinquant.pipeline import quantize_to_run
    from spinquant.quant.apply import WeightQuantConfig
    from spinquant.quant.scheme import QuantScheme

    scheme = QuantScheme(w_bits=w_bits, group_size=group_size, a_bits=a_bits, a_symmetric=a_sym, a_clip=a_clip, kv_bits=kv_bits)
    wq = WeightQuantConfig(method=method, clip_search=clip_search, percdamp=percdamp, act_order=act_order,
                           float_target=gptq_target == "float", weighted_clip=gptq_clip == "weighted",
                           target_percdamp=gptq_target_damp, scale_refit=gptq_refit_scales)
    from spinquant.data import resolve_calibration

    from spinquant.quant.scale_tuning import ScaleTuningConfig

    tuning = ScaleTuningConfig(steps=tune_scales_steps, lr=tune_scales_lr, norms=tune_norms)
    calib_set = (resolve_calibration(calib, calib_data, nsamples, seqlen, seed, 128, text_field)
                 if method == "gptq" or tuning.steps else None)
    cfg = quantize_to_run(model_src, out_dir, scheme, wq, rotations=rotations, calib=calib_set, seed=seed,
                          device=device, tokenizer_src=tokenizer_src, overwrite=overwrite, r4=r4, tuning=tuning)
    click.echo(f"wrote {out_dir}: {scheme.describe()} {method}{'+clip' if clip_search else ''}, rotations {rotations}"
               f"{'' if r4 or rotations == 'none' else ' without R4'}, "
               f"quantized in {cfg['times_s']['quantize']:.1f} s; verified after reload")
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
              help="Verification: largest KL(ours||pte) as a fraction of KL(float||ours) (benchmarks/results/verification_margins.md).")
@click.option("--max-kl", default=1e-3, show_default=True, help="Verification: largest KL(ours||pte) in nats/token when the float model is not at hand.")
@click.option("--max-ppl-diff", default=0.01, show_default=True, help="Verification: largest relative perplexity difference.")
@click.option("--min-top1", default=0.0, show_default=True, help="Verification: least top-1 agreement (reported; near-tied logits flip, so 0 by default).")
@overwrite_option
@friendly_errors
def export_cmd(run_dir, out_dir, pte, verify_data, verify_windows, verify_seqlen, max_seq_len, full_logits, max_kl_ratio, max_kl,
               max_ppl_diff, min_top1, overwrite) -> None:
    """ExecuTorch checkpoint (consolidated.00.pth + params.json) and a verified model.pte."""
    from spinquant.pipeline import export_run

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
                  "that would turn further are shortened, keeping their direction. For real models with massive "
                  "activations, whose gradients ask for turns of ~2 rad at lr 1.5 and throw a plain step off.")


@cli.command("learn-rotations")
@click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id.")
@click.option("--out", "out_dir", required=True, help="Directory for R.bin, losses and the learning state (a re-run with the same options resumes).")
@calibration_options(800)
@click.option("--steps", default=100, show_default=True, help="Cayley SGD steps.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per step (the effective batch across all ranks).")
@click.option("--micro-batch", default=1, show_default=True, help="Windows per forward (gradient accumulation up to --batch-size).")
@click.option("--lr", default=1.5, show_default=True, help="Cayley SGD learning rate (cosine decay to 0).")
@click.option("--momentum", default=0.0, show_default=True, help="Cayley SGD momentum.")
@click.option("--max-angle", type=float, default=None, help=MAX_ANGLE_HELP + " [default: no cap, Meta's plain step].")
@click.option("--scales/--no-scales", default=False, show_default=True, help="Also learn per-channel scales jointly with R1/R2 "
              "(norm -> q/k/v and gate/up, v -> o per head channel, up -> down), fused into the norm weights and linears "
              "the checkpoint already has; written as scales.safetensors beside R.bin. Learn them against int4 weights "
              "(--w-bits 4): with float weights the loss sees no cost of moving difficulty into the weights.")
@click.option("--scale-lr", default=0.01, show_default=True, help="Adam learning rate of the log-scales (cosine decay).")
@click.option("--scale-init", type=float, default=None, help="With --scales: start from SmoothQuant's scales of this alpha "
              "(0.5: activation and weight ranges met halfway), measured on the first 8 learning windows [default: 1].")
@click.option("--w-bits", default=16, show_default=True, help="Weight bits while learning (16: Meta's recipe; 4: learn against RTN weights).")
@click.option("--group-size", default=32, show_default=True, help="Weight group size when --w-bits < 16.")
@click.option("--a-bits", default=8, show_default=True, help="Per-token activation bits while learning (4/8/16).")
@click.option("--kv-bits", default=16, show_default=True, help="KV-cache bits while learning (4/8/16).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random Hadamard start and the calibration windows.")
@click.option("--loss", type=click.Choice(["ce", "kl"]), default="ce", show_default=True,
              help="ce: cross-entropy on the text (Meta's); kl: KL divergence to the float model's predictions.")
@click.option("--weight-quant", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="With --w-bits < 16: the int4 weights the loss sees: round-to-nearest, or GPTQ of the current rotation "
                   "(every step; the final quantizer's weights).")
@click.option("--save-every", default=10, show_default=True, help="Save the learning state every N steps (resume point).")
@click.option("--r4/--no-r4", default=True, show_default=True, help="Learn with R4 folded into down_proj and the online "
              "Hadamard before it (quantize the result with the same choice).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--tokenizer", "tokenizer_src", default=None, help="Tokenizer directory, if the model has none.")
@overwrite_option
@friendly_errors
def learn_rotations_cmd(model_src, out_dir, calib, calib_data, nsamples, seqlen, text_field, steps, batch_size, micro_batch, lr,
                        momentum, max_angle, scales, scale_lr, scale_init, w_bits, group_size, a_bits, kv_bits, seed, loss, weight_quant,
                        save_every, r4, device, tokenizer_src, overwrite) -> None:
    """Learn R1/R2 (Cayley SGD on the Stiefel manifold) against the fake-quantized model's loss."""
    from spinquant.pipeline import learn_rotations
    from spinquant.rotation import LearnConfig

    cfg = LearnConfig(steps=steps, batch_size=batch_size, micro_batch=micro_batch, lr=lr, momentum=momentum, w_bits=w_bits,
                      group_size=group_size, a_bits=a_bits, kv_bits=kv_bits, seed=seed, loss=loss, weight_quant=weight_quant,
                      save_every=save_every, r4=r4, max_angle=max_angle, scales=scales, scale_lr=scale_lr,
                      scale_init=scale_init)
    from spinquant.data import resolve_calibration

    calib_set = resolve_calibration(calib, calib_data, nsamples, seqlen, seed, steps * batch_size, text_field)
    s = learn_rotations(model_src, out_dir, cfg, calib_set, device=device, tokenizer_src=tokenizer_src, overwrite=overwrite)
    if s.get("finished") and s.get("rank", 0) == 0:
        click.echo(f"wrote {out_dir}/R.bin{' + scales.safetensors' if scales else ''} after {s['steps']} steps (resumed from step {s['resumed_from']}); loss "
                   f"{s['losses'][0]:.4f} -> {s['losses'][-1]:.4f}; {s['steps_per_s']:.3f} steps/s, {s['tokens_per_s']:.0f} tokens/s")


def _target_help() -> str:
    from spinquant.targets import TARGETS

    return "Hardware target: " + ", ".join(TARGETS) + "."


@cli.command()
@click.option("--model", required=True, help="Local model directory, Meta checkpoint directory or hub id.")
@click.option("--out", default=None, help="Run directory [default: runs/<model name>]; a re-run with the same options resumes it.")
@click.option("--calib", default="wikitext2", show_default=True, help="Calibration set: bundled name or YAML.")
@click.option("--calib-data", default=None, help="Local calibration text (.txt/.raw/.jsonl/.parquet/folder) or hub:NAME.")
@click.option("--text-field", default=None, help="Field of .jsonl/.parquet rows that holds the text [default: text]; rows with 'messages' are chat.")
@click.option("--target", default="xnnpack-8da4w-g32", show_default=True, help=_target_help())
@click.option("--rotations", type=click.Choice(["learned", "hadamard"]), default="learned", show_default=True,
              help="learned: R1/R2 learned by Cayley SGD from a random Hadamard start; hadamard: that seeded random Hadamard "
                   "itself, no learning (minutes on a CPU; the route for machines without a GPU).")
@click.option("--recipe", type=click.Choice(["meta"]), default=None,
              help="A named learning recipe, its options pinned (others given with it must agree). meta: Meta's published "
                   "Llama 3.2 SpinQuant settings, W16A8KV16, cross-entropy, lr 1.5, 100 steps x 8 x 2048 tokens, GPTQ on "
                   "128 x 2048, R4 (the defaults today; see README 'Choosing the recipe').")
@click.option("--steps", default=100, show_default=True, help="Rotation-learning steps (0: no learning, as --rotations hadamard).")
@click.option("--nsamples", type=int, default=None, help="Rotation-learning windows [default: steps x batch size = 800].")
@click.option("--seqlen", default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per learning step.")
@click.option("--micro-batch", default=1, show_default=True, help="Windows per forward pass (gradient accumulation up to --batch-size; raise it on a large GPU).")
@click.option("--lr", default=1.5, show_default=True, help="Cayley SGD learning rate (cosine decay to 0).")
@click.option("--max-angle", type=float, default=None, help=MAX_ANGLE_HELP + " 0: no cap [default: 0.05; 0 with --recipe meta].")
@click.option("--learn-w-bits", default=16, show_default=True, help="Weight bits while learning (16 = Meta's recipe).")
@click.option("--learn-loss", type=click.Choice(["ce", "kl"]), default="ce", show_default=True,
              help="Learning objective: ce = cross-entropy on the text (Meta's), kl = KL divergence to the float model.")
@click.option("--learn-weight-quant", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="With --learn-w-bits 4: int4 weights in the loop by round-to-nearest or by GPTQ of the current rotation.")
@click.option("--gptq-nsamples", default=128, show_default=True, help="Calibration windows for GPTQ (and range setting).")
@click.option("--gptq-target", type=click.Choice(["layer", "float"]), default=None,
              help="GPTQ fits each linear's own output (layer) or the float model's (float: later layers absorb earlier errors; "
                   "SmolLM2 8da4w KL 0.71x, 2.2x GPTQ time; see README Results) [default: float; layer with --recipe meta].")
@click.option("--gptq-clip", type=click.Choice(["plain", "weighted"]), default=None,
              help=GPTQ_CLIP_HELP + " [default: plain]")
@click.option("--gptq-target-damp", type=float, default=None,
              help=GPTQ_TARGET_DAMP_HELP + f" [default: {FLOAT_TARGET_PERCDAMP}]")
@click.option("--gptq-refit-scales/--no-gptq-refit-scales", default=None,
              help=GPTQ_REFIT_HELP + " [default: on; off with --recipe meta]")
@click.option("--tune-scales-steps", type=click.IntRange(min=0), default=None,
              help=TUNE_STEPS_HELP + f" [default: {DEFAULT_TUNE_STEPS}; 0 with --recipe meta]")
@click.option("--tune-scales-lr", type=click.FloatRange(min=0, min_open=True), default=None, help=TUNE_LR_HELP + f" [default: {DEFAULT_TUNE_LR}]")
@click.option("--tune-norms", is_flag=True, help=TUNE_NORMS_HELP + " Off by default: calibrate's targets have 8-bit activations.")
@click.option("--r4", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="The online Hadamard R4 before down_proj. auto: on, unless a .pte is made and ExecuTorch cannot run it "
                   "(intermediate size not a power of two, e.g. SmolLM2's 1536): then off, with a note.")
@click.option("--pte/--no-pte", default=None, help="Build and verify model.pte with executorch [default: when the target has one].")
@click.option("--eval-data", default="wikitext2", show_default=True, help="Evaluation text for the report (wikitext2 = hub test split, or a local file).")
@click.option("--eval-windows", default=20, show_default=True, help="Evaluation windows (of --seqlen tokens) for the report.")
@click.option("--compare-hadamard", is_flag=True, help="Also quantize with the random Hadamard start, for the report.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--seed", default=0, show_default=True, help="Seed of the random Hadamard start and of the calibration windows.")
@click.option("--tokenizer", default=None, help="Tokenizer directory, if the model has none.")
@overwrite_option
@friendly_errors
def calibrate(**kwargs) -> None:
    """The whole pipeline: learn R1/R2 -> GPTQ + range setting -> ExecuTorch checkpoint -> .pte -> verification -> report."""
    from spinquant.workflow import CalibrateOptions, calibrate as run_calibrate

    opts = CalibrateOptions(**kwargs)
    report = run_calibrate(opts)
    _print_run_summary(opts.resolved_out(), report)


def _print_run_summary(out: Path, report: dict[str, Any]) -> None:
    ev = report.get("evaluation") or {}
    msg = f"done: {out} (report: {out / 'report.md'})"
    if ev.get("quantized"):
        q = ev["quantized"]
        msg += f"; perplexity {ev['float']['ppl']:.3f} (float) -> {q['ppl']:.3f}, KL {q['kl']:.4f}, top-1 {100 * q['top1']:.2f}%"
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
    from spinquant.workflow import requantize as run_requantize

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
    JOBS_FILE format (any calibrate option, with underscores):
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
    from spinquant.batch import run_batch, write_summary

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
