"""Recipes for ``spinquant calibrate --recipe NAME|FILE``: YAML files of calibrate options (the keys a batch file takes).

Shipped with the package (``spinquant/recipe_files``): ``default`` (what calibrate runs when no recipe is named) and
``meta`` (Meta's published setting, pinned: an option given with another value is refused, so that a run which says
"recipe meta" is Meta's). A user's own file sets any options; options given on the command line win over it.
The options a recipe does not name (data, target, device, micro-batch, evaluation, seed) stay the user's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spinquant.errors import SpinQuantError

RECIPE_DIR = Path(__file__).with_name("recipe_files")
META_KEYS = ("pinned", "description")  # a recipe file's own keys, not options
# calibrate options renamed since runs were first recorded: old record name -> today's name
RENAMED = {"gptq_target": "gptq_objective", "gptq_target_damp": "gptq_objective_damp"}


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """A shipped recipe by name, or a YAML file's: {option: value} plus ``pinned``/``description`` if it has them."""
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path).expanduser()
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            shipped = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
            raise SpinQuantError(f"--recipe {name_or_path}: unknown recipe; choose one of {shipped} or pass a YAML file of "
                                 f"calibrate options")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpinQuantError(f"cannot read the recipe {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise SpinQuantError(f"the recipe {path} is not a mapping of calibrate options (key: value lines)")
    return {RENAMED.get(k, k): v for k, v in data.items()}


DEFAULTS: dict[str, Any] = read_recipe("default")
_META = read_recipe("meta")
RECIPES: dict[str, dict[str, Any]] = {"meta": {k: v for k, v in _META.items() if k not in META_KEYS}}
RECIPE_TEXT = {"meta": _META["description"]}  # the pinned recipes' one-line descriptions, for the report


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def unset_values(recipe: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The values of the options in ``DEFAULTS`` that ``options`` leaves unset (None): the recipe's, else DEFAULTS'."""
    pinned = RECIPES.get(recipe, {}) if recipe else {}
    return {name: pinned.get(name, value) for name, value in DEFAULTS.items() if options.get(name) is None}


def check_recipe(recipe: str | None, options: dict[str, Any]) -> None:
    """Refuse options that contradict a pinned ``recipe`` (a run named after it must be it).

    ``options`` is calibrate's option dict (before --r4 auto is resolved). An option equal to the recipe's value
    passes, given or not; ``nsamples`` may also be spelled as steps x batch size; ``r4`` may be on (auto turns R4
    off only where ExecuTorch cannot run it, and says so)."""
    if recipe is None or recipe not in RECIPES:
        return
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
        raise SpinQuantError(f"--recipe {recipe} sets {name} {shown}, but {name} {given} was given: drop {name} to run "
                             f"the recipe, or drop --recipe {recipe} to run your own setting")
