"""The layer-streamed quantize (formats/streamed.py, spinquant/streaming.py) writes what the whole-model path writes."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from spinquant.data import CalibrationSet
from spinquant.errors import SpinQuantError
from spinquant.formats import load_model
from spinquant.formats.run_dir import quantized_state
from spinquant.formats.streamed import LayeredCheckpoint
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.pipeline import quantize_to_run
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.scheme import META_8DA4W
from spinquant.streaming import FloatReference, StreamedModel
from tests.helpers import make_tiny_family_model, make_tiny_model

DEFAULT_GPTQ = dict(method="gptq", float_target=True, target_percdamp=0.1, scale_refit=True)


def _save(model, out, **kw):
    model.save_pretrained(out, **kw)
    return out


def _whole(src, rotate: bool, cfg: dict, windows):
    model = load_model(src)
    if rotate:
        fuse_and_rotate(model, Rotations.random_hadamard(model, 0))
    return quantize_model(model, META_8DA4W, WeightQuantConfig(**cfg), windows, progress=False)


def _streamed(src, rotate: bool, cfg: dict, windows):
    checkpoint = LayeredCheckpoint.open(src)
    model = checkpoint.skeleton()
    assert all(p.is_meta for p in model.get_submodule("model.layers").parameters())  # no layer read yet
    prepare = StreamedModel(checkpoint, model, Rotations.random_hadamard(model, 0) if rotate else None, torch.device("cpu"))
    return quantize_model(model, META_8DA4W, WeightQuantConfig(**cfg), windows, progress=False, prepare=prepare)


def _assert_same(a, b):
    sa, sb = quantized_state(a), quantized_state(b)
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert not any(t.is_meta for t in [*b.parameters(), *b.buffers()])
    assert a.config.to_dict() == b.config.to_dict()


@pytest.mark.parametrize("case", ["llama-tied-bf16-sharded", "llama-untied", "qwen2", "qwen3", "phi3"])
def test_streamed_equals_whole(tmp_path, case):
    torch.manual_seed(0)
    if case.startswith("llama"):
        model = make_tiny_model(tie_word_embeddings=case == "llama-tied-bf16-sharded")
    else:
        model = make_tiny_family_model(case)
    kw = {}
    if case == "llama-tied-bf16-sharded":
        model = model.to(torch.bfloat16)
        kw = {"max_shard_size": "100KB"}
    src = _save(model, tmp_path / case, **kw)
    if kw:
        assert (src / "model.safetensors.index.json").is_file()
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    for rotate, cfg in ((True, DEFAULT_GPTQ), (False, {"method": "rtn"})):
        _assert_same(_whole(src, rotate, cfg, windows), _streamed(src, rotate, cfg, windows))


def test_quantize_command_streams(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """quantize_to_run on an HF directory never loads the whole float model, and writes the same tensors as with the
    whole-model path."""
    import spinquant.pipeline as pipeline

    calib = CalibrationSet(source=str(corpus_file), nsamples=4, seqlen=32, seed=0)
    args = dict(scheme=META_8DA4W, rotations="hadamard", calib=calib, progress=False)
    real_load = pipeline.load_model

    def no_whole_float_model(src, *a, **k):
        if str(src) == str(tiny_model_dir):
            raise AssertionError("the streamed path loaded the whole float model")
        return real_load(src, *a, **k)

    monkeypatch.setattr(pipeline, "load_model", no_whole_float_model)
    quantize_to_run(str(tiny_model_dir), str(tmp_path / "streamed"), wq=WeightQuantConfig(**DEFAULT_GPTQ), **args)
    monkeypatch.setattr(pipeline, "load_model", real_load)
    monkeypatch.setattr(LayeredCheckpoint, "open", staticmethod(lambda src: None))  # the whole-model path
    quantize_to_run(str(tiny_model_dir), str(tmp_path / "whole"), wq=WeightQuantConfig(**DEFAULT_GPTQ), **args)
    a, b = load_file(tmp_path / "streamed" / "quantized.safetensors"), load_file(tmp_path / "whole" / "quantized.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "streamed" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()


def test_incomplete_checkpoint_refused_before_quantizing(tmp_path):
    src = _save(make_tiny_model(), tmp_path / "m")
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpinQuantError, match="lack model.layers.1.mlp.down_proj.weight.*incomplete"):
        LayeredCheckpoint.open(src).skeleton()


def test_non_safetensors_sources_load_whole(tmp_path):
    (tmp_path / "config.json").write_text(make_tiny_model().config.to_json_string())
    assert LayeredCheckpoint.open(tmp_path) is None


def _captured_layer_inputs(model, windows, tokens):
    """Each decoder layer's input on ``windows[:, :tokens]``, from hooks on the whole model: (windows x tokens, dim)."""
    captured = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kw, i=i: captured.setdefault(i, []).append(
        (args[0] if args else kw["hidden_states"])[0, :tokens].detach().clone()), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for w in windows:
            model(w[None], use_cache=False)
    for h in hooks:
        h.remove()
    return [torch.cat(captured[i]) for i in sorted(captured)]


