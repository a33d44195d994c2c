"""End-to-end scale tuning after GPTQ/RTN (quant/scale_tuning.py): lowers the KL it trains on, keeps the integers and the
export, leaves nothing behind on failure, refuses bad input; `quantize --tune-scales-steps` records it."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from spinquant.cli import cli
from spinquant.architectures import architecture_of
from spinquant.experimental.norm_tuning import tune_scales_and_norms
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.evaluate import hf_logits_fn
from spinquant.formats import load_model
from spinquant.formats.hf import untie_embeddings
from spinquant.quant import scale_tuning
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.fake_quant import quant_linears
from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales
from spinquant.quant.scheme import META_8DA4W
from tests.helpers import rel_diff
from tests.test_quantize import executorch_eager


def _kl(model, teacher, windows) -> float:
    with torch.no_grad():
        t = F.log_softmax(teacher(windows).logits.float(), -1)
        s = F.log_softmax(model(windows).logits.float(), -1)
        return (t.exp() * (t - s)).sum(-1).mean().item()


def _rtn_model(tiny_model):
    fused = untie_embeddings(copy.deepcopy(tiny_model))
    fuse_and_rotate(fused, Rotations.random_hadamard(fused, 0))
    return quantize_model(fused, META_8DA4W, WeightQuantConfig(method="rtn"), progress=False)


def _windows(tiny_model, n, seed):
    return torch.randint(0, tiny_model.config.vocab_size, (n, 32), generator=torch.Generator().manual_seed(seed))


def test_scale_tuning_lowers_the_kl_keeps_the_integers_and_exports(tiny_model, tmp_path):
    from spinquant.formats.executorch import write_executorch_checkpoint

    model = _rtn_model(tiny_model)
    windows = _windows(tiny_model, 16, 0)
    before_q = {n: lin.qweight.clone() for n, lin in quant_linears(model)}
    before_s = {n: lin.scales.clone() for n, lin in quant_linears(model)}
    kl_before = _kl(model, tiny_model, windows)
    cfg = ScaleTuningConfig(steps=16, lr=1e-2)
    tune_scales(model, tiny_model, windows, cfg, progress=False)
    kl_after = _kl(model, tiny_model, windows)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)
    for name, lin in quant_linears(model):
        assert torch.equal(lin.qweight, before_q[name]), name  # the integers stay
        assert lin.scales.dtype == torch.float32 and lin.scale_log_offset is None and not lin.scales.requires_grad
        assert (lin.scales > 0).all()
    assert sum(not torch.equal(lin.scales, before_s[n]) for n, lin in quant_linears(model)) == len(before_s)
    assert len(cfg.stats["losses"]) == 16 and cfg.stats["seconds"] > 0
    assert 0 < cfg.stats["relative_change"]["mean"] <= cfg.stats["relative_change"]["max"]
    # the tuned scales are what ExecuTorch's own model computes with
    write_executorch_checkpoint(model, META_8DA4W, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(executorch_eager(tmp_path)(ids), model(ids).logits) < 1e-5


def _norm_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in architecture_of(model.config).norms(model)}


def test_scale_tuning_with_norms_tunes_every_norm_and_exports(tiny_model, tmp_path):
    from spinquant.formats.executorch import write_executorch_checkpoint

    model = _rtn_model(tiny_model)
    norms_before = _norm_weights(model)
    assert len(norms_before) == 2 * tiny_model.config.num_hidden_layers + 1
    windows = _windows(tiny_model, 16, 0)
    kl_before = _kl(model, tiny_model, windows)
    cfg = ScaleTuningConfig(steps=16, lr=1e-2)
    tune_scales_and_norms(model, tiny_model, windows, cfg, progress=False)  # spinquant.experimental
    assert _kl(model, tiny_model, windows) < 0.9 * kl_before
    for name, norm in architecture_of(model.config).norms(model):
        assert type(norm).__name__ == "LlamaRMSNorm" and isinstance(norm.weight, torch.nn.Parameter), name
        assert not norm.weight.requires_grad and not torch.equal(norm.weight, norms_before[name]), name
    assert 0 < cfg.stats["norm_relative_change"]["mean"] <= cfg.stats["norm_relative_change"]["max"]
    assert not any(p.requires_grad for p in model.parameters())
    # the checkpoint carries the tuned norm weights: ExecuTorch's own model computes the tuned model
    write_executorch_checkpoint(model, META_8DA4W, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(executorch_eager(tmp_path)(ids), model(ids).logits) < 1e-5


@pytest.mark.parametrize("norms", [False, True])
def test_failed_scale_tuning_leaves_the_scales_as_they_were(tiny_model, monkeypatch, norms):
    model = _rtn_model(tiny_model)
    before = {n: lin.scales.clone() for n, lin in quant_linears(model)}
    norms_before = _norm_weights(model)
    calls = []
    real = scale_tuning.chunked_kl

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(scale_tuning, "chunked_kl", failing)
    tune = tune_scales_and_norms if norms else tune_scales
    with pytest.raises(RuntimeError, match="simulated"):
        tune(model, tiny_model, _windows(tiny_model, 4, 1), ScaleTuningConfig(steps=4, lr=1e-2), progress=False)
    assert len(calls) == 3
    for name, lin in quant_linears(model):
        assert torch.equal(lin.scales, before[name]) and lin.scale_log_offset is None, name
    for name, norm in architecture_of(model.config).norms(model):
        assert type(norm).__name__ == "LlamaRMSNorm" and torch.equal(norm.weight, norms_before[name]), name


def test_cpu_tuning_trims_the_heap_at_each_layers_attention_and_mlp_also_in_the_recompute(tiny_model, monkeypatch):
    from spinquant import memory

    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    model = _rtn_model(tiny_model)
    assert not memory.trimming_pays(model)  # a small model is not trimmed (it would only cost time) ...
    tune_scales(model, tiny_model, _windows(tiny_model, 1, 5), ScaleTuningConfig(steps=1, lr=1e-2), progress=False)
    assert trims == []
    monkeypatch.setattr(memory, "TRIM_FROM_BYTES", 0)  # ... a large one is
    assert memory.trimming_pays(model) and not memory.trimming_pays(copy.deepcopy(model).to("meta"))
    model = _rtn_model(tiny_model)
    reference = copy.deepcopy(model)
    windows = _windows(tiny_model, 3, 2)
    tune_scales(model, tiny_model, windows, ScaleTuningConfig(steps=3, lr=1e-2), progress=False)
    n_layers = len(architecture_of(model.config).decoder_layers(model))
    assert len(trims) == 3 * n_layers * 2 * 2  # steps x layers x (attention, MLP) x (forward, checkpointed recompute)
    model(windows[:1])
    assert len(trims) == 3 * n_layers * 4  # the hooks are gone after the tuning
    with memory.heap_trimmed_before([reference], enabled=False):  # a GPU run installs nothing
        reference(windows[:1])
    assert len(trims) == 3 * n_layers * 4


def test_evaluation_forwards_of_a_large_model_trim_the_real_heap_and_change_no_result(tiny_model, monkeypatch):
    from spinquant import memory

    windows = _windows(tiny_model, 1, 3)
    model = _rtn_model(tiny_model)
    plain = hf_logits_fn(model)(windows)
    monkeypatch.setattr(memory, "TRIM_FROM_BYTES", 0)
    trims = []
    real = memory.trim_heap
    monkeypatch.setattr(memory, "trim_heap", lambda: (trims.append(1), real()))  # glibc's malloc_trim runs
    with torch.no_grad():
        trimmed = hf_logits_fn(model)(windows)
    assert len(trims) == 2 * len(architecture_of(model.config).decoder_layers(model))
    assert torch.equal(plain, trimmed)


def test_scale_tuning_refuses_bad_input(tiny_model):
    with pytest.raises(ValueError, match="steps must be >= 0"):
        ScaleTuningConfig(steps=-1)
    with pytest.raises(ValueError, match="learning rate must be positive"):
        ScaleTuningConfig(steps=1, lr=0.0)
    model = _rtn_model(tiny_model)
    with pytest.raises(ValueError, match="needs 5 windows"):
        tune_scales(model, tiny_model, _windows(tiny_model, 4, 1), ScaleTuningConfig(steps=5), progress=False)
    with pytest.raises(ValueError, match="no quantized linear"):
        tune_scales(copy.deepcopy(tiny_model), tiny_model, _windows(tiny_model, 4, 1), ScaleTuningConfig(steps=2),
                    progress=False)


def test_quantize_cli_tunes_scales_on_other_windows_and_records_it(tiny_model_dir, corpus_file, tmp_path):
    base = ["quantize", "--model", str(tiny_model_dir), "--calib-data", str(corpus_file), "--seqlen", "64", "--method", "rtn"]
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    r = CliRunner().invoke(cli, [*base, "--out", str(plain)])
    assert r.exit_code == 0, r.output
    assert json.loads((plain / "quant_config.json").read_text())["scale_tuning"] is None
    r = CliRunner().invoke(cli, [*base, "--out", str(tuned), "--tune-scales-steps", "3", "--tune-scales-lr", "0.01"])
    assert r.exit_code == 0, r.output
    st = json.loads((tuned / "quant_config.json").read_text())["scale_tuning"]
    assert st["steps"] == 3 and st["lr"] == 0.01 and len(st["losses"]) == 3
    assert st["calibration"]["nsamples"] == 3 and st["calibration"]["seed"] == 1  # GPTQ's seed (0) + 1: other windows
    a, b = load_model(plain).model.layers[1].mlp.down_proj, load_model(tuned).model.layers[1].mlp.down_proj
    assert torch.equal(a.qweight, b.qweight) and not torch.equal(a.scales, b.scales)
    # the tuning is part of what the run is: the same --out with other tuning options is another run (refused)
    r = CliRunner().invoke(cli, [*base, "--out", str(tuned), "--tune-scales-steps", "4"])
    assert r.exit_code == 2, r.output
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "normed"), "--tune-norms"])  # spinquant.experimental's
    assert r.exit_code == 2 and "No such option" in r.output and not (tmp_path / "normed").exists()
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "neg"), "--tune-scales-steps", "-1"])
    assert r.exit_code == 2 and "--tune-scales-steps" in r.output and not (tmp_path / "neg").exists()


def test_blockwise_tuning_lowers_each_layers_output_error_and_keeps_the_integers(tiny_model):
    from spinquant.experimental.block_tuning import BlockTuner

    fused = untie_embeddings(copy.deepcopy(tiny_model))
    fuse_and_rotate(fused, Rotations.random_hadamard(fused, 0))
    windows = _windows(tiny_model, 8, 0)
    cfg = dict(method="gptq", float_target=True, target_percdamp=0.1, scale_refit=True)
    plain = quantize_model(copy.deepcopy(fused), META_8DA4W, WeightQuantConfig(**cfg), windows, progress=False)
    tuner = BlockTuner(steps=24, lr=1e-2)
    tuned = quantize_model(copy.deepcopy(fused), META_8DA4W, WeightQuantConfig(**cfg), windows, progress=False,
                           after_layer=tuner)
    n_layers = tiny_model.config.num_hidden_layers
    assert sorted(tuner.stats) == list(range(n_layers))
    assert all(st["after"] < st["before"] for st in tuner.stats.values()), tuner.stats
    # the first layer sees the same inputs in both runs: its integers are GPTQ's, only its scales moved
    layer0 = [(n, lin) for n, lin in quant_linears(tuned) if n.startswith("model.layers.0.")]
    plain0 = dict(quant_linears(plain))
    assert all(torch.equal(lin.qweight, plain0[n].qweight) for n, lin in layer0)
    assert all(not torch.equal(lin.scales, plain0[n].scales) and lin.scale_log_offset is None for n, lin in layer0)
    with pytest.raises(ValueError, match="needs the float stream"):
        quantize_model(copy.deepcopy(fused), META_8DA4W, WeightQuantConfig(method="gptq"), windows, progress=False,
                       after_layer=BlockTuner(steps=2))
