"""`spinquant rotate`: the output is a working model, R.bin has the SpinQuant layout, writes are atomic."""

import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from spinquant import pipeline
from spinquant.cli import cli
from spinquant.hadamard import HadamardInputLinear
from spinquant.fusion import orthogonality_error
from spinquant.formats import load_model
from tests.helpers import rel_diff


def _rotate(src, out, *extra):
    result = CliRunner().invoke(cli, ["rotate", "--model", str(src), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


def test_no_r4_output_is_plain_hf_llama(tiny_model_dir, tmp_path):
    out = tmp_path / "rot"
    _rotate(tiny_model_dir, out, "--r4", "off", "--seed", "5")
    original = load_model(tiny_model_dir)
    vanilla = LlamaForCausalLM.from_pretrained(out).eval()  # plain transformers, no spinquant code involved
    ids = torch.randint(0, original.config.vocab_size, (1, 50))
    with torch.no_grad():
        assert rel_diff(vanilla(ids).logits, original(ids).logits) < 1e-4
    for name, p in vanilla.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    rbin = torch.load(out / "R.bin", weights_only=True)
    assert set(rbin) == {"R1", "model.layers.0.self_attn.R2", "model.layers.1.self_attn.R2"}
    assert rbin["R1"].shape == (64, 64) and rbin["R1"].dtype == torch.float32
    assert rbin["model.layers.0.self_attn.R2"].shape == (16, 16)
    assert all(orthogonality_error(q) < 1e-6 for q in rbin.values())


def test_r4_output_reloads_with_online_hadamard(tiny_model_dir, tmp_path):
    out = tmp_path / "rot4"
    _rotate(tiny_model_dir, out)
    model = load_model(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardInputLinear)
    original = load_model(tiny_model_dir)
    ids = torch.randint(0, original.config.vocab_size, (1, 50))
    with torch.no_grad():
        assert rel_diff(model(ids).logits, original(ids).logits) < 1e-4
    # rotating an already-R4 model again would double-apply R4
    result = CliRunner().invoke(cli, ["rotate", "--model", str(out), "--out", str(tmp_path / "again")])
    assert result.exit_code == 2 and "already carries an online R4" in result.output


def test_failed_write_keeps_previous_output(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "rot"
    _rotate(tiny_model_dir, out, "--seed", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(pipeline, "save_rbin", broken_save)
    result = CliRunner().invoke(cli, ["rotate", "--model", str(tiny_model_dir), "--out", str(out), "--seed", "2"])
    assert result.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["rot"]  # no partial directory left behind
