"""Beyond Llama: Qwen2.5 (q/k/v biases), Qwen3 (per-head q/k norms) and Phi-4-mini (fused qkv/gate_up, partial rotary),
each a tiny random model with its family's real head_dim and GQA ratio (tests/helpers.FAMILY_SHAPES), through
rotation (exact in transformers' own class), the learner's graph, learning with resume, calibrate to a verified .pte;
models no map covers are refused in one line."""

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, Lfm2Config, LlavaConfig, MixtralConfig, Qwen3MoeConfig,
                          Qwen3NextConfig)

from spinquant.architectures import architecture_of
from spinquant.cli import cli
from spinquant.data import CalibrationSet
from spinquant.formats import load_model
from spinquant.formats.hf import untie_embeddings
from spinquant.formats.rbin import load_rbin
from spinquant.fusion import Rotations, apply_rotations, fuse_and_rotate, fuse_norms
from spinquant.hadamard import apply_hadamard, hadamard_factors
from spinquant.pipeline import learn_rotations
from spinquant.rotation import LearnConfig, rotated_weights
from tests.helpers import CORPUS, FAMILY_SHAPES, make_tiny_family_model, make_tiny_tokenizer, rel_diff

FAMILIES = sorted(FAMILY_SHAPES)


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> an HF directory (model + tokenizer) of the tiny random model; and a corpus file."""
    root = tmp_path_factory.mktemp("families")
    tok = make_tiny_tokenizer()
    dirs = {}
    for fam in FAMILIES:
        dirs[fam] = root / fam
        make_tiny_family_model(fam).save_pretrained(dirs[fam])
        tok.save_pretrained(dirs[fam])
    (root / "corpus.txt").write_text(CORPUS)
    dirs["corpus"] = root / "corpus.txt"
    return dirs


@pytest.mark.parametrize("r4", ["on", "off"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rotate_is_exact_in_the_familys_own_class(family_dirs, tmp_path, family, r4):
    out = tmp_path / "rot"
    r = _invoke("rotate", "--model", family_dirs[family], "--out", out, *(["--r4", "on"] if r4 == "on" else ["--no-r4"]))
    assert r.exit_code == 0, r.output
    original = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
    # without R4 the output is a plain model of the family (no spinquant code); with R4 spinquant adds the online half
    rotated = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval() if r4 == "off" else load_model(out)
    assert type(rotated).__name__ == type(original).__name__ == architecture_of(original.config).model_class.__name__
    ids = torch.randint(0, original.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_diff(rotated(ids).logits, original(ids).logits) <= 1e-4
    if family == "qwen2":  # the v bias turned with v_proj's rows: it is no longer the original one
        name = "model.layers.0.self_attn.v_proj.bias"
        assert not torch.allclose(dict(rotated.named_parameters())[name], dict(original.named_parameters())[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_learners_rotated_weights_equal_fusion(family):
    """The learner's differentiable graph (rows of fused linears, biases) computes what fusion writes."""
    model = untie_embeddings(make_tiny_family_model(family)).double()
    fuse_norms(model)
    apply_rotations(model, Rotations(r4=True))
    arch, cfg = architecture_of(model.config), model.config
    params = dict(model.named_parameters())
    base = {k: v.detach().clone() for k, v in params.items() if ".mlp." in k or (".self_attn." in k and "norm" not in k)}
    base[f"{arch.head}.weight"] = params[f"{arch.head}.weight"].detach().clone()
    rot = Rotations.random_hadamard(model, 3, r4=False)
    hd = rot.r2[0].shape[0]
    got = rotated_weights(arch, base, rot.r1, torch.stack(rot.r2), cfg.num_hidden_layers, hd, rows=arch.output_rows(cfg))
    apply_rotations(model, rot)
    want = dict(model.named_parameters())
    assert set(got) == {k for k in base if k.endswith(".weight")} | {k for k in base if k.endswith("v_proj.bias")}
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=1e-12), k


