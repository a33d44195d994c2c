"""User workflows: calibrate (end to end, resume), requantize (no learning), batch (a failing job), bad input."""

import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import LlamaConfig

from spinquant import pipeline, workflow
from spinquant.cli import cli
from spinquant.formats.rbin import load_rbin

FAST = ["--steps", "3", "--set", "batch_size=2", "--seqlen", "64", "--gptq-nsamples", "4", "--set", "eval_windows=2"]


def _calibrate(model_dir, out, corpus, *extra):
    return CliRunner().invoke(cli, ["calibrate", "--model", str(model_dir), "--out", str(out), "--calib-data", str(corpus),
                                    "--eval-data", str(corpus), *FAST, *extra])


def _no_learning(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("rotation learning ran")

    monkeypatch.setattr(workflow, "learn_rotations", fail)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model_dir, corpus_file):
    out = tmp_path_factory.mktemp("cal") / "run"
    r = _calibrate(tiny_model_dir, out, corpus_file, "--no-pte")
    assert r.exit_code == 0, r.output
    return out


def test_calibrate_run_directory(calibrated):
    top = {p.name for p in calibrated.iterdir()}
    assert {"R.bin", "consolidated.00.pth", "params.json", "report.json", "report.md", "calibrate_config.json",
            "learning_curve.png", "residual_stats.png", "quantized.safetensors"} <= top
    cfg = json.loads((calibrated / "calibrate_config.json").read_text())
    assert cfg["steps"] == 3 and cfg["seed"] == 0 and "torch" in cfg["versions"] and cfg["target"] == "xnnpack-8da4w-g32"
    rep = json.loads((calibrated / "report.json").read_text())
    q = rep["evaluation"]["quantized"]
    assert q["kl"] > 0 and 0 < q["top1"] <= 1 and rep["evaluation"]["float"]["ppl"] > 1
    assert len(rep["learning"]["losses"]) == 3 and set(rep["stage_seconds"]) >= {"learn", "quantize", "export"}
    md = (calibrated / "report.md").read_text()
    assert "![Rotation learning curve](learning_curve.png)" in md and "KL to float" in md
    # the defaults that are not Meta's (spinquant.recipes.DEFAULTS) are resolved, recorded and reported
    assert cfg["max_angle"] == 0.05 and cfg["gptq_objective"] == "float"
    assert cfg["gptq_objective_damp"] == 0.1 and cfg["gptq_refit_scales"] is True
    assert cfg["tune_scales_steps"] == 128 and cfg["tune_scales_lr"] == 1e-4
    qc = json.loads((calibrated / "quant_config.json").read_text())
    assert qc["gptq_target"] == "float" and qc["target_percdamp"] == 0.1
    assert qc["scale_refit"] is True
    assert qc["scale_tuning"]["steps"] == 128 and len(qc["scale_tuning"]["losses"]) == 128
    assert qc["scale_tuning"]["calibration"]["seed"] == 1 and qc["scale_tuning"]["calibration"]["seqlen"] == 64
    assert ("W16A8KV16, ce loss, lr 1.5 (steps capped at 0.05 rad), 3 steps x 2 x 64 tokens; GPTQ with the float model "
            "as target (fit damped 0.1), group scales refitted by least squares, on 4 x 64; R4 online before down_proj. After GPTQ the "
            "scales were tuned end to end on KL to the float model (128 windows x 64 tokens, lr 0.0001).") in md
    assert "Recipe" not in md
    assert json.loads((calibrated / "losses.json").read_text())["config"]["max_angle"] == 0.05


