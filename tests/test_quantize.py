"""Quantization core end to end: ExecuTorch's eager model agrees, GPTQ beats RTN, run dirs, CLI, bad input."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from spinquant.cli import cli
from spinquant.data import CalibrationSet, calibration_windows
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.formats import load_model, load_tokenizer
from spinquant.formats.hf import untie_embeddings
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.fake_quant import QuantLinear, make_fake_quant, quant_linears
from spinquant.quant.primitives import dequantize_weight, quantize_weight
from spinquant.quant.range_setting import choose_scales
from spinquant.quant.scheme import META_8DA4W, QuantScheme
from tests.helpers import rel_diff


def executorch_eager(ckpt_dir, mode="8da4w_output_8da8w", group=32, spin=True):
    """ExecuTorch's own eager Llama (examples.models.llama), built from our checkpoint as export_llama builds it."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers llama.fast_hadamard_transform
    from executorch.examples.models.llama.model import Llama2Model
    from executorch.examples.models.llama.source_transformation.spin_quant import (
        inject_fast_hadamard_transform_native_for_spin_quant)
    from executorch.extension.llm.export.config.llm_config import LlmConfig, ModelType, PreqMode, SpinQuant

    cfg = LlmConfig()
    cfg.base.model_class = ModelType("llama3_2")
    cfg.base.checkpoint = str(ckpt_dir / "consolidated.00.pth")
    cfg.base.params = str(ckpt_dir / "params.json")
    cfg.base.preq_mode = PreqMode(mode)
    cfg.base.preq_group_size = group
    cfg.base.preq_embedding_quantize = "8,0"
    cfg.quantization.use_spin_quant = SpinQuant("native")
    cfg.debug.generate_full_logits = True
    model = Llama2Model(cfg).model_
    return (inject_fast_hadamard_transform_native_for_spin_quant(model) if spin else model).eval()


@pytest.mark.parametrize("rotated", [True, False])
def test_fake_quant_equals_executorch_eager(tiny_model, tmp_path, rotated):
    from spinquant.formats.executorch import write_executorch_checkpoint

    model = untie_embeddings(tiny_model)
    if rotated:
        fuse_and_rotate(model, Rotations.random_hadamard(model, 0))
    calib = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    quantize_model(model, META_8DA4W, WeightQuantConfig(method="gptq"), calib, progress=False)
    write_executorch_checkpoint(model, META_8DA4W, tmp_path)
    et = executorch_eager(tmp_path, spin=rotated)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, et(ids)
    assert theirs.shape == ours.shape
    assert rel_diff(theirs, ours) < 1e-5


@pytest.fixture(scope="module")
def ref_gptq(ref_model_dir, wikitext_valid_file):
    """GPTQ (with range setting) of the rotated reference model on a small calibration set."""
    model = load_model(ref_model_dir)
    fuse_and_rotate(model, Rotations.random_hadamard(model, 0))
    windows = calibration_windows(CalibrationSet(source=str(wikitext_valid_file), nsamples=8, seqlen=256),
                                  load_tokenizer(ref_model_dir), use_cache=False)
    cfg = WeightQuantConfig(method="gptq", clip_search=True, compare_rtn=True)
    quantize_model(model, META_8DA4W, cfg, windows, progress=False)
    return model, cfg


def test_gptq_output_error_below_rtn_for_every_block_linear(ref_gptq):
    model, cfg = ref_gptq
    errors = cfg.stats["output_error"]
    block = [n for n, _ in quant_linears(model) if n != "lm_head"]
    assert len(block) == 12 * 7 and set(block) <= set(errors)
    worse = {n: e for n, e in errors.items() if n in block and not e["gptq"] < e["rtn"]}
    assert not worse, worse
    ratio = sum(e["gptq"] for n, e in errors.items() if n in block) / sum(e["rtn"] for n, e in errors.items() if n in block)
    assert ratio < 0.8


def test_range_setting_lowers_rtn_weight_error(ref_model_dir):
    model = load_model(ref_model_dir)
    fuse_and_rotate(model, Rotations.random_hadamard(model, 0))
    for layer in model.model.layers:
        for name, lin in layer.named_modules():
            if not isinstance(lin, torch.nn.Linear):
                continue
            w = lin.weight.detach()
            errs = []
            for clip in (False, True):
                s = choose_scales(w, 4, 32, clip)
                errs.append((dequantize_weight(quantize_weight(w, s, 4, 32), s, 32) - w).pow(2).sum().item())
            assert errs[1] < errs[0], (name, errs)


