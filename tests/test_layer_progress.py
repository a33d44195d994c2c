"""A GPTQ run killed half way resumes after its last finished decoder layer (formats/layer_progress.py) and writes
exactly what an uninterrupted run writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import spinquant.quant.apply as apply
from spinquant.data import CalibrationSet
from spinquant.errors import SpinQuantError
from spinquant.formats.layer_progress import LayerProgress, default_folder
from spinquant.pipeline import quantize_to_run
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W

DEFAULT_GPTQ = dict(method="gptq", float_target=True, target_percdamp=0.1, scale_refit=True)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (a BaseException, so no handler in between catches it)."""


def _args(corpus_file, **kw):
    calib = CalibrationSet(source=str(corpus_file), nsamples=4, seqlen=32, seed=0)
    return dict(scheme=META_8DA4W, rotations="hadamard", calib=calib, progress=False, **kw)


def _count_gptq(monkeypatch) -> list[str]:
    """Names of the linear groups GPTQ quantizes from now on."""
    seen: list[str] = []
    real = apply._gptq_linears

    def counted(named, h, cfg):
        seen.append(named[0][0])
        return real(named, h, cfg)

    monkeypatch.setattr(apply, "_gptq_linears", counted)
    return seen


@pytest.mark.parametrize("streamed", [True, False])
def test_killed_run_resumes_after_its_last_finished_layer(tiny_model_dir, corpus_file, tmp_path, monkeypatch, streamed):
    if not streamed:  # the whole-model path (a source that cannot be read a layer at a time) resumes the same way
        from spinquant.formats.streamed import LayeredCheckpoint
        monkeypatch.setattr(LayeredCheckpoint, "open", staticmethod(lambda src: None))
    quantize_to_run(str(tiny_model_dir), str(tmp_path / "straight"), wq=WeightQuantConfig(**DEFAULT_GPTQ), **_args(corpus_file))
    assert not default_folder(tmp_path / "straight").exists()  # removed once the run directory is written

    real_save = LayerProgress.save

    def killed_after_first_layer(self, i, quantized, errors):
        real_save(self, i, quantized, errors)
        raise Killed

    monkeypatch.setattr(LayerProgress, "save", killed_after_first_layer)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        quantize_to_run(str(tiny_model_dir), str(out), wq=WeightQuantConfig(**DEFAULT_GPTQ), **_args(corpus_file))
    folder = default_folder(out)
    assert json.loads((folder / "progress.json").read_text())["layers_done"] == 1
    assert not out.exists()

    monkeypatch.setattr(LayerProgress, "save", real_save)
    seen = _count_gptq(monkeypatch)
    wq = WeightQuantConfig(**DEFAULT_GPTQ)
    quantize_to_run(str(tiny_model_dir), str(out), wq=wq, **_args(corpus_file))
    assert seen and not any(name.startswith("model.layers.0.") for name in seen)  # layer 0 was not quantized again
    assert any(name.startswith("model.layers.1.") for name in seen)
    a, b = load_file(tmp_path / "straight" / "quantized.safetensors"), load_file(out / "quantized.safetensors")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert set(wq.stats["output_error"]) == set(json.loads((tmp_path / "straight" / "quant_config.json").read_text())["output_error"])
    assert not folder.exists()


def test_progress_of_other_options_is_not_used(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = LayerProgress.save

    def killed(self, i, quantized, errors):
        real_save(self, i, quantized, errors)
        raise Killed

    monkeypatch.setattr(LayerProgress, "save", killed)
    with pytest.raises(Killed):
        quantize_to_run(str(tiny_model_dir), str(out), wq=WeightQuantConfig(**DEFAULT_GPTQ), **_args(corpus_file, seed=1))
    monkeypatch.setattr(LayerProgress, "save", real_save)
    seen = _count_gptq(monkeypatch)
    quantize_to_run(str(tiny_model_dir), str(out), wq=WeightQuantConfig(**DEFAULT_GPTQ), **_args(corpus_file, seed=0))
    assert any(name.startswith("model.layers.0.") for name in seen)  # another seed: every layer quantized again
    assert not default_folder(out).exists()


def test_foreign_folder_in_the_progress_place_is_refused_and_kept(tmp_path):
    folder = tmp_path / ".run.gptq-layers"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SpinQuantError, match="not a spinquant progress folder"):
        LayerProgress.open(folder, {"model": "x"})
    assert (folder / "notes.txt").read_text() == "mine"


def test_corrupt_layer_file_names_the_fix(tmp_path):
    progress = LayerProgress.open(tmp_path / "p", {"model": "x"})
    progress.save(0, {"mlp.down_proj": (torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1))}, {})
    again = LayerProgress.open(tmp_path / "p", {"model": "x"})
    assert again.layers_done == 1
    q, s = again.load(0)["mlp.down_proj"]
    assert q.dtype == torch.int8 and q.shape == (2, 4) and torch.equal(s, torch.ones(2, 1))
    (tmp_path / "p" / "layer_000.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SpinQuantError, match="remove .* to quantize every layer again"):
        again.load(0)
