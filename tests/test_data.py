"""Calibration data: local formats offline, deterministic sampling, chat templates, caching, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from spinquant.data import (CalibrationSet, calibration_windows, load_calibration_set, load_rows, rows_to_texts,
                            sample_windows, with_overrides)
from spinquant.errors import SpinQuantError


def test_text_file_rows_match_wikitext_hub_rows(tmp_path):
    f = tmp_path / "w.raw"
    f.write_text(" = Title = \n \n A line .\n")
    assert [r["text"] for r in load_rows(str(f))] == [" = Title = \n", "", " A line .\n"]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "folder"])
def test_each_local_format_loads_offline(fmt, tmp_path, tiny_tokenizer):
    import datasets

    assert datasets.config.HF_DATASETS_OFFLINE
    lines = [f"Sentence number {i} about the valley and the river." for i in range(200)]
    if fmt == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps({"text": l, "id": i}) for i, l in enumerate(lines)))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"text": lines}).to_parquet(str(path))
    else:
        path = tmp_path / "folder"
        path.mkdir()
        (path / "a.txt").write_text("\n".join(lines[:100]) + "\n")
        (path / "b.txt").write_text("\n".join(lines[100:]) + "\n")
    calib = CalibrationSet(source=str(path), nsamples=4, seqlen=32)
    w = calibration_windows(calib, tiny_tokenizer)
    assert w.shape == (4, 32) and w.dtype == torch.int64
    assert (w[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert "valley" in tiny_tokenizer.decode(w[0])


def test_sampling_deterministic_across_processes_and_seed_sensitive(corpus_file, tiny_model_dir):
    code = (
        "import os,sys,hashlib; os.environ['HF_DATASETS_OFFLINE']='1'; os.environ['SPINQUANT_CACHE_DIR']=sys.argv[3];"
        "from transformers import AutoTokenizer; from spinquant.data import CalibrationSet, calibration_windows;"
        "tok=AutoTokenizer.from_pretrained(sys.argv[1]);"
        "w=calibration_windows(CalibrationSet(source=sys.argv[2], nsamples=8, seqlen=64, seed=int(sys.argv[4])), tok, use_cache=False);"
        "print(hashlib.sha256(w.numpy().tobytes()).hexdigest())"
    )

    def digest(seed, cache):
        out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), str(corpus_file), str(cache), str(seed)],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    a, b, c = digest(0, corpus_file.parent / "c1"), digest(0, corpus_file.parent / "c2"), digest(1, corpus_file.parent / "c3")
    assert a == b and a != c


def test_windows_distinct_and_bounded():
    ids = torch.arange(100)
    w = sample_windows(ids, nsamples=91, seqlen=10, seed=0)
    assert len({tuple(r.tolist()) for r in w}) == 91
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 10)) for r in w)  # contiguous slices
    with pytest.raises(SpinQuantError, match="allows 91 distinct windows"):
        sample_windows(ids, nsamples=92, seqlen=10, seed=0)
    with_bos = sample_windows(ids, nsamples=3, seqlen=10, seed=0, bos_id=7)
    assert (with_bos[:, 0] == 7).all() and with_bos.shape == (3, 10)


def test_chat_jsonl_uses_chat_template(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    msgs = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]} for i in range(50)]
    path.write_text("\n".join(json.dumps(m) for m in msgs))
    texts = rows_to_texts(load_rows(str(path)), "text", tiny_tokenizer, "auto")
    assert texts[0] == "<user>question 0\n<assistant>answer\n"


def test_cache_hit_and_invalidation(corpus_file, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SPINQUANT_CACHE_DIR", str(tmp_path / "cache"))
    calib = CalibrationSet(source=str(corpus_file), nsamples=3, seqlen=16)
    first = calibration_windows(calib, tiny_tokenizer)
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 1
    import spinquant.data as data_mod

    monkeypatch.setattr(data_mod, "load_rows", lambda *a, **k: pytest.fail("cache was not used"))
    assert torch.equal(calibration_windows(calib, tiny_tokenizer), first)
    monkeypatch.undo()
    monkeypatch.setenv("SPINQUANT_CACHE_DIR", str(tmp_path / "cache"))
    calibration_windows(with_overrides(calib, seed=5), tiny_tokenizer)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2


def test_named_and_file_calibration_sets(tmp_path, corpus_file):
    assert load_calibration_set("wikitext2").source == "wikitext2"
    yml = tmp_path / "mine.yaml"
    yml.write_text(f"source: {corpus_file.name}\nnsamples: 5\nseqlen: 64\n")
    (tmp_path / corpus_file.name).write_text(corpus_file.read_text())
    s = load_calibration_set(str(yml))
    assert s.source == str(tmp_path / corpus_file.name) and s.nsamples == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(SpinQuantError, match="invalid YAML"):
        load_calibration_set(str(bad))
    with pytest.raises(SpinQuantError, match="unknown calibration set"):
        load_calibration_set("no-such-set")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("sourc: x\n")
    with pytest.raises(SpinQuantError, match="unknown field"):
        load_calibration_set(str(unknown))


def test_offline_wikitext_names_the_flag(tiny_tokenizer):
    with pytest.raises(SpinQuantError, match="--calib-data PATH"):
        calibration_windows(CalibrationSet(source="wikitext2", nsamples=2, seqlen=16), tiny_tokenizer)


def test_bad_inputs(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SpinQuantError, match="is empty"):
        load_rows(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n  \n")
    with pytest.raises(SpinQuantError, match="is empty"):
        load_rows(str(blank))
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(SpinQuantError, match="not a text file"):
        load_rows(str(binary))
    nofield = tmp_path / "d.jsonl"
    nofield.write_text('{"content": "hello"}\n{"content": "there"}\n')
    with pytest.raises(SpinQuantError, match="no field 'text'.*content"):
        rows_to_texts(load_rows(str(nofield)), "text", tiny_tokenizer, "auto")
    with pytest.raises(SpinQuantError, match="no such data file"):
        load_rows(str(tmp_path / "missing.txt"))
    with pytest.raises(SpinQuantError, match="unsupported data file"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_rows(str(tmp_path / "x.csv"))
