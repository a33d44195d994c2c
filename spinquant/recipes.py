"""Named rotation-learning recipes for ``spinquant calibrate --recipe NAME``.

A recipe pins the options that define how R1/R2 are learned and how GPTQ is calibrated, so that a run can claim to
reproduce a published setting. Options a recipe does not name (data, target, device, micro-batch, evaluation, seed)
stay the user's: micro-batching only changes how the same batch is accumulated, and the calibration text is the
user's domain (Meta's is WikiText-2 train, our ``--calib wikitext2`` default).
"""
from __future__ import annotations

from typing import Any

from spinquant.errors import SpinQuantError
from spinquant.quant.scheme import DEFAULT_TUNE_LR, DEFAULT_TUNE_STEPS, FLOAT_TARGET_PERCDAMP

# Meta's Llama 3.2 SpinQuant release (arXiv 2405.16406, section 4 and its Llama 3.2 model card): R1/R2 learned with
# the weights in 16 bits and 8-bit per-token activations (W16A8KV16), cross-entropy on the calibration text, Cayley SGD
# lr 1.5 with cosine decay, 100 steps x 8 windows x 2048 tokens (800 windows); GPTQ on 128 x 2048 tokens; R4 online.
RECIPES: dict[str, dict[str, Any]] = {
    "meta": {"rotations": "learned", "steps": 100, "batch_size": 8, "nsamples": None, "seqlen": 2048, "lr": 1.5,
             "learn_w_bits": 16, "learn_loss": "ce", "learn_weight_quant": "rtn", "gptq_nsamples": 128, "gptq_target": "layer",
             "gptq_clip": "plain", "gptq_refit_scales": False, "tune_scales_steps": 0, "tune_norms": False,
             "max_angle": 0.0, "r4": "auto"},
}
# What calibrate uses for these options when neither the user nor a --recipe sets them (their CalibrateOptions default
# is None, "unset"): the settings that won on the held-out real model and did not lose on the shared one
# (benchmarks/results/learning_step_cap.md, gptq_float_target.md). GPTQ fits the float model's outputs (all calibrate
# targets have 8-bit or float activations, where it helped on both models); Cayley steps turn at most 0.05 rad. GPTQ's
# clip search stays unweighted: the weighted one (gptq_clip "weighted") wins with plain GPTQ on SmolLM2 (0.91x) but is
# within the seeds' noise with the float target (0.99x) and on the 25M model (benchmarks/results/gptq_weighted_clip.md).
# The float target's fit is damped 10x more than GPTQ's Hessian (gptq_float_target_damping.md: KL 0.82x over three
# Hadamard seeds on SmolLM2). Meta's recipe fits the layer's own outputs, where this damping has no effect.
# After GPTQ each row's group scales are refitted to its integers by least squares (gptq_scale_refit.md: SmolLM2 8da4w
# KL -3.5% on each of three Hadamard seeds at no measurable time; within noise on the 25M model).
# Then the scales are tuned end to end on KL to the float model, one calibration window per step, 128 steps
# (scale_tuning.md: SmolLM2 8da4w KL -5%, PPL 24.22 -> 23.71, at ~12 s/step on 2 CPU cores).
DEFAULTS: dict[str, Any] = {"gptq_target": "float", "gptq_clip": "plain", "max_angle": 0.05,
                            "gptq_target_damp": FLOAT_TARGET_PERCDAMP, "gptq_refit_scales": True,
                            "tune_scales_steps": DEFAULT_TUNE_STEPS, "tune_scales_lr": DEFAULT_TUNE_LR}

RECIPE_TEXT = {"meta": "Meta's: W16A8KV16, cross-entropy, Cayley SGD lr 1.5 cosine, 100 steps x 8 x 2048 tokens, "
                       "GPTQ on 128 x 2048, R4 online"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def unset_values(recipe: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The values of the options in ``DEFAULTS`` that ``options`` leaves unset (None): the recipe's, else DEFAULTS'."""
    pinned = RECIPES.get(recipe, {}) if recipe else {}
    return {name: pinned.get(name, value) for name, value in DEFAULTS.items() if options.get(name) is None}


def check_recipe(recipe: str | None, options: dict[str, Any]) -> None:
    """Refuse options that contradict ``recipe`` (a run named after a recipe must be that recipe).

    ``options`` is calibrate's option dict (CalibrateOptions as a dict, before --r4 auto is resolved). An option equal
    to the recipe's value passes, given or not; ``nsamples`` may also be spelled as steps x batch size; ``r4`` may be
    auto (auto turns R4 off only where ExecuTorch cannot run it, and says so)."""
    if recipe is None:
        return
    if recipe not in RECIPES:
        raise SpinQuantError(f"--recipe {recipe}: unknown recipe; choose one of {', '.join(RECIPES)} (or leave it out and "
                             f"set the learning options yourself)")
    wanted = RECIPES[recipe]
    for name, value in wanted.items():
        given = options.get(name)
        if given == value or (given is None and name in DEFAULTS):  # unset: the recipe's value will apply
            continue
        if name == "nsamples" and given == wanted["steps"] * wanted["batch_size"]:
            continue
        if name == "r4" and given == "on":
            continue
        shown = "steps x batch size" if value is None else value
        raise SpinQuantError(f"--recipe {recipe} sets {_flag(name)} {shown}, but {_flag(name)} {given} was given: drop "
                             f"{_flag(name)} to run the recipe, or drop --recipe {recipe} to run your own setting")