@pytest.mark.parametrize("family", ["llama", "llama-tied-bf16", "qwen3", "phi3"])
def test_float_reference_equals_whole_model(tmp_path, family):
    torch.manual_seed(0)
    model = make_tiny_family_model(family) if family in ("qwen3", "phi3") else make_tiny_model()  # tied
    if family == "llama-tied-bf16":
        model = model.to(torch.bfloat16)
    src = _save(model, tmp_path / family)
    windows = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    whole = load_model(src, untie=False)
    streamed = FloatReference.build(str(src), windows, probe=(2, 24))
    # the streamed reference keeps the output layer as the checkpoint stores it (computed in float32)
    assert streamed.head.weight.dtype == (torch.bfloat16 if family == "llama-tied-bf16" else torch.float32)
    for reference in (streamed,  # streamed from the shards
                      FloatReference(whole, windows, probe=(2, 24))):  # from a model in memory
        with torch.no_grad():
            for w in windows:
                assert torch.equal(reference(w[None]), whole(w[None], use_cache=False).logits)
        expected = _captured_layer_inputs(whole, windows[:2], 24)
        assert len(reference.residuals) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(reference.residuals, expected))
    with pytest.raises(RuntimeError, match="not built for"):
        reference(windows[:1, :20])


def test_stored_precision_linear_in_chunks(monkeypatch):
    """A bf16 linear computed a few output rows at a time gives the float32 linear's outputs, without a whole float32
    copy of its weight."""
    import spinquant.quant.primitives as primitives
    import spinquant.streaming as streaming

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1000, bias=True).to(torch.bfloat16)
    layer = streaming.StoredPrecisionLinear(linear)
    monkeypatch.setattr(primitives, "FIXED_LINEAR_CHUNK_ELEMENTS", 64 * 300)  # 4 chunks of at most 300 rows
    x = torch.randn(2, 7, 64)
    want = torch.nn.functional.linear(x, linear.weight.float(), linear.bias.float())
    got = layer(x)
    assert got.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[..., :300], torch.zeros_like(got[..., :300])) and got[..., 900:].abs().sum() > 0


def test_rotated_residual_statistics_from_the_float_stream(tmp_path):
    """The report's statistics "after R1" (the float stream times R1) are those of the rotated model's own stream."""
    from spinquant.report import residual_stats

    torch.manual_seed(0)
    src = _save(make_tiny_model(), tmp_path / "m")
    windows = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(3))
    rot = Rotations.random_hadamard(load_model(src), 0)
    reference = FloatReference.build(str(src), windows, probe=(2, 40))
    rotated = fuse_and_rotate(load_model(src), rot)
    got = residual_stats(reference.residuals, rot.r1)
    want = residual_stats(_captured_layer_inputs(rotated, windows, 40))
    for a, b in zip(got, want):
        for key in ("absmax", "max_over_median_channel", "kurtosis"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert got != residual_stats(reference.residuals)  # the rotation changes them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_tuning_with_the_streamed_teacher(tmp_path, dtype):
    """tune_scales against the layer-streamed float reference gives the scales it gives against the whole float model
    (a bf16 checkpoint: the reference's output layer stays bf16, the whole model's is upcast on loading)."""
    from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales

    torch.manual_seed(0)
    src = _save(make_tiny_model().to(dtype), tmp_path / "m")
    windows = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(4))
    tuned = []
    for teacher in (load_model(src), FloatReference.build(str(src), windows)):
        model = _whole(src, True, {"method": "rtn"}, None)
        tune_scales(model, teacher, windows, ScaleTuningConfig(steps=3, lr=1e-2), progress=False)
        tuned.append(quantized_state(model))
    assert all(torch.equal(tuned[0][k], tuned[1][k]) for k in tuned[0])
    assert not torch.equal(tuned[0]["lm_head.scales"], quantized_state(_whole(src, True, {"method": "rtn"}, None))["lm_head.scales"])


def test_hub_id_streams_from_its_cached_snapshot(tmp_path, monkeypatch):
    """A hub id is read layer by layer from its snapshot in the Hugging Face cache (offline here: the cache is all
    there is); an id the cache lacks gives None (the whole-model loader then says what is wrong)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    snapshot = _save(make_tiny_model(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    checkpoint = LayeredCheckpoint.open("someone/tiny-llama")
    assert checkpoint is not None and checkpoint.folder.resolve() == snapshot.resolve()
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(5))
    _assert_same(_whole(snapshot, True, {"method": "rtn"}, windows), _streamed("someone/tiny-llama", True, {"method": "rtn"}, windows))
    assert LayeredCheckpoint.open("someone/not-cached") is None
