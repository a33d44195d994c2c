"""Learning R1/R2: exact gradients, orthogonality, resume equals an uninterrupted run, CLI round trip."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from spinquant.architectures import LLAMA
from spinquant.cli import cli
from spinquant.data import CalibrationSet
from spinquant.errors import SpinQuantError
from spinquant.fusion import Rotations, apply_rotations, fuse_and_rotate, fuse_norms, orthogonality_error
from spinquant.formats.rbin import load_rbin
from spinquant.formats import load_model
from spinquant.formats.hf import untie_embeddings
from spinquant.pipeline import learn_rotations
from spinquant.quant.fake_quant import make_fake_quant
from spinquant.experimental.cli import experimental
from spinquant.experimental.learning import ResearchLearner
from spinquant.rotation import LearnConfig, RotationLearner, prepare_model, rotated_weights


def test_gradients_equal_direct_autograd(tiny_model, monkeypatch):
    """The once-per-step rotation graph + checkpointed micro-batches + the loss over chunks of positions (5 here:
    full-vocabulary logits are never whole) give the plain autograd gradient of the whole batch."""
    import spinquant.rotation as rotation

    monkeypatch.setattr(rotation, "LOSS_CHUNK_POSITIONS", 5)
    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = LearnConfig(steps=1, batch_size=4, micro_batch=2, a_bits=4, grad_checkpoint=True)
    learner = RotationLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"), progress=False)
    loss = learner.accumulate_gradients(windows)
    g1, g2 = learner.r1.grad.clone(), learner.r2.grad.clone()

    # direct: differentiable fusion of the same rotations into a fresh fake-quant model, one big batch
    r1 = learner.r1.detach().clone().double().requires_grad_(True)
    r2 = learner.r2.detach().clone().double().requires_grad_(True)
    ref = copy.deepcopy(tiny_model).double()
    fuse_norms(ref)
    apply_rotations(ref, Rotations(r4=True))
    make_fake_quant(ref, cfg.scheme())
    for m in ref.modules():
        if hasattr(m, "weight_mode") and m.w_bits < 16:
            m.weight_mode = "dynamic"
    params = dict(ref.named_parameters())
    base = {k: v.detach() for k, v in params.items() if k.endswith(".weight") and "norm" not in k and "embed" not in k}
    rotated = rotated_weights(LLAMA, base, r1, r2, ref.config.num_hidden_layers, 16)
    emb = F.embedding(windows, params["model.embed_tokens.weight"].detach()) @ r1
    out = torch.func.functional_call(ref, rotated, args=(), kwargs={"inputs_embeds": emb, "use_cache": False})
    logits = out.logits[:, :-1]
    direct = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    direct.backward()
    assert abs(direct.item() - loss) < 1e-4
    assert torch.allclose(g1.double(), r1.grad, rtol=1e-3, atol=1e-5)
    assert torch.allclose(g2.double(), r2.grad, rtol=1e-3, atol=1e-5)


def test_a_large_model_on_the_cpu_learns_with_the_heap_trimmed_and_the_same_gradients(tiny_model, monkeypatch):
    from spinquant import memory

    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    cfg = LearnConfig(steps=1, batch_size=4, micro_batch=2, a_bits=4, grad_checkpoint=True)
    grads, trims = [], []
    real = memory.trim_heap
    monkeypatch.setattr(memory, "trim_heap", lambda: (trims.append(1), real())[1])
    for threshold in (memory.TRIM_FROM_BYTES, 0):  # a small model is not trimmed; as a large one it is
        monkeypatch.setattr(memory, "TRIM_FROM_BYTES", threshold)
        learner = RotationLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"),
                                  progress=False)
        learner.accumulate_gradients(windows)
        grads.append((learner.r1.grad.clone(), learner.r2.grad.clone()))
        if threshold:
            assert trims == []
    # 2 micro-batches x layers x (attention, MLP) x (forward, checkpointed recompute)
    assert len(trims) == 2 * tiny_model.config.num_hidden_layers * 2 * 2
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_kl_loss_in_position_chunks_equals_whole(tiny_model, monkeypatch):
    import spinquant.rotation as rotation

    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    cfg = LearnConfig(steps=1, batch_size=2, micro_batch=1, w_bits=4, a_bits=8, loss="kl")
    results = []
    for chunk in (1000, 7):
        monkeypatch.setattr(rotation, "LOSS_CHUNK_POSITIONS", chunk)
        learner = ResearchLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"),
                                  progress=False, teacher=copy.deepcopy(tiny_model))
        results.append((learner.accumulate_gradients(windows), learner.r1.grad.clone(), learner.r2.grad.clone()))
    (loss_a, g1_a, g2_a), (loss_b, g1_b, g2_b) = results
    assert loss_a > 0 and loss_b == pytest.approx(loss_a, rel=1e-3)  # a KL of ~1e-4 from sums of terms ~1: float32 rounding
    for a, b in ((g1_a, g1_b), (g2_a, g2_b)):
        assert a.abs().max() > 0 and (b - a).abs().max() <= 1e-3 * a.abs().max()


def _learn(model_dir, corpus_file, out, stop_after=None, steps=10):
    cfg = LearnConfig(steps=steps, batch_size=2, micro_batch=1, lr=1.5, a_bits=4, save_every=5)
    calib = CalibrationSet(source=str(corpus_file), nsamples=20, seqlen=48)
    return learn_rotations(str(model_dir), str(out), cfg, calib, device="cpu", progress=False, stop_after=stop_after)


def test_resume_equals_uninterrupted(tiny_model_dir, corpus_file, tmp_path):
    full = _learn(tiny_model_dir, corpus_file, tmp_path / "full")
    assert full["finished"] and full["resumed_from"] == 0
    part = _learn(tiny_model_dir, corpus_file, tmp_path / "resumed", stop_after=5)  # "killed" after step 5
    assert not part["finished"] and not (tmp_path / "resumed" / "R.bin").exists()
    state_file = tmp_path / "resumed" / "learn_state.pt"  # as saved before r4, max_angle, angles existed: it still resumes
    state = torch.load(state_file, weights_only=True)
    assert state["config"].pop("r4") is True and state["config"].pop("max_angle") is None
    assert len(state.pop("angles")) == 5
    torch.save(state, state_file)
    rest = _learn(tiny_model_dir, corpus_file, tmp_path / "resumed")
    assert rest["finished"] and rest["resumed_from"] == 5
    # the learned rotations (learned/ when the held-out check kept the start: a random model's windows are noise)
    a, b = (load_rbin(d / "learned" / "R.bin" if (d / "learned").is_dir() else d / "R.bin")
            for d in (tmp_path / "full", tmp_path / "resumed"))
    assert (tmp_path / "full" / "learned").is_dir() == (tmp_path / "resumed" / "learned").is_dir()
    assert (a.r1 - b.r1).abs().max() < 1e-5
    assert max((x - y).abs().max().item() for x, y in zip(a.r2, b.r2)) < 1e-5
    assert full["losses"] == pytest.approx(rest["losses"], abs=1e-6)
    # learning moved the rotations away from the random Hadamard start, and kept them orthogonal
    start = Rotations.random_hadamard(load_model(tiny_model_dir), 0)
    assert (a.r1 - start.r1).abs().max() > 1e-3
    assert orthogonality_error(a.r1) < 1e-4 and max(orthogonality_error(m) for m in a.r2) < 1e-4
    curve = json.loads((tmp_path / "full" / "losses.json").read_text())
    assert len(curve["losses"]) == 10 and (tmp_path / "full" / "learning_curve.png").stat().st_size > 1000
    assert len(curve["step_angles"]) == 10 and all(a > 0 for step in curve["step_angles"] for a in step)


def test_cli_learn_then_quantize_with_learned_rotations(tiny_model_dir, corpus_file, tmp_path):
    learned = tmp_path / "rot"
    r = CliRunner().invoke(cli, ["learn-rotations", "--model", str(tiny_model_dir), "--out", str(learned), "--calib-data",
                                 str(corpus_file), "--steps", "4", "--batch-size", "2", "--seqlen", "48"])
    assert r.exit_code == 0, r.output
    rot = load_rbin(learned / "R.bin")
    assert rot.r1.shape == (64, 64) and len(rot.r2) == 2
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(run), "--rotations",
                                 str(learned / "R.bin"), "--method", "rtn"])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_rbin(run / "R.bin").r1.float(), rot.r1.float())
    # the quantized run computes (up to quantization) the original function: learned rotations are exact in float
    model = load_model(tiny_model_dir)
    rotated = copy.deepcopy(model)
    fuse_and_rotate(rotated, rot)
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert ((rotated(ids).logits - model(ids).logits).abs().max() / model(ids).logits.abs().max()) < 1e-4


def test_out_dir_of_another_model_is_refused(tiny_model_dir, corpus_file, tmp_path, tiny_tokenizer):
    _learn(tiny_model_dir, corpus_file, tmp_path / "rot", steps=2)
    other = tmp_path / "other"
    load_model(tiny_model_dir).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    r = CliRunner().invoke(cli, ["learn-rotations", "--model", str(other), "--out", str(tmp_path / "rot"), "--calib-data",
                                 str(corpus_file), "--steps", "2", "--batch-size", "2", "--seqlen", "48"])
    assert r.exit_code == 2 and "holds a run of a different model" in r.output


def test_torchrun_two_ranks_learn_what_one_rank_learns(tiny_model_dir, corpus_file, tmp_path):
    """torchrun --nproc-per-node 2 (gloo on CPU) splits each batch across ranks: same effective batch, same rotations
    and the same learned channel scales (their gradients are all-reduced too)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    args = ["learn-rotations", "--model", str(tiny_model_dir), "--calib-data", str(corpus_file), "--steps", "4",
            "--batch-size", "4", "--seqlen", "48", "--device", "cpu", "--w-bits", "4", "--scales", "--scale-lr", "0.05"]
    # the research command: the learned channel scales' gradients are all-reduced as the rotations' are
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "spinquant.experimental", *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29533", "-m", "spinquant.experimental", *args, "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_rbin(tmp_path / "one" / "R.bin"), load_rbin(tmp_path / "two" / "R.bin")
    # the same arithmetic up to float32 summation order (per-rank partial gradients, then all-reduce); with int4
    # round-to-nearest in the loss that order can flip a rounding, so the two runs agree to a small fraction of how far
    # they moved (a rank learning from its half batch alone moves as far, elsewhere), not to 1e-6
    start = Rotations.random_hadamard(load_model(tiny_model_dir), 0)
    moved_r1 = (a.r1 - start.r1).abs().max().item()
    moved_r2 = max((x - y).abs().max().item() for x, y in zip(a.r2, start.r2))
    print(f"moved R1 {moved_r1:.2e} R2 {moved_r2:.2e}; one vs two ranks R1 {(a.r1 - b.r1).abs().max().item():.2e} R2 "
          f"{max((x - y).abs().max().item() for x, y in zip(a.r2, b.r2)):.2e}")
    assert moved_r1 > 1e-3 and moved_r2 > 1e-3
    assert (a.r1 - b.r1).abs().max() < 0.05 * moved_r1
    assert max((x - y).abs().max().item() for x, y in zip(a.r2, b.r2)) < 0.05 * moved_r2
    moved_s = max((x.log()).abs().max().item() for x in a.scales.up_out)
    assert moved_s > 1e-2
    assert max((x - y).abs().max().item() for x, y in zip(a.scales.up_out, b.scales.up_out)) < 0.05 * moved_s
    la = json.loads((tmp_path / "one" / "losses.json").read_text())["losses"]
    lb = json.loads((tmp_path / "two" / "losses.json").read_text())["losses"]
    assert la == pytest.approx(lb, abs=1e-3)


