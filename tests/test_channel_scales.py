"""Learned channel scales (fusion.ChannelScales): function-preserving when fused, learned jointly with R1/R2."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from spinquant.errors import SpinQuantError
from spinquant.formats.rbin import SCALES_FILE, load_rbin, save_rbin
from spinquant.fusion import ChannelScales, Rotations, fuse_and_rotate
from spinquant.architectures import head_dim
from spinquant.formats.hf import untie_embeddings
from spinquant.quant.fake_quant import make_fake_quant
from spinquant.experimental.learning import ResearchLearner, check_research
from spinquant.rotation import LearnConfig, prepare_model
from tests.helpers import rel_diff


def _random_scales(cfg, seed: int, spread: float = 0.5) -> ChannelScales:
    gen = torch.Generator().manual_seed(seed)
    n = cfg.num_hidden_layers

    def draw(width: int) -> list[torch.Tensor]:
        return [torch.exp(spread * torch.randn(width, generator=gen, dtype=torch.float64)) for _ in range(n)]

    return ChannelScales(attn_in=draw(cfg.hidden_size), mlp_in=draw(cfg.hidden_size),
                         v_out=draw(cfg.num_key_value_heads * head_dim(cfg)), up_out=draw(cfg.intermediate_size))


@pytest.mark.parametrize("r4", [True, False])
def test_fused_scales_leave_the_float_model_unchanged(tiny_model, r4):
    """Random R1/R2 (+R4) and random scales spread over e^±1: same logits, and the norms carry the scales."""
    untie_embeddings(tiny_model)
    cfg = tiny_model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA: o_proj columns divided by their kv head's scales
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(tiny_model).double()
    with torch.no_grad():
        expected = model(ids).logits
    scales = _random_scales(cfg, seed=3)
    rot = Rotations.random_hadamard(model, seed=1, r4=r4)
    rot.scales = scales
    fuse_and_rotate(model, rot)
    with torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()  # RMSNorm computes in float32
    assert torch.allclose(model.model.layers[1].input_layernorm.weight, scales.attn_in[1])
    assert torch.allclose(model.model.layers[0].post_attention_layernorm.weight, scales.mlp_in[0])
    # and they did change the weights the activations meet
    plain = copy.deepcopy(tiny_model).double()
    fuse_and_rotate(plain, Rotations.random_hadamard(plain, seed=1, r4=r4))
    assert not torch.allclose(plain.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


def test_bad_scales_are_refused_with_the_layer_named(tiny_model):
    untie_embeddings(tiny_model)
    cfg = tiny_model.config
    scales = _random_scales(cfg, seed=0)
    scales.up_out[1] = scales.up_out[1].clone()
    scales.up_out[1][3] = 0.0
    with pytest.raises(SpinQuantError, match="'up_out' of layer 1 .* not finite and positive"):
        fuse_and_rotate(copy.deepcopy(tiny_model), Rotations(scales=scales))
    scales = _random_scales(cfg, seed=0)
    scales.v_out[0] = scales.v_out[0][:-1]
    with pytest.raises(SpinQuantError, match="'v_out' of layer 0 has shape"):
        fuse_and_rotate(copy.deepcopy(tiny_model), Rotations(scales=scales))


def _fused_fake_quant_loss(float_model, rot, scheme, batch) -> float:
    """Cross-entropy of ``batch`` under the fused, rotated, scaled model with fake quantization (an independent
    construction of what the learner computes: no hooks, no weight overrides)."""
    direct = copy.deepcopy(float_model)
    fuse_and_rotate(direct, rot)
    make_fake_quant(direct, scheme)
    for m in direct.modules():
        if hasattr(m, "weight_mode") and m.w_bits < 16:
            m.weight_mode = "dynamic"
    with torch.no_grad():
        logits = direct(batch).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("r4", [True, False])
def test_learner_with_scales_computes_the_loss_of_the_fused_model(tiny_model, r4):
    """After steps that move R1, R2 and the scales (lr high enough to move them), the learner's loss of a batch
    equals the loss of the model fused with ``learner.rotations()`` (scales included) under the same fake quant."""
    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    cfg = LearnConfig(steps=4, batch_size=4, micro_batch=2, lr=1.0, w_bits=4, a_bits=4, kv_bits=4, scales=True,
                      scale_lr=0.2, r4=r4, grad_checkpoint=True)
    learner = ResearchLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"), progress=False)
    learner.run(stop_after=3)
    rot = learner.rotations()
    assert rot.scales is not None
    moved = max(float((s.log()).abs().max()) for s in rot.scales.up_out + rot.scales.attn_in + rot.scales.v_out)
    assert moved > 0.1
    batch = learner._batch(learner.step)
    ours = learner.accumulate_gradients(batch)
    expected = _fused_fake_quant_loss(tiny_model, rot, cfg.scheme(), batch)
    assert ours == pytest.approx(expected, rel=1e-4)
    assert all(v.grad is not None and v.grad.abs().max() > 0 for v in learner.log_scales.values())


def test_scale_gradients_vanish_without_quantization(tiny_model):
    """The scales are function-preserving, so at W16A16 the loss does not depend on them: their gradient is ~0,
    while under W4A4 it is not (the scale path of the learner is exact, not only approximately right)."""
    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    norms = {}
    for bits in (16, 4):
        cfg = LearnConfig(steps=1, batch_size=2, micro_batch=2, w_bits=bits, a_bits=bits, scales=True)
        learner = ResearchLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"), progress=False)
        with torch.no_grad():  # away from 1, so that a wrong scale path would show
            for v in learner.log_scales.values():
                v.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(4))
        learner.accumulate_gradients(windows)
        norms[bits] = max(float(v.grad.abs().max()) for v in learner.log_scales.values())
    assert norms[4] > 1e-3 and norms[16] < 1e-4 * norms[4]


def test_scales_resume_with_the_rotations(tiny_model, tmp_path):
    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    cfg = LearnConfig(steps=4, batch_size=2, micro_batch=2, w_bits=4, a_bits=4, scales=True, scale_lr=0.1, save_every=2,
                      grad_checkpoint=False)

    def learner(state_dir):
        return ResearchLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"),
                               state_dir=state_dir, progress=False)

    whole = learner(None)
    whole.run()
    first = learner(tmp_path)
    first.run(stop_after=2)
    second = learner(tmp_path)
    assert second.try_resume() and second.step == 2
    second.run()
    for k in whole.log_scales:
        assert torch.allclose(whole.log_scales[k], second.log_scales[k], atol=1e-6)
    assert torch.allclose(whole.r1, second.r1, atol=1e-6)
    # a state learned without scales is another configuration
    plain = LearnConfig(**{**cfg.__dict__, "scales": False})
    other = ResearchLearner(prepare_model(copy.deepcopy(tiny_model), plain), windows, plain, torch.device("cpu"),
                            state_dir=tmp_path, progress=False)
    with pytest.raises(SpinQuantError, match="different configuration"):
        other.try_resume()


def test_learned_scales_through_quantize_export_and_the_pte(tiny_model_dir, corpus_file, tmp_path):
    """learn-rotations --scales writes scales.safetensors beside R.bin; quantize --rotations applies both (and keeps
    both in its run); the ExecuTorch checkpoint carries the scales in its norm weights and executorch's own exporter
    and runtime reproduce our fake-quant model (the export's verification), as does an independent reader."""
    from click.testing import CliRunner

    from spinquant.cli import cli
    from spinquant.experimental.cli import experimental
    from spinquant.formats import load_model
    from tests.test_export import independent_reference_forward

    learned = tmp_path / "rot"
    r = CliRunner().invoke(experimental, ["learn-rotations", "--model", str(tiny_model_dir), "--out", str(learned), "--calib-data",
                                          str(corpus_file), "--steps", "4", "--batch-size", "2", "--seqlen", "48", "--scales",
                                 "--scale-lr", "0.3", "--w-bits", "4", "--a-bits", "4"])
    assert r.exit_code == 0, r.output
    assert "scales.safetensors" in r.output and (learned / SCALES_FILE).is_file()
    rot = load_rbin(learned / "R.bin")
    assert rot.scales is not None and float(rot.scales.attn_in[0].log().abs().max()) > 0.1
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(run), "--rotations", str(learned),
                                 "--calib-data", str(corpus_file), "--gptq-nsamples", "8", "--seqlen", "64"])
    assert r.exit_code == 0, r.output
    kept = load_rbin(run / "R.bin")
    assert kept.scales is not None and torch.allclose(kept.scales.up_out[1], rot.scales.up_out[1])
    assert "warning" not in r.output
    # the float target with scales: allowed, but said (measured much worse than plain GPTQ at W4A4KV4 on SmolLM2)
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run_f"), "--rotations",
                                 str(learned), "--calib-data", str(corpus_file), "--gptq-nsamples", "8", "--seqlen", "64",
                                 "--gptq-objective", "float"])
    assert r.exit_code == 0 and "warning: the float GPTQ objective with learned channel scales" in r.output, r.output
    r = CliRunner().invoke(cli, ["export", "--from", str(run), "--verify-seqlen", "64", "--verify-windows", "4",
                                 "--max-seq-len", "128"])
    assert r.exit_code == 0, r.output
    v = json.loads((run / "verification.json").read_text())
    assert v["verified"] and v["verification"]["top1_agreement"] >= 0.99
    sd = torch.load(run / "consolidated.00.pth", weights_only=True)
    assert torch.allclose(sd["layers.0.attention_norm.weight"], rot.scales.attn_in[0].float())
    assert torch.allclose(sd["layers.1.ffn_norm.weight"], rot.scales.mlp_in[1].float())
    ours = load_model(run)
    ids = torch.randint(0, ours.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(ids).logits
    assert rel_diff(independent_reference_forward(run, ids), expected) < 1e-4


def test_scales_refused_where_a_backend_would_drop_them(tiny_model_dir, tmp_path):
    """qnn-float-rotated hands R.bin to a backend that rotates the original float model: scales beside the R.bin
    would be silently lost, so the run is refused with the reason."""
    from spinquant.formats import load_model
    from spinquant.workflow import write_float_rotated

    model = load_model(tiny_model_dir)
    src = tmp_path / "rot"
    src.mkdir()
    rot = Rotations.random_hadamard(model, seed=0)
    rot.scales = _random_scales(model.config, seed=1)
    save_rbin(rot, src / "R.bin")
    assert (src / SCALES_FILE).is_file()
    out = tmp_path / "out"
    with pytest.raises(SpinQuantError, match="learned channel scales"):
        write_float_rotated(str(tiny_model_dir), src / "R.bin", out)
    assert not out.exists()
    (src / SCALES_FILE).write_bytes(b"not safetensors")  # and a corrupt scales file is named, not half-read
    with pytest.raises(SpinQuantError, match="cannot read the channel scales"):
        load_rbin(src / "R.bin")


def test_smooth_scales_meet_activation_and_weight_ranges_halfway(tiny_model):
    """alpha 0.5: after fusing the SmoothQuant scales, every channel's max |activation| over max |weight column| is
    the same (per layer and kind), on the windows they were measured on; the float model is unchanged."""
    from spinquant.experimental.smoothing import activation_absmax, smooth_scales, weight_column_absmax

    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(5))
    rot = Rotations.random_hadamard(tiny_model, seed=2, r4=False)
    rot.scales = smooth_scales(tiny_model, rot, windows, alpha=0.5)
    model = copy.deepcopy(tiny_model)
    fuse_and_rotate(model, rot)
    acts, cols = activation_absmax(model, windows), weight_column_absmax(model)
    for kind in acts:
        ratio = acts[kind] / cols[kind]
        spread = ratio.amax(-1) / ratio.amin(-1)
        assert float(spread.max()) < 1 + 1e-3, (kind, spread)
    plain = copy.deepcopy(tiny_model)
    fuse_and_rotate(plain, Rotations(r1=rot.r1, r2=rot.r2))
    before_acts = activation_absmax(plain, windows)
    assert float((before_acts["up_out"].amax(-1) / before_acts["up_out"].amin(-1)).min()) > 2  # there was a spread
    with torch.no_grad():
        assert rel_diff(model(windows).logits, tiny_model(windows).logits) < 1e-4
    # only the kinds asked for move
    partial = smooth_scales(tiny_model, rot, windows, alpha=0.5, kinds=("up_out",))
    assert all(torch.equal(s, torch.ones_like(s)) for s in partial.attn_in + partial.v_out)
    assert not torch.equal(partial.up_out[0], torch.ones_like(partial.up_out[0]))


def test_learner_starts_from_the_smooth_scales(tiny_model):
    from spinquant.experimental.learning import initial_scales
    from spinquant.experimental.smoothing import smooth_scales

    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    cfg = LearnConfig(steps=2, batch_size=2, micro_batch=2, w_bits=4, a_bits=4, scales=True, scale_init=0.5)
    start = initial_scales(tiny_model, cfg, windows)
    learner = ResearchLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"),
                              progress=False, initial_scales=start)
    expected = smooth_scales(tiny_model, Rotations.random_hadamard(tiny_model, cfg.seed), windows[:8], alpha=0.5)
    assert torch.allclose(learner.rotations().scales.up_out[1], expected.up_out[1], rtol=1e-5)
    assert torch.allclose(learner.r1.double(), Rotations.random_hadamard(tiny_model, cfg.seed).r1, atol=1e-6)
    with pytest.raises(SpinQuantError, match="needs --scales"):
        check_research(LearnConfig(scale_init=0.5))
