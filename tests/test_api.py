"""The Python API (spinquant.api, reached as spinquant.calibrate/quantize/export): the same computation as the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import spinquant
from spinquant.cli import cli
from spinquant.errors import SpinQuantError
from spinquant.formats import load_model, load_tokenizer


def test_quantize_in_memory_then_export_equals_the_cli(tiny_model_dir, corpus_file, tmp_path):
    """spinquant.quantize + spinquant.export write the tensors `spinquant quantize` writes for the same options,
    bit for bit, and the exported run loads back to the in-memory model's logits."""
    cli_run = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(cli_run), "--calib-data",
                                 str(corpus_file), "--gptq-nsamples", "4", "--seqlen", "64", "--seed", "2"])
    assert r.exit_code == 0, r.output
    source = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    q = spinquant.quantize(source, tokenizer=load_tokenizer(tiny_model_dir), calib_data=str(corpus_file), gptq_nsamples=4,
                           seqlen=64, seed=2, gptq_objective="layer", gptq_refit_scales=False, tune_scales_steps=0)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())  # the model passed is not modified
    api_run = tmp_path / "api"
    result = spinquant.export(q, api_run, pte=False)  # the tokenizer quantize used goes with the model
    assert result["preq_mode"] == "8da4w_output_8da8w" and (api_run / "consolidated.00.pth").is_file()
    a, b = load_file(cli_run / "quantized.safetensors"), load_file(api_run / "quantized.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, q.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(api_run)(ids).logits, q(ids).logits)
    assert json.loads((api_run / "spinquant_output.json").read_text())["quantize"]["model"] == "in memory"
    assert (api_run / "tokenizer.json").is_file()
    # a second export into the same directory is refused; a float model cannot be exported
    with pytest.raises(SpinQuantError, match="holds"):
        spinquant.export(q, tmp_path / "cli", pte=False)
    with pytest.raises(SpinQuantError, match="not quantized"):
        spinquant.export(source, tmp_path / "float", pte=False)


def test_calibrate_from_python_is_the_cli_run(tiny_model_dir, corpus_file, tmp_path):
    """spinquant.calibrate(model, out, **recipe keys) makes the run `spinquant calibrate` makes with the same keys: the
    CLI then finds it finished (same identity) and skips every stage."""
    out = tmp_path / "run"
    keys = dict(calib_data=str(corpus_file), eval_data=str(corpus_file), rotations="hadamard", seqlen=64, gptq_nsamples=4,
                eval_windows=1, tune_scales_steps=2, pte=False)
    report = spinquant.calibrate(tiny_model_dir, out=out, **keys)
    assert report["evaluation"]["quantized"]["kl"] > 0
    before = (out / "stages.json").read_text()
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(out), "--calib-data",
                                 str(corpus_file), "--eval-data", str(corpus_file), "--rotations", "hadamard", "--seqlen",
                                 "64", "--gptq-nsamples", "4", "--set", "eval_windows=1", "--set", "tune_scales_steps=2",
                                 "--no-pte"])
    assert r.exit_code == 0 and "stage quantize: done, skipped" in r.output, r.output
    assert (out / "stages.json").read_text() == before
    with pytest.raises(SpinQuantError, match="unknown option 'step'"):
        spinquant.calibrate(tiny_model_dir, out=tmp_path / "o", step=3)
    assert not (tmp_path / "o").exists()