def test_kl_loss_is_zero_without_quantization_and_positive_with_it(tiny_model):
    """KL(float || rotated model): rotations are exact, so only quantization makes it non-zero."""
    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = {}
    for w_bits, a_bits in ((16, 16), (4, 8)):
        cfg = LearnConfig(steps=1, batch_size=2, micro_batch=2, w_bits=w_bits, a_bits=a_bits, loss="kl")
        learner = ResearchLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"),
                                  progress=False, teacher=copy.deepcopy(tiny_model))
        losses[w_bits] = learner.accumulate_gradients(windows)
    assert abs(losses[16]) < 1e-6 and losses[4] > 1e-4


def test_gptq_in_the_loop_loss_is_the_loss_of_the_gptq_quantized_rotated_model(tiny_model):
    """weight_quant='gptq': (1) the collected Hessians rotated analytically (Qᵀ H Q) equal the Hessians observed
    in the fused, rotated model; (2) the learning loss equals the loss of that model with GPTQ int4 weights
    (an independent construction), and differs from the RTN loss."""
    from spinquant.architectures import LLAMA
    from spinquant.quant.gptq import gptq_quantize
    from spinquant.quant.scheme import QuantScheme
    from spinquant.experimental.rotation_gptq import _input_rotation, collect_hessians

    untie_embeddings(tiny_model)
    windows = torch.randint(0, tiny_model.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    cfg = LearnConfig(steps=3, batch_size=4, micro_batch=4, lr=0.5, w_bits=4, a_bits=8, weight_quant="gptq", gptq_windows=8,
                      grad_checkpoint=False)
    learner = ResearchLearner(prepare_model(copy.deepcopy(tiny_model), cfg), windows, cfg, torch.device("cpu"), progress=False)
    learner.run(stop_after=1)  # rotations away from the Hadamard start
    rot = learner.rotations()

    direct = copy.deepcopy(tiny_model)
    fuse_and_rotate(direct, rot)
    make_fake_quant(direct, QuantScheme(w_bits=16, a_bits=16, output_w_bits=16, output_a_bits=16, embedding_bits=16))
    observed = collect_hessians(direct, windows)
    heads = tiny_model.config.num_attention_heads
    for (i, first), h in observed.items():
        q = _input_rotation(LLAMA, first, learner.r1.detach(), learner.r2[i].detach(), heads)
        rotated_h = learner.hessians[(i, first)] if q is None else q.T @ learner.hessians[(i, first)] @ q
        assert (rotated_h - h).abs().max() < 1e-5 * h.abs().max()

    direct = copy.deepcopy(tiny_model)
    fuse_and_rotate(direct, rot)
    make_fake_quant(direct, cfg.scheme())
    for i, layer in enumerate(direct.model.layers):
        for group in LLAMA.groups:
            lins = [layer.get_submodule(n) for n in group]
            qint, scales = gptq_quantize(torch.cat([lin.weight.detach().float() for lin in lins]), observed[(i, group[0])], 4, 32)
            for lin, part_q, part_s in zip(lins, qint.split([lin.out_features for lin in lins]),
                                           scales.split([lin.out_features for lin in lins])):
                lin.set_quantized(part_q, part_s)
    batch = learner._batch(learner.step)
    with torch.no_grad():
        logits = direct(batch).logits[:, :-1]
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    ours = learner.accumulate_gradients(batch)
    learner.hessians = None  # the same step with RTN weights
    rtn = learner.accumulate_gradients(batch)
    assert ours == pytest.approx(expected, rel=2e-4)
    assert abs(rtn - expected) > 20 * abs(ours - expected)
    learner.hessians = collect_hessians(learner.model, windows[: cfg.gptq_windows])
    learner.run()
    assert learner.step == 3 and all(torch.isfinite(torch.tensor(learner.losses)))
    assert orthogonality_error(learner.rotations().r1) < 1e-4


def test_cli_gptq_in_the_loop_and_its_bad_input(tiny_model_dir, corpus_file, tmp_path):
    base = ["learn-rotations", "--model", str(tiny_model_dir), "--calib-data", str(corpus_file), "--steps", "2",
            "--batch-size", "2", "--seqlen", "48", "--weight-quant", "gptq", "--loss", "kl"]
    r = CliRunner().invoke(experimental, base + ["--out", str(tmp_path / "bad")])  # W16 has no int4 weights to GPTQ
    assert r.exit_code != 0 and "--w-bits 4" in r.output and not (tmp_path / "bad" / "R.bin").exists()
    r = CliRunner().invoke(experimental, base + ["--out", str(tmp_path / "ok"), "--w-bits", "4"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "ok" / "losses.json").read_text())
    assert summary["config"]["weight_quant"] == "gptq" and summary["config"]["loss"] == "kl" and len(summary["losses"]) == 2
    assert orthogonality_error(load_rbin(tmp_path / "ok" / "R.bin").r1) < 1e-4
    # the research settings are not on the main path: its command has no such options, its learner refuses them
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "main"), "--w-bits", "4"])
    assert r.exit_code == 2 and "No such option" in r.output and not (tmp_path / "main").exists()
    with pytest.raises(SpinQuantError, match="w_bits < 16, loss kl: research settings"):
        RotationLearner(load_model(tiny_model_dir), torch.zeros(2, 8, dtype=torch.long),
                        LearnConfig(w_bits=4, loss="kl"), torch.device("cpu"))