def test_recipe_meta_pins_its_options(tiny_model_dir, corpus_file, tmp_path):
    from dataclasses import asdict

    from spinquant.recipes import DEFAULTS, RECIPES, check_recipe, read_recipe, unset_values
    from spinquant.report import render_markdown

    # the shipped recipes are the YAML files; the defaults are Meta's recipe but for the options left unset (None),
    # which take the recipe's values under --recipe meta (plain steps, plain GPTQ) and DEFAULTS' otherwise
    assert DEFAULTS == read_recipe("default") == {"max_angle": 0.05, "gptq_objective": "float", "gptq_objective_damp": 0.1,
                                                  "gptq_refit_scales": True, "tune_scales_steps": 128, "tune_scales_lr": 1e-4}
    assert read_recipe("meta")["pinned"] is True and RECIPES["meta"]["steps"] == 100 and "pinned" not in RECIPES["meta"]
    check_recipe("meta", asdict(workflow.CalibrateOptions(model="m")))
    assert unset_values("meta", asdict(workflow.CalibrateOptions(model="m"))) == {
        "gptq_objective": "layer", "max_angle": 0.0, "gptq_objective_damp": 0.1, "gptq_refit_scales": False,
        "tune_scales_steps": 0, "tune_scales_lr": 1e-4}
    assert unset_values(None, asdict(workflow.CalibrateOptions(model="m"))) == DEFAULTS
    assert unset_values(None, {"gptq_objective": "layer", "max_angle": None, "gptq_objective_damp": 0.01,
                               "gptq_refit_scales": False, "tune_scales_steps": 0,
                               "tune_scales_lr": 1e-3}) == {"max_angle": 0.05}  # given: kept
    check_recipe("meta", {**asdict(workflow.CalibrateOptions(model="m")), "nsamples": 800, "r4": "on"})
    # names recorded before the rename (calibrate_config.json, batch files) are read as today's
    old = workflow.CalibrateOptions.build("m", None, gptq_target="layer", gptq_target_damp=0.01)
    assert old.gptq_objective == "layer" and old.gptq_objective_damp == 0.01
    # a pinned option given with another value (a flag or --set) is refused before anything is created, naming both fixes
    r = _calibrate(tiny_model_dir, tmp_path / "o1", corpus_file, "--recipe", "meta")
    _one_line_error(r, "--recipe meta sets steps 100, but steps 3 was given")
    assert "drop steps" in r.output and "drop --recipe meta" in r.output
    for key, value, message in (("lr", "1.0", "sets lr 1.5, but lr 1.0 was given"),
                                ("gptq_objective", "float", "sets gptq_objective layer, but gptq_objective float was given"),
                                ("max_angle", "0.05", "sets max_angle 0.0, but max_angle 0.05 was given"),
                                ("gptq_target", "float", "sets gptq_objective layer")):  # a recorded old name, read as today's
        r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o2"), "--recipe",
                                     "meta", "--set", f"{key}={value}"])
        _one_line_error(r, message)
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o3"), "--recipe", "meta",
                                 "--rotations", "hadamard"])
    _one_line_error(r, "--recipe meta sets rotations learned")
    # --set: unknown keys, wrong types and unknown recipes are refused, named
    for args, message in ((["--set", "bogus=1"], "unknown option 'bogus'"), (["--set", "steps=two"], "steps must be an integer"),
                          (["--set", "steps"], "expected KEY=VALUE"), (["--recipe", "fast"], "unknown recipe")):
        r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o4"), *args])
        _one_line_error(r, message)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))
    opts = {**RECIPES["meta"], "recipe": "meta", "seed": 0, "learned": True, "r4": "on", "nsamples": 800}
    md = render_markdown({"model": "m", "target": "t", "options": opts})
    assert "Recipe **meta** (Meta's: W16A8KV16, cross-entropy" in md and "100 steps x 8 x 2048 tokens" in md
    assert "GPTQ on 128 x 2048" in md
    md = render_markdown({"model": "m", "target": "t", "options": {**opts, "recipe": None, "max_angle": 0.05,
                                                                   "gptq_objective": "float", "gptq_objective_damp": 0.1}})
    assert "lr 1.5 (steps capped at 0.05 rad)" in md and "GPTQ with the float model as target (fit damped 0.1) on 128 x 2048" in md