def test_quantize_cli_run_dir_eval_and_verification(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--calib-data", str(corpus_file),
                                 "--gptq-nsamples", "4", "--seqlen", "64"])
    assert r.exit_code == 0, r.output
    assert {"quantized.safetensors", "quant_config.json", "config.json", "R.bin", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc["scheme"]["w_bits"] == 4 and qc["method"] == "gptq" and qc["calibration"]["nsamples"] == 4
    assert "torch" in qc["versions"]
    model = load_model(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    q = model.model.layers[0].self_attn.q_proj.qweight
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    ev = CliRunner().invoke(cli, ["eval", "--model", str(out), "--reference", str(tiny_model_dir), "--data", str(corpus_file),
                                  "--seqlen", "64", "--max-windows", "2", "--json"])
    assert ev.exit_code == 0, ev.output
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert res["kl"] > 0 and 0 < res["top1"] <= 1
    assert qc["gptq_target"] == "layer"
    # --gptq-objective float (other integers): recorded (as gptq_target, the record's name), changes the result
    for option, value, attr in (("--gptq-objective", "float", "qweight"),):
        other = tmp_path / f"run_{value}"
        r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(other), "--calib-data", str(corpus_file),
                                     "--gptq-nsamples", "4", "--seqlen", "64", option, value])
        assert r.exit_code == 0, r.output
        assert json.loads((other / "quant_config.json").read_text())["gptq_target"] == value
        assert not torch.equal(getattr(load_model(other).model.layers[1].mlp.up_proj, attr),
                               getattr(load_model(out).model.layers[1].mlp.up_proj, attr))
    # the float target's damping: the default recorded, another value recorded and other integers, a bad one refused
    assert qc["target_percdamp"] is None  # plain GPTQ: nothing fitted, nothing damped
    assert json.loads((tmp_path / "run_float" / "quant_config.json").read_text())["target_percdamp"] == 0.1
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run_damp"), "--calib-data",
                                 str(corpus_file), "--gptq-nsamples", "4", "--seqlen", "64", "--gptq-objective", "float",
                                 "--gptq-objective-damp", "0.01"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run_damp" / "quant_config.json").read_text())["target_percdamp"] == 0.01
    assert not torch.equal(load_model(tmp_path / "run_damp").model.layers[1].mlp.up_proj.qweight,
                           load_model(tmp_path / "run_float").model.layers[1].mlp.up_proj.qweight)
    # --gptq-refit-scales: the same integers as plain GPTQ, other scales, recorded
    assert qc["scale_refit"] is False
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run_refit"), "--calib-data",
                                 str(corpus_file), "--gptq-nsamples", "4", "--seqlen", "64", "--gptq-refit-scales"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run_refit" / "quant_config.json").read_text())["scale_refit"] is True
    refit, plain = load_model(tmp_path / "run_refit").model.layers[0].self_attn.q_proj, load_model(out).model.layers[0].self_attn.q_proj
    assert torch.equal(refit.qweight, plain.qweight) and not torch.equal(refit.scales, plain.scales)
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run_neg"), "--calib-data",
                                 str(corpus_file), "--gptq-objective-damp", "-0.1"])
    assert r.exit_code == 2 and "--gptq-objective-damp -0.1: damping must be a number >= 0" in r.output, r.output
    assert not (tmp_path / "run_neg").exists()

def test_w4a4kv4_rtn_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--method", "rtn",
                                 "--a-bits", "4", "--kv-bits", "4", "--group-size", "0"])
    assert r.exit_code == 0, r.output
    model = load_model(out)
    assert model.config._attn_implementation == "spinquant_sdpa"
    assert model.model.layers[0].self_attn.spinquant_kv_bits == 4 and model.model.layers[0].self_attn.spinquant_r3