def _turn_angle(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The largest angle (radians) by which Q = after beforeᵀ turns any vector, per matrix of a batch."""
    q = (after.double() @ before.double().transpose(-1, -2))
    return torch.linalg.eigvals(q).angle().abs().amax(-1)


def test_step_angle_cap_bounds_the_cayley_step_and_keeps_its_direction():
    """step_angles predicts the turn geoopt's Cayley step really takes; bound_step_angles shortens the steps of the
    matrices above the cap to exactly the cap (direction kept), and leaves the others' steps unchanged."""
    import geoopt

    from spinquant.rotation import bound_step_angles, step_angles

    g = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(3, 12, 12, generator=g, dtype=torch.float64))[0]
    grad = torch.randn(3, 12, 12, generator=g, dtype=torch.float64) * torch.tensor([0.01, 0.1, 0.3], dtype=torch.float64)[:, None, None]
    lr, cap = 0.5, 0.3

    def step(grad_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.CanonicalStiefel())
        p.grad = grad_.clone()
        asked = bound_step_angles(p, lr, None)
        geoopt.optim.RiemannianSGD([p], lr=lr, stabilize=None).step()
        return p.detach(), asked

    plain, asked = step(grad)
    predicted = step_angles(x0, grad, lr)
    assert torch.allclose(_turn_angle(x0, plain), predicted, atol=1e-9) and asked == pytest.approx(predicted.max().item())
    assert predicted[0] < cap < predicted[1] < predicted[2]  # one step below the cap, two above

    p = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.CanonicalStiefel())
    p.grad = grad.clone()
    assert bound_step_angles(p, lr, cap) == pytest.approx(predicted.max().item())  # reports the unbounded angle
    geoopt.optim.RiemannianSGD([p], lr=lr, stabilize=None).step()
    turned = _turn_angle(x0, p.detach())
    assert torch.allclose(turned, torch.stack([predicted[0], torch.tensor(cap, dtype=torch.float64), torch.tensor(cap, dtype=torch.float64)]), atol=1e-9)
    assert torch.allclose(p.detach()[0], plain[0], atol=1e-12)  # below the cap: the plain step
    assert orthogonality_error(p.detach()[2]) < 1e-9
    # same direction: the capped step's Cayley generator A = 2 (Q - I)(Q + I)⁻¹ is a positive multiple of the plain one's
    eye = torch.eye(12, dtype=torch.float64)
    gen = lambda x: 2 * (x @ x0[2].T - eye) @ torch.linalg.inv(x @ x0[2].T + eye)  # noqa: E731
    a, b = gen(p.detach()[2]), gen(plain[2])
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 1 - 1e-6


