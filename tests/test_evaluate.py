"""Perplexity by the GPTQ/QuaRot/SpinQuant protocol, KL/top-1 to a reference, and the eval CLI."""

import json
import math

import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaForCausalLM

from spinquant.cli import cli


def _eval_cli(*args):
    result = CliRunner().invoke(cli, ["eval", *args])
    return result


def _independent_ppl(model_dir, test_file, seqlen, max_windows):
    """Plain transformers + plain Python: the protocol written out a second time, sharing no spinquant code."""
    with open(test_file, encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 10**9
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0]
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = min(ids.numel() // seqlen, max_windows)
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen : (i + 1) * seqlen][None]
            losses.append(model(input_ids=w, labels=w).loss.item())
    return math.exp(sum(losses) / len(losses)), n


def test_cli_ppl_matches_independent_computation(ref_model_dir, wikitext_test_file):
    result = _eval_cli("--model", str(ref_model_dir), "--data", str(wikitext_test_file), "--seqlen", "1024",
                       "--max-windows", "12", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected, n = _independent_ppl(ref_model_dir, wikitext_test_file, 1024, 12)
    assert got["windows"] == n == 12 and got["seqlen"] == 1024 and got["tokens"] == 12 * 1023
    assert abs(got["ppl"] / expected - 1) < 1e-3, (got["ppl"], expected)


def test_reference_kl_and_top1(tiny_model_dir, corpus_file, tmp_path):
    same = _eval_cli("--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--data", str(corpus_file),
                     "--seqlen", "64", "--max-windows", "3", "--json")
    assert same.exit_code == 0, same.output
    r = json.loads(same.stdout.strip().splitlines()[-1])
    assert abs(r["kl"]) < 1e-6 and r["top1"] == 1.0
    # a perturbed model: KL > 0, and the table output names the measures
    m = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    m.save_pretrained(tmp_path / "perturbed")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "perturbed")
    diff = _eval_cli("--model", str(tmp_path / "perturbed"), "--reference", str(tiny_model_dir), "--data",
                     str(corpus_file), "--seqlen", "64", "--max-windows", "3")
    assert diff.exit_code == 0, diff.output
    assert "KL(ref||model)" in diff.output and "top-1 agreement" in diff.output
    kl = float(next(l for l in diff.output.splitlines() if l.startswith("KL")).split()[-1])
    assert kl > 1e-4


def test_seqlen_longer_than_max_positions(tiny_model_dir, corpus_file):
    r = _eval_cli("--model", str(tiny_model_dir), "--data", str(corpus_file), "--seqlen", "4096")
    assert r.exit_code == 2 and "max positions (256)" in r.output and "Traceback" not in r.output


def test_wikitext_offline_is_a_clear_error(tiny_model_dir):
    r = _eval_cli("--model", str(tiny_model_dir), "--seqlen", "64")
    assert r.exit_code == 2 and "offline" in r.output and "pass --data PATH" in r.output


def test_bad_eval_inputs(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = _eval_cli("--model", str(tiny_model_dir), "--data", str(empty), "--seqlen", "64")
    assert r.exit_code == 2 and "empty" in r.output
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    r = _eval_cli("--model", str(tiny_model_dir), "--data", str(short), "--seqlen", "64")
    assert r.exit_code == 2 and "fewer than one window" in r.output
