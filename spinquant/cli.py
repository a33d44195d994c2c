"""The ``spinquant`` command line (click). Each command is a thin shell over the stage functions."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import logging

import click

from spinquant.errors import SpinQuantError

# torchao (pulled in by transformers/executorch) warns on import about CUDA-only extensions it cannot
# load on a CPU machine, and torch about deprecated pytree registrations: noise for CLI users.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def friendly_errors(fn):
    """Turn SpinQuantError (bad input) into one line on stderr and exit status 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpinQuantError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spinquant")
def cli() -> None:
    """SpinQuant: learned rotations + GPTQ for Llama models, exported for ExecuTorch."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@cli.command()
@click.option("--model", "model_src", required=True, help="HF model directory, Meta checkpoint directory or hub id.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random Hadamard signs.")
@click.option("--r4/--no-r4", default=True, show_default=True, help="Fold R4 into down_proj and keep an online Hadamard before it.")
@friendly_errors
def rotate(model_src: str, out_dir: str, seed: int, r4: bool) -> None:
    """Fuse norms and apply random-Hadamard R1/R2 (and R4): a float model that computes the same function."""
    from spinquant.pipeline import rotate_model

    report = rotate_model(model_src, out_dir, seed=seed, r4=r4)
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


def main() -> None:
    cli(prog_name="spinquant")


if __name__ == "__main__":
    main()