def test_max_angle_is_checked_and_reaches_calibrate_and_learn_rotations(tiny_model_dir, corpus_file, tmp_path):
    with pytest.raises(Exception, match="max-angle 5.0"):
        LearnConfig(max_angle=5.0).check()
    out = tmp_path / "rot"
    r = CliRunner().invoke(cli, ["learn-rotations", "--model", str(tiny_model_dir), "--out", str(out), "--calib-data",
                                 str(corpus_file), "--steps", "3", "--batch-size", "2", "--seqlen", "48", "--lr", "20",
                                 "--max-angle", "0.01"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "losses.json").read_text())
    assert summary["config"]["max_angle"] == 0.01
    assert max(a for step in summary["step_angles"] for a in step) > 0.01  # lr 20 asks for more than the cap...
    start = Rotations.random_hadamard(load_model(tiny_model_dir), 0)
    learned = out / "learned" / "R.bin" if summary["held_out"]["kept"] == "start" else out / "R.bin"  # (random model: noise)
    moved = _turn_angle(start.r1, load_rbin(learned).r1)
    assert 0 < moved <= 3 * 0.01 + 1e-6  # ...and three capped steps turned R1 by at most 3 x the cap


def test_learning_that_worsens_the_held_out_loss_keeps_its_start(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Learning that went wrong (simulated: its channel scales thrown far off after the last step) is caught on windows
    learning never saw: R.bin (and scales) keep the random-Hadamard start, learned/ holds the learned ones, one line
    says so. A run that helps keeps what it learned and leaves no learned/ folder."""
    args = ["learn-rotations", "--model", str(tiny_model_dir), "--calib-data", str(corpus_file), "--nsamples", "4",
            "--seqlen", "48", "--steps", "2", "--batch-size", "2", "--w-bits", "4", "--a-bits", "4", "--loss", "kl", "--scales"]
    good = CliRunner().invoke(experimental, [*args, "--out", str(tmp_path / "good")])
    assert good.exit_code == 0, good.output
    held = json.loads((tmp_path / "good" / "losses.json").read_text())["held_out"]
    assert held["windows"] == 8 and held["kept"] == ("learned" if held["learned_loss"] <= held["start_loss"] else "start")
    assert (tmp_path / "good" / "learned").exists() == (held["kept"] == "start")

    run = RotationLearner.run

    def diverging_run(self, stop_after=None):
        run(self, stop_after)
        with torch.no_grad():
            for v in self.log_scales.values():
                v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) * 3)

    monkeypatch.setattr(RotationLearner, "run", diverging_run)
    out = tmp_path / "bad"
    r = CliRunner().invoke(experimental, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    held = json.loads((out / "losses.json").read_text())["held_out"]
    assert held["kept"] == "start" and held["learned_loss"] > 5 * held["start_loss"]
    assert "worse than their random-Hadamard start" in r.output and "learned/R.bin" in r.output
    start = Rotations.random_hadamard(load_model(tiny_model_dir), 0)
    kept, learned = load_rbin(out / "R.bin"), load_rbin(out / "learned" / "R.bin")
    assert (kept.r1 - start.r1).abs().max() < 1e-6 and max((a - b).abs().max() for a, b in zip(kept.r2, start.r2)) < 1e-6
    assert all(torch.allclose(s, torch.ones_like(s)) for s in kept.scales.up_out)  # the start's scales: 1
    assert max(s.log().abs().max() for s in learned.scales.up_out) > 3