@pytest.mark.parametrize("args,message", [
    (["--group-size", "48"], "group size 48 is not supported"),
    (["--w-bits", "5"], "w_bits=5 is not supported"),
    (["--a-bits", "6"], "a_bits=6 is not supported"),
    (["--kv-bits", "2"], "kv_bits=2 is not supported"),
    (["--group-size", "256"], "group size 256 does not divide the model's hidden_size (64)"),
    (["--rotations", "/no/such/R.bin"], "--rotations /no/such/R.bin"),
])
def test_bad_quantize_input(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--method", "rtn", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert message in r.output, r.output
    assert not out.exists()


def test_recorded_rtn_results_match_notes(ref_model_dir, wikitext_test_file):
    """Sanity anchor against ../shared/notes/rotation-effects.md: RTN W4A8 on 8 windows gives KL ~0.021 there."""
    from spinquant.evaluate import evaluate, evaluation_ids, evaluation_windows, hf_logits_fn

    base = load_model(ref_model_dir)
    windows = evaluation_windows(evaluation_ids(load_tokenizer(ref_model_dir), str(wikitext_test_file)), 1024, 2)
    model = quantize_model(copy.deepcopy(base), META_8DA4W, WeightQuantConfig(method="rtn", clip_search=False))
    r = evaluate(hf_logits_fn(model), windows, hf_logits_fn(base), progress=False)
    assert 0.01 < r.kl < 0.04 and r.top1 > 0.8


def test_float_output_mode_equals_executorch_eager(tiny_model, tmp_path):
    from spinquant.formats.executorch import write_executorch_checkpoint

    scheme = QuantScheme(output_w_bits=16, output_a_bits=16)
    model = untie_embeddings(tiny_model)
    fuse_and_rotate(model, Rotations.random_hadamard(model, 1))
    quantize_model(model, scheme, WeightQuantConfig(method="rtn"), progress=False)
    assert write_executorch_checkpoint(model, scheme, tmp_path) == "8da4w"
    assert torch.load(tmp_path / "consolidated.00.pth", weights_only=True)["output.weight"].dtype == torch.float32
    et = executorch_eager(tmp_path, mode="8da4w")
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_diff(et(ids), model(ids).logits) < 1e-5


def test_fixed_layers_hold_integers_only_and_forward_is_unchanged(tiny_model):
    """A fixed QuantLinear keeps int8 + scales, no float32 copy (1B/3B memory); its forward is q * s exactly."""
    model = quantize_model(untie_embeddings(copy.deepcopy(tiny_model)), META_8DA4W, WeightQuantConfig(method="rtn"))
    x = torch.randn(2, 5, tiny_model.config.hidden_size)
    for name, lin in quant_linears(model):
        assert lin.weight is None and lin.qweight.dtype == torch.int8, name
        assert f"{name}.weight" not in dict(model.named_parameters())
    lin = model.model.layers[0].self_attn.q_proj
    expected = torch.nn.functional.linear(lin.quantize_input(x), dequantize_weight(lin.qweight, lin.scales, 32))
    assert torch.equal(lin(x), expected)
    blocks = [m for n, m in quant_linears(model) if n != "lm_head"]
    held = sum(t.numel() * t.element_size() for m in blocks for t in (m.qweight_storage, m.scales))
    assert held == sum(m.in_features * m.out_features * (1 / 2 + 4 / 32) for m in blocks)  # int4 two a byte + group scales
    packed = lin.qweight_storage
    assert packed.dtype == torch.uint8 and packed.shape == (lin.out_features, lin.in_features // 2)
    assert model.lm_head.qweight_storage.dtype == torch.int8  # 8-bit: one a byte


def test_gptq_in_row_chunks_equals_whole(tiny_model, monkeypatch):
    """GPTQ/RTN over row chunks (bounded memory for a 128256-row output layer) gives the integers of one pass."""
    import spinquant.quant.apply as apply

    windows = torch.randint(0, tiny_model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for chunk in (1 << 25, 3 * tiny_model.config.hidden_size + 5):  # whole matrices; pieces cutting across q/k/v
        monkeypatch.setattr(apply, "GPTQ_CHUNK_ELEMENTS", chunk)
        cfg = WeightQuantConfig(method="gptq")
        m = quantize_model(untie_embeddings(copy.deepcopy(tiny_model)), META_8DA4W, cfg, windows, progress=False)
        results.append(({n: (lin.qweight, lin.scales) for n, lin in quant_linears(m)}, m.model.embed_tokens.qweight, cfg.stats))
    (whole, emb_whole, stats_whole), (chunked, emb_chunked, stats_chunked) = results
    assert torch.equal(emb_whole, emb_chunked)
    for name, (q, s) in whole.items():
        assert (chunked[name][0] == q).float().mean() > 0.999, name
        assert torch.allclose(chunked[name][1], s, rtol=1e-5), name
    errs = stats_whole["output_error"]
    assert all(stats_chunked["output_error"][n]["gptq"] == pytest.approx(e["gptq"], rel=1e-3) for n, e in errs.items())


def test_row_chunked_fusion_equals_whole(tiny_model, monkeypatch):
    import spinquant.fusion as fusion

    rot = Rotations.random_hadamard(tiny_model, 0)
    whole = fuse_and_rotate(untie_embeddings(copy.deepcopy(tiny_model)), rot)
    monkeypatch.setattr(fusion, "ROW_CHUNK_ELEMENTS", 7 * tiny_model.config.hidden_size)
    chunked = fuse_and_rotate(untie_embeddings(copy.deepcopy(tiny_model)), rot)
    for (name, a), (_, b) in zip(whole.named_parameters(), chunked.named_parameters()):
        assert rel_diff(b, a) < 1e-6, name


def test_float_target_least_squares_undoes_a_known_input_distortion():
    """GPTQ's float target W* = W C H̃⁻¹ maps the distorted inputs x̃ = x M back onto the float outputs W x."""
    from spinquant.quant.apply import CrossAccumulator, least_squares_target
    from spinquant.quant.gptq import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    x_float = torch.randn(600, 16, generator=g)
    m = torch.eye(16) + 0.2 * torch.randn(16, 16, generator=g)  # rows are tokens: x̃ = x M
    x_quant = x_float @ m
    acc, plain = CrossAccumulator(16), HessianAccumulator(16)
    for part in range(0, 600, 250):  # uneven batches: the running normalisation must match
        acc.add(x_float[part : part + 250], x_quant[part : part + 250])
        plain.add(x_quant[part : part + 250])
    assert torch.allclose(acc.h, plain.h, rtol=1e-5, atol=1e-6)
    target = least_squares_target(w, acc.c, acc.h, percdamp=0.0)
    assert torch.allclose(target, w @ torch.linalg.inv(m).T, rtol=1e-3, atol=1e-4)
    assert rel_diff(x_quant @ target.T, x_float @ w.T) < 1e-4
    undamped_same = least_squares_target(w, plain.h, plain.h, percdamp=0.0)  # no distortion: W itself
    assert torch.allclose(undamped_same, w, atol=1e-4)
    # the ridge damping λ = percdamp x mean diag(H̃) pulls W* towards W (not towards 0), as the closed form says
    lam = 0.1 * torch.mean(torch.diag(acc.h.double()))
    closed = w.double() + w.double() @ (acc.c.double() - acc.h.double()) @ torch.linalg.inv(acc.h.double() + lam * torch.eye(16))
    assert torch.allclose(least_squares_target(w, acc.c, acc.h, percdamp=0.1).double(), closed, rtol=1e-5, atol=1e-6)
    assert rel_diff(least_squares_target(w, acc.c, acc.h, percdamp=1e6), w) < 1e-4


def test_float_target_gptq_runs_every_linear_and_exports(tiny_model, tmp_path):
    """GPTQ with the float target fixes every quantized linear to integers, ExecuTorch's eager model agrees with it,
    and it moves the weights off plain GPTQ's (the layers after the first see a different, float, target)."""
    from spinquant.formats.executorch import write_executorch_checkpoint

    windows = torch.randint(0, tiny_model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    fused = untie_embeddings(copy.deepcopy(tiny_model))
    fuse_and_rotate(fused, Rotations.random_hadamard(fused, 0))
    plain = quantize_model(copy.deepcopy(fused), META_8DA4W, WeightQuantConfig(method="gptq"), windows, progress=False)
    model = quantize_model(fused, META_8DA4W, WeightQuantConfig(method="gptq", float_target=True), windows, progress=False)
    ours = dict(quant_linears(model))
    assert all(lin.weight_mode == "fixed" for lin in ours.values())
    changed = [n for n, lin in quant_linears(plain) if not torch.equal(lin.qweight, ours[n].qweight)]
    assert "model.layers.1.self_attn.q_proj" in changed and "lm_head" in changed
    write_executorch_checkpoint(model, META_8DA4W, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(executorch_eager(tmp_path)(ids), model(ids).logits) < 1e-5


@pytest.mark.parametrize("group", [32, None])
def test_scale_refit_is_the_least_squares_scales_for_fixed_integers(group):
    """refit_group_scales: per row, the scales equal a direct least-squares solve on the inputs X (integers fixed,
    one unknown per group), the output error on X never grows, a group whose integers are all zero keeps its scale,
    and per channel (group None) it is one scale per row."""
    from spinquant.quant.apply import output_error
    from spinquant.quant.gptq import HessianAccumulator, gptq_quantize
    from spinquant.quant.scale_refit import refit_group_scales

    torch.manual_seed(0)
    x = torch.randn(2048, 128, dtype=torch.float64) * torch.linspace(0.2, 3.0, 128, dtype=torch.float64)
    x[:, 7] *= 30  # one massive channel, as after norm fusion
    acc = HessianAccumulator(128)
    acc.add(x)
    w = torch.randn(24, 128)
    q, s = gptq_quantize(w, acc.h, 4, group)
    q[0, :32] = 0  # an all-zero group
    s2 = refit_group_scales(w, q, s, acc.h, group, ridge=0.0)
    g = group or 128
    assert s2.shape == s.shape == (24, 128 // g) and s2.dtype == torch.float32
    for r in range(1, 24, 5):
        m = torch.zeros(128, 128 // g, dtype=torch.float64)
        for k in range(128 // g):
            m[k * g:(k + 1) * g, k] = q[r, k * g:(k + 1) * g].double()
        direct = torch.linalg.lstsq(x @ m, x @ w[r].double()).solution
        assert torch.allclose(s2[r].double(), direct, rtol=1e-4, atol=1e-7)
    if group:
        assert s2[0, 0] == s[0, 0]
    before = output_error(w, dequantize_weight(q, s, group), acc.h)
    after = output_error(w, dequantize_weight(q, s2, group), acc.h)
    assert after < 0.99 * before


def test_group_normal_matrices_match_their_definition():
    """A[r, k, l] = Σ_{a∈k, c∈l} q_ra H_ac q_rc, computed group by group in float32, against float64 einsum."""
    from spinquant.quant.scale_refit import group_normal_matrices

    torch.manual_seed(0)
    x = torch.randn(512, 96, dtype=torch.float64)
    x[:, 5] *= 40
    h = x.T @ x / 512
    q = torch.randint(-8, 8, (7, 96), dtype=torch.int8)
    qg = q.double().reshape(7, 3, 32)
    want = torch.einsum("rki,kilj,rlj->rkl", qg, h.reshape(3, 32, 3, 32), qg)
    got = group_normal_matrices(q, h.float(), 32)
    assert got.dtype == torch.float32 and got.shape == (7, 3, 3)
    assert torch.equal(got, got.transpose(1, 2))
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6


def test_scale_refit_in_gptq_lowers_every_linears_output_error_and_exports(tiny_model, tmp_path):
    """WeightQuantConfig.scale_refit: GPTQ's integers stay, only the scales move; every quantized linear's calibration
    output error is at most GPTQ's without the refit (recorded side by side), and the export still agrees with
    ExecuTorch's eager model."""
    from spinquant.formats.executorch import write_executorch_checkpoint

    windows = torch.randint(0, tiny_model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    fused = untie_embeddings(copy.deepcopy(tiny_model))
    fuse_and_rotate(fused, Rotations.random_hadamard(fused, 0))
    cfg = WeightQuantConfig(method="gptq", scale_refit=True, compare_rtn=True)
    model = quantize_model(fused, META_8DA4W, cfg, windows, progress=False)
    errors = cfg.stats["output_error"]
    assert len(errors) == len(list(quant_linears(model)))
    for name, e in errors.items():
        assert e["gptq"] <= e["gptq_before_refit"] * (1 + 1e-6), name
    assert sum(e["gptq"] for e in errors.values()) < 0.995 * sum(e["gptq_before_refit"] for e in errors.values())
    write_executorch_checkpoint(model, META_8DA4W, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(executorch_eager(tmp_path)(ids), model(ids).logits) < 1e-5