def test_a_recipe_file_sets_options_and_flags_win(tiny_model_dir, corpus_file, tmp_path):
    """--recipe FILE: its keys set the run's options; a flag or --set given beside it wins; the file is recorded."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("rotations: hadamard\ngptq_objective: layer\ntune_scales_steps: 0\neval_windows: 1\nseqlen: 48\n"
                      "r4: off\n")  # YAML 1.1 reads off as false: for r4 it is the word
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(out), "--calib-data", str(corpus_file),
                                 "--eval-data", str(corpus_file), "--recipe", str(recipe), "--seqlen", "64",
                                 "--gptq-nsamples", "4", "--no-pte", "--set", "eval_windows=2"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "calibrate_config.json").read_text())
    assert cfg["rotations"] == "hadamard" and cfg["gptq_objective"] == "layer" and cfg["tune_scales_steps"] == 0
    assert cfg["seqlen"] == 64 and cfg["eval_windows"] == 2 and cfg["recipe"] == str(recipe.resolve())
    assert cfg["max_angle"] == 0.05  # what the file leaves out comes from the default recipe
    assert cfg["r4"] == "off" and json.loads((out / "config.json").read_text()).get("spinquant_online_r4") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2]\n")
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--recipe", str(bad)])
    _one_line_error(r, "steps must be an integer")
    assert not (tmp_path / "o").exists()


def test_no_learning_route_uses_the_seeded_random_hadamard(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """calibrate --rotations hadamard (= --steps 0): no learning, the seeded random Hadamard start, GPTQ, report."""
    from transformers import AutoConfig

    from spinquant.fusion import Rotations

    _no_learning(monkeypatch)
    out = tmp_path / "run"
    r = _calibrate(tiny_model_dir, out, corpus_file, "--no-pte", "--rotations", "hadamard", "--seed", "3")
    assert r.exit_code == 0, r.output
    expected = Rotations.random_hadamard_for(AutoConfig.from_pretrained(tiny_model_dir), 3)
    got = load_rbin(out / "R.bin")
    assert torch.equal(got.r1, expected.r1.float().double()) and len(got.r2) == len(expected.r2)
    assert all(torch.equal(a, b.float().double()) for a, b in zip(got.r2, expected.r2))
    assert not (out / "losses.json").exists() and (out / "quantized.safetensors").is_file()
    cfg = json.loads((out / "calibrate_config.json").read_text())
    assert cfg["rotations"] == "hadamard" and cfg["steps"] == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["evaluation"]["quantized"]["kl"] > 0 and "learn" in rep["stage_seconds"]
    # --steps 0 is the same route: the finished run is recognised, nothing re-runs
    before = (out / "stages.json").read_text()
    r = _calibrate(tiny_model_dir, out, corpus_file, "--no-pte", "--steps", "0", "--seed", "3")
    assert r.exit_code == 0 and (out / "stages.json").read_text() == before, r.output
    # learning into the same run is another run: refused, named
    r = _calibrate(tiny_model_dir, out, corpus_file, "--no-pte", "--seed", "3")
    assert r.exit_code == 2 and "rotations" in r.output, r.output
    # so is plain GPTQ (the default fits the float model); in its own directory it runs and is recorded
    assert json.loads((out / "quant_config.json").read_text())["gptq_target"] == "float"
    plain = ("--no-pte", "--rotations", "hadamard", "--seed", "3", "--set", "gptq_objective=layer")
    r = _calibrate(tiny_model_dir, out, corpus_file, *plain)
    assert r.exit_code == 2 and "gptq_target" in r.output, r.output
    r = _calibrate(tiny_model_dir, out, corpus_file, "--no-pte", "--rotations", "hadamard", "--seed", "3", "--set",
                   "gptq_objective_damp=0.01")
    assert r.exit_code == 2 and "gptq_target_damp" in r.output, r.output
    r = _calibrate(tiny_model_dir, tmp_path / "run_layer", corpus_file, *plain)
    assert r.exit_code == 0, r.output
    qc = json.loads((tmp_path / "run_layer" / "quant_config.json").read_text())
    assert qc["gptq_target"] == "layer"
    assert (load_rbin(tmp_path / "run_layer" / "R.bin").r1 == got.r1).all()  # same rotation, other quantizer


def test_research_keys_moved_to_experimental(tiny_model_dir, corpus_file, tmp_path):
    """Recipe keys that moved to spinquant.experimental: named at the value calibrate runs, accepted (old batch files);
    at another, refused in one line before anything is created, naming where they went."""
    from spinquant import workflow

    opts = workflow.CalibrateOptions.build("m", None, learn_loss="ce", learn_w_bits=16, tune_norms=False)
    assert not hasattr(opts, "learn_loss") and not hasattr(opts, "tune_norms")
    for key, value in (("learn_loss", "kl"), ("learn_weight_quant", "gptq"), ("learn_w_bits", "4"), ("tune_norms", "true")):
        r = _calibrate(tiny_model_dir, tmp_path / "o", corpus_file, "--set", f"{key}={value}")
        _one_line_error(r, f"{key} {value if value != 'true' else True}: a research setting, moved to spinquant.experimental")
    assert not (tmp_path / "o").exists()
    # a run made when the norms could be tuned inside calibrate is not requantized without them: refused, named
    old_run = tmp_path / "old"
    old_run.mkdir()
    (old_run / "calibrate_config.json").write_text(json.dumps({"model": str(tiny_model_dir), "tune_norms": True}))
    (old_run / "R.bin").write_bytes(b"")
    r = CliRunner().invoke(cli, ["requantize", "--from", str(old_run), "--target", "xnnpack-8da4w-g64"])
    _one_line_error(r, "also tuned the RMSNorm weights (tune_norms)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_resume_skips_finished_stages(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # the user hits ^C after the rotation stage

    with monkeypatch.context() as m:
        m.setattr(workflow, "_stage_quantize", interrupted)
        r = _calibrate(tiny_model_dir, out, corpus_file, "--no-pte")
        assert r.exit_code != 0
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["learn"] and (out / "R.bin").is_file() and not (out / "quantized.safetensors").exists()
    rbin = (out / "R.bin").read_bytes()
    _no_learning(monkeypatch)
    r = _calibrate(tiny_model_dir, out, corpus_file, "--no-pte")
    assert r.exit_code == 0, r.output
    assert "stage learn: done, skipped" in r.output
    assert (out / "R.bin").read_bytes() == rbin and (out / "report.json").is_file()


def test_requantize_reuses_rotations_without_learning(calibrated, tmp_path, monkeypatch):
    _no_learning(monkeypatch)
    out = tmp_path / "g64"
    r = CliRunner().invoke(cli, ["requantize", "--from", str(calibrated), "--target", "xnnpack-8da4w-g64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "R.bin").read_bytes() == (calibrated / "R.bin").read_bytes()
    assert json.loads((out / "params.json").read_text())["quantization_args"]["group_size"] == 64
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert sd["layers.0.attention.wq.scales"].shape == (64, 1)
    assert not (out / "losses.json").exists()
    qnn = tmp_path / "qnn"
    r = CliRunner().invoke(cli, ["requantize", "--from", str(calibrated), "--target", "qnn-float-rotated", "--out", str(qnn)])
    assert r.exit_code == 0, r.output
    sd = torch.load(qnn / "consolidated.00.pth", weights_only=True)
    assert sd["layers.0.attention.wq.weight"].dtype == torch.float32
    assert json.loads((qnn / "verification.json").read_text())["rotated_float_max_rel_logit_diff"] < 1e-4
    assert torch.equal(load_rbin(qnn / "R.bin").r1, load_rbin(calibrated / "R.bin").r1)


def test_batch_continues_past_a_failed_job(tiny_model_dir, corpus_file, tmp_path, tiny_tokenizer):
    models = tmp_path / "fine-tunes"
    for name in ("ft-a", "ft-b"):
        from tests.helpers import make_tiny_model

        m = make_tiny_model(vocab_size=len(tiny_tokenizer))
        m.save_pretrained(models / name)
        tiny_tokenizer.save_pretrained(models / name)
    jobs = {
        "defaults": {"calib_data": str(corpus_file), "eval_data": str(corpus_file), "pte": False, "steps": 2, "batch_size": 2,
                     "seqlen": 64, "gptq_nsamples": 4, "eval_windows": 2},
        "jobs": [{"models_glob": "fine-tunes/*", "out": str(tmp_path / "runs" / "{name}")},
                 {"model": str(tmp_path / "missing-model"), "out": str(tmp_path / "runs" / "missing")}],
    }
    jf = tmp_path / "jobs.yaml"
    jf.write_text(yaml.safe_dump(jobs))
    r = CliRunner().invoke(cli, ["batch", str(jf)])
    assert r.exit_code == 1, r.output
    rows = json.loads((tmp_path / "jobs.summary.json").read_text())
    assert [row["status"] for row in rows] == ["ok", "ok", "failed"]
    assert "no such path" in rows[2]["error"] and rows[0]["ppl_quantized"] > 1
    assert "missing-model" in (tmp_path / "jobs.summary.md").read_text()
    # re-run: finished jobs are skipped
    r = CliRunner().invoke(cli, ["batch", str(jf)])
    rows = json.loads((tmp_path / "jobs.summary.json").read_text())
    assert [row["status"] for row in rows] == ["skipped (finished)", "skipped (finished)", "failed"]


def _one_line_error(r, pattern):
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [l for l in r.output.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and pattern in lines[0], r.output


def test_bad_inputs(tiny_model_dir, corpus_file, tmp_path, calibrated):
    _one_line_error(_calibrate(tmp_path / "nope", tmp_path / "o1", corpus_file), "no such path")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _one_line_error(_calibrate(gpt2, tmp_path / "o2", corpus_file), "unsupported architecture 'gpt2'")
    _one_line_error(_calibrate(tiny_model_dir, tmp_path / "o3", corpus_file, "--target", "tpu-int3"), "unknown target 'tpu-int3'")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("jobs: [ {model: x\n")
    _one_line_error(CliRunner().invoke(cli, ["batch", str(bad_yaml)]), "invalid YAML")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o4"),
                                 "--calib-data", str(empty), *FAST])
    _one_line_error(r, "is empty")
    # values a recipe file, a batch YAML or the Python API can bring unchecked by click
    with pytest.raises(workflow.SpinQuantError, match="gptq_objective Float: choose float or layer"):
        workflow.calibrate(workflow.CalibrateOptions(model=str(tiny_model_dir), out=str(tmp_path / "o6"), gptq_objective="Float"))
    for bad in (-0.5, float("nan"), "0.1"):
        with pytest.raises(workflow.SpinQuantError, match=f"gptq_objective_damp {bad}: damping must be a number >= 0"):
            workflow.calibrate(workflow.CalibrateOptions(model=str(tiny_model_dir), out=str(tmp_path / "o6"),
                                                         gptq_objective_damp=bad))
    for o in ("o1", "o2", "o3", "o5", "o6"):
        assert not (tmp_path / o).exists()
    assert not (tmp_path / "o4" / "report.json").exists() and not (tmp_path / "o4" / "stages.json").exists()


def test_out_dir_with_another_models_run(calibrated, corpus_file, tmp_path, tiny_tokenizer):
    from tests.helpers import make_tiny_model

    other = tmp_path / "other"
    make_tiny_model(vocab_size=len(tiny_tokenizer)).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    before = {p.name: p.stat().st_mtime_ns for p in calibrated.iterdir()}
    _one_line_error(_calibrate(other, calibrated, corpus_file, "--no-pte"), "holds a run of a different model")
    assert {p.name: p.stat().st_mtime_ns for p in calibrated.iterdir()} == before


def test_interrupted_export_keeps_previous_checkpoint(calibrated, monkeypatch):
    ckpt = (calibrated / "consolidated.00.pth").read_bytes()
    params = (calibrated / "params.json").read_text()

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pipeline, "executorch_state_dict", crash)
    r = CliRunner().invoke(cli, ["export", "--from", str(calibrated), "--no-pte"])
    assert r.exit_code != 0
    assert (calibrated / "consolidated.00.pth").read_bytes() == ckpt and (calibrated / "params.json").read_text() == params
    assert not [p for p in calibrated.iterdir() if ".partial-" in p.name]


def test_batch_jobs_take_recipes_and_old_option_names(tmp_path):
    """A batch file's `recipe:` is a shipped name or a file beside the YAML (resolved like other paths); recorded old
    names (gptq_target) and YAML's on/off for r4 are read as today's options; an unknown key is refused, named."""
    from spinquant.batch import load_jobs

    (tmp_path / "m").mkdir()
    (tmp_path / "mine.yaml").write_text("steps: 5\n")
    (tmp_path / "jobs.yaml").write_text("defaults: {r4: off, gptq_target: layer}\n"
                                        "jobs:\n  - {model: ./m, recipe: mine.yaml}\n  - {model: ./m, out: b, recipe: meta}\n")
    first, second = load_jobs(str(tmp_path / "jobs.yaml"))
    assert first["recipe"] == str(tmp_path / "mine.yaml") and second["recipe"] == "meta" and first["r4"] == "off"
    opts = workflow.CalibrateOptions.build(**first)
    assert opts.steps == 5 and opts.gptq_objective == "layer" and opts.recipe == str((tmp_path / "mine.yaml").resolve())
    (tmp_path / "bad.yaml").write_text("jobs:\n  - {model: ./m, stepz: 3}\n")
    with pytest.raises(workflow.SpinQuantError, match="unknown option"):
        load_jobs(str(tmp_path / "bad.yaml"))


def test_calibrate_evaluates_on_every_text_given(tiny_model_dir, corpus_file, tmp_path):
    """--eval-data repeated: the report holds one evaluation per text (the first stays report["evaluation"]), the
    markdown one table per text, the summary line each text's numbers; a missing second text is refused up front."""
    from tests.helpers import CORPUS

    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(CORPUS.splitlines())) * 3)  # other text over the same vocabulary
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(out), "--calib-data",
                                 str(corpus_file), "--eval-data", str(corpus_file), "--eval-data", str(other),
                                 "--rotations", "hadamard", "--seqlen", "64", "--gptq-nsamples", "4", "--no-pte",
                                 "--set", "eval_windows=2", "--set", "tune_scales_steps=0"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    first, second = rep["evaluations"]
    assert rep["evaluation"] == first and first["data"] == str(corpus_file) and second["data"] == str(other)
    for ev in (first, second):
        assert ev["quantized"]["kl"] > 0 and ev["float"]["ppl"] > 1 and ev["windows"] == 2
    assert first["float"]["ppl"] != second["float"]["ppl"]
    md = (out / "report.md").read_text()
    assert f"on {corpus_file}," in md and f"on {other}," in md
    assert "perplexity on corpus.txt" in r.output and "perplexity on other.txt" in r.output
    assert json.loads((out / "calibrate_config.json").read_text())["eval_data"] == [str(corpus_file), str(other)]
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib-data",
                                 str(corpus_file), "--eval-data", str(corpus_file), "--eval-data", str(tmp_path / "none.txt"),
                                 "--seqlen", "64"])
    _one_line_error(r, "none.txt: no such file or folder")
    assert not (tmp_path / "o").exists()