@pytest.mark.parametrize("family", FAMILIES)
def test_sublayer_starts_are_the_linears_run_first_after_each_folded_norm(family):
    """Where the CPU tuning trims its heap: the attention's and the MLP's first linear, in the family's own forward."""
    model = make_tiny_family_model(family)
    arch = architecture_of(model.config)
    layer = arch.decoder_layers(model)[0]
    norms = {lin.norm for lin in arch.linears if lin.norm is not None}
    calls = []
    for name in arch.block_linears():
        layer.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    for name in norms:
        layer.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 8)))
    after_norms = tuple(calls[i + 1] for i, c in enumerate(calls) if c in norms)
    assert len(after_norms) == 2 and arch.sublayer_starts() == after_norms


def test_learned_rotations_on_qwen2_resume_and_keep_the_function(family_dirs, tmp_path):
    """Learning on a family with biases: a run killed half way resumes to the same rotations, which stay exact."""
    def learn(out, stop_after=None):
        cfg = LearnConfig(steps=4, batch_size=2, micro_batch=1, a_bits=4, save_every=2)
        calib = CalibrationSet(source=str(family_dirs["corpus"]), nsamples=8, seqlen=48)
        return learn_rotations(str(family_dirs["qwen2"]), str(out), cfg, calib, device="cpu", progress=False,
                               stop_after=stop_after)

    full = learn(tmp_path / "full")
    assert not learn(tmp_path / "resumed", stop_after=2)["finished"]
    rest = learn(tmp_path / "resumed")
    assert full["finished"] and rest["finished"] and rest["resumed_from"] == 2
    a, b = load_rbin(tmp_path / "full" / "R.bin"), load_rbin(tmp_path / "resumed" / "R.bin")
    assert (a.r1 - b.r1).abs().max() < 1e-5
    start = Rotations.random_hadamard(load_model(family_dirs["qwen2"]), 0)
    assert (a.r1 - start.r1).abs().max() > 1e-4  # learning moved R1
    original = load_model(family_dirs["qwen2"])
    rotated = fuse_and_rotate(load_model(family_dirs["qwen2"]), a)
    ids = torch.randint(0, original.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(rotated(ids).logits, original(ids).logits) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrate_makes_a_verified_pte(family_dirs, tmp_path, family):
    """No-learning route to executorch's own export_llama (the family's --model) and its runtime (about a minute)."""
    out = tmp_path / "run"
    corpus = family_dirs["corpus"]
    r = _invoke("calibrate", "--model", family_dirs[family], "--out", out, "--calib-data", corpus, "--eval-data", corpus,
                "--rotations", "hadamard", "--seqlen", "64", "--gptq-nsamples", "4", "--set", "eval_windows=2",
                "--set", "tune_scales_steps=8")
    assert r.exit_code == 0, r.output
    ver = json.loads((out / "verification.json").read_text())
    assert ver["verified"] and ver["spin_quant"] is True and (out / "model.pte").is_file()
    arch = architecture_of(load_model(family_dirs[family]).config)
    assert f"--model {arch.executorch_model} " in ver["export"]["command"]
    params = json.loads((out / "params.json").read_text())
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert params["use_hf_rope"] is True
    for meta in ("wq", "wk", "wv", "wo"):
        assert sd[f"layers.1.attention.{meta}.weight"].dtype == torch.int8
    assert {"layers.1.feed_forward.w1.scales", "layers.1.feed_forward.w3.scales"} <= set(sd)
    if family == "qwen2":
        assert params["attention_qkv_bias"] is True and sd["layers.0.attention.wv.bias"].shape == (64,)
    if family == "qwen3":
        assert params["use_qk_norm"] and params["qk_norm_before_rope"] and params["head_dim"] == 128
        assert not torch.equal(sd["layers.0.attention.q_norm_fn.weight"], torch.ones(128))  # the model's own norm
    if family == "phi3":
        assert params["partial_rotary_factor"] == 0.75 and len(params["rope_scaling_short_factor"]) == 48
        assert sd["layers.0.attention.wq.weight"].shape == (384, 384) and sd["layers.0.attention.wv.weight"].shape == (128, 384)
        # another target from the same rotations (no learning): the fused linears split the same way at group 64
        r = _invoke("requantize", "--from", out, "--target", "xnnpack-8da4w-g64", "--out", tmp_path / "g64", "--no-pte")
        assert r.exit_code == 0, r.output
        g64 = torch.load(tmp_path / "g64" / "consolidated.00.pth", weights_only=True)
        assert g64["layers.0.attention.wk.scales"].shape == (128, 384 // 64)


def _config_dir(tmp_path, config) -> str:
    d = tmp_path / config.model_type
    config.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("config,reason", [
    (Qwen3MoeConfig(num_hidden_layers=1), "mixture-of-experts"),
    (MixtralConfig(num_hidden_layers=1), "mixture-of-experts"),
    (LlavaConfig(), "vision tower"),
    (Qwen3NextConfig(num_hidden_layers=4), "mixture-of-experts"),  # hybrid too: the first reason is given
    (Lfm2Config(num_hidden_layers=2, layer_types=["conv", "full_attention"]), "hybrid model with conv layers"),
    (Gemma3TextConfig(num_hidden_layers=1), "post-attention and post-feedforward RMSNorms"),
])
def test_models_no_map_covers_are_refused_in_one_line(tmp_path, corpus_file, config, reason):
    src = _config_dir(tmp_path, config)
    for args in (["calibrate", "--model", src, "--out", tmp_path / "out", "--calib-data", corpus_file],
                 ["rotate", "--model", src, "--out", tmp_path / "out"]):
        r = _invoke(*args)
        assert r.exit_code == 2 and reason in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "out").exists()


def test_corrupt_tokenizer_is_named_corrupt(family_dirs, tmp_path, corpus_file):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(family_dirs["qwen3"], src)
    text = (src / "tokenizer.json").read_text()
    (src / "tokenizer.json").write_text(text[: len(text) // 2])  # truncated by an interrupted copy
    r = _invoke("calibrate", "--model", src, "--out", tmp_path / "out", "--calib-data", corpus_file)
    assert r.exit_code == 2 and "tokenizer.json" in r.output and "corrupt or truncated" in r.output, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n,m", [(896, 28), (4864, 76), (8960, 140), (2560, 20), (9728, 76), (1152, 36), (6912, 108),
                                 (18944, 148), (3584, 28), (3072, 12), (11008, 344)])
def test_hadamard_orders_of_these_families(n, m):
    """The sizes real Qwen/Phi/Gemma configs need: built as Paley(m) x Sylvester, applied fast, orthonormal."""
    assert hadamard_factors(n)[0] == m
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = apply_hadamard(x)
    assert torch.allclose(y @ y.T, x @ x.T, rtol=1e-10, atol=1e-8)  # inner products kept: orthogonal on these vectors
    assert (y - x).abs().max() > 0.1  # and not the identity


def test_every_published_config_of_these_families_passes_preflight_or_is_refused_with_its_reason():
    """docs/families.md's table (scripts/family_table.py): the real shapes, checked by spinquant's own preflight."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import family_table

    rows = {name: family_table.row(name) for name in family_table.REAL_CONFIGS}
    refused = {name for name, r in rows.items() if r["preflight"] != "passes"}
    assert refused == {"Gemma-3-1B"} and "RMSNorms sit between o_proj/down_proj" in rows["Gemma-3-1B"]["preflight"]
    assert all(r[".pte"] == "yes" for name, r in rows.items() if name not in refused)
    # R4 runs online only where ExecuTorch's fast_hadamard_transform can compute it (powers of two)
    assert rows["Phi-4-mini"]["online"].startswith("R4") and rows["Qwen2.5-0.5B"]["online"].startswith("none")
    assert rows["Qwen2.5-3B"]["R4 (intermediate)"] == "11008 = 344x32"