def test_too_little_memory_or_disk_is_refused_before_the_run_with_the_estimate(tiny_model_dir, corpus_file, tmp_path,
                                                                               monkeypatch, tiny_model):
    from spinquant import preflight

    # the estimate's parameter count is the model's own: embedding and output layer untied, every decoder linear
    linears = sum(m.weight.numel() for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear))
    assert preflight.parameter_count(tiny_model.config) == linears + tiny_model.model.embed_tokens.weight.numel()
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 1024)
    r = _calibrate(tiny_model_dir, tmp_path / "m", corpus_file)
    assert r.exit_code == 2 and "of memory at peak (learn/export of a 0.00B-parameter model, read layer by layer; calibration " \
        "activations" in r.output, r.output
    assert "the machine has 0 MiB available" in r.output
    assert "SPINQUANT_SKIP_RESOURCE_CHECK=1" in r.output and not (tmp_path / "m").exists()
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 2**40)
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 0)
    r = _calibrate(tiny_model_dir, tmp_path / "d", corpus_file, "--rotations", "hadamard", "--no-pte")
    assert r.exit_code == 2 and "MiB of disk for its outputs" in r.output and "has 0 MiB free" in r.output, r.output
    assert not (tmp_path / "d").exists()
    monkeypatch.setenv("SPINQUANT_SKIP_RESOURCE_CHECK", "1")  # the user's way past it: the estimate is printed instead
    line = preflight.check_resources(tiny_model.config, tmp_path / "d", learn_on_cpu=False, pte=True, float_checkpoint=False)
    assert line.startswith("[spinquant] resources: about") and "(export of a 0.00B-parameter model)" in line
    # a model read layer by layer is estimated from the streamed path's measured peaks, lower than the whole model's
    llama_1b = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64)

    def estimate(**kw):
        return float(re.search(r"about ([\d.]+) GiB of memory", preflight.check_resources(
            llama_1b, tmp_path / "d", learn_on_cpu=False, float_checkpoint=False, **kw)).group(1))
    assert estimate(pte=False, streamed=True) < estimate(pte=False)
    assert estimate(pte=True, streamed=True) <= estimate(pte=True)
    # the calibration activations add to it: at GPTQ's default 128 x 2048 tokens with the float objective on the CPU,
    # two float32 streams of 128 x 2048 x 2048 (4 GiB); on a GPU only the tuning's float reference stays on the CPU
    tokens = 128 * 2048
    on_cpu = preflight.activation_bytes(2048, tokens, True, True, tuning_tokens=tokens, eval_tokens=20 * 2048)
    on_gpu = preflight.activation_bytes(2048, tokens, True, False, tuning_tokens=tokens, eval_tokens=20 * 2048)
    assert (on_cpu, on_gpu) == (4 * 2**30, 2 * 2**30)
    assert preflight.activation_bytes(2048, tokens, False, True, 0, 0) == 2 * 2**30  # plain GPTQ: one stream
    assert estimate(pte=False, streamed=True, activations=on_cpu) == pytest.approx(estimate(pte=False, streamed=True) + 4, abs=0.11)


def test_the_resource_estimate_counts_the_calibration_activations_asked_for(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """calibrate's estimate adds the calibration activations of the run as asked: GPTQ's two float32 streams (the
    float objective, on the CPU), the tuning's float reference, the report's; a larger budget raises it."""
    from spinquant.errors import SpinQuantError

    seen = []

    def capture(config, out, learn_on_cpu, pte, float_checkpoint, streamed=False, activations=0):
        seen.append((config.hidden_size, activations))
        raise SpinQuantError("stop after the estimate")

    monkeypatch.setattr(workflow, "check_resources", capture)
    for n in (4, 16):
        r = _calibrate(tiny_model_dir, tmp_path / f"o{n}", corpus_file, "--rotations", "hadamard", "--no-pte",
                       "--gptq-nsamples", str(n), "--seqlen", "32", "--set", "tune_scales_steps=3", "--set", "eval_windows=2")
        assert r.exit_code == 2 and "stop after the estimate" in r.output, r.output
    (hidden, small), (_, large) = seen
    # the default recipe's float objective: two streams of n x 32 tokens; tuning 3 x 32, report 2 windows x 32
    assert small == 4 * hidden * max(2 * 4 * 32, 3 * 32, 2 * 32)
    assert large == 4 * hidden * 2 * 16 * 32
