"""The declared layers of the package, bottom to top: a module imports only from its own layer or below, and the
imports form no circle (``tests/test_layers.py`` walks every import, those inside functions included).

An entry ending in ``.`` names a package and everything in it. ``docs/design.md`` explains each layer.
"""

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("spinquant.errors", "spinquant.atomic", "spinquant.memory", "spinquant.hadamard", "spinquant.kl_loss",
                "spinquant.quant", "spinquant.quant.primitives", "spinquant.quant.scheme", "spinquant.layers")),
    ("geometry", ("spinquant.architectures", "spinquant.fusion", "spinquant.quant.fake_quant",
                  "spinquant.quant.range_setting", "spinquant.quant.gptq", "spinquant.quant.scale_refit")),
    ("formats", ("spinquant.formats.",)),
    ("stages", ("spinquant.data", "spinquant.evaluate", "spinquant.quant.apply", "spinquant.quant.scale_tuning",
                "spinquant.rotation", "spinquant.pte", "spinquant.streaming")),
    ("policy", ("spinquant.preflight", "spinquant.targets", "spinquant.recipes", "spinquant.outputs")),
    ("workflows", ("spinquant.pipeline", "spinquant.report", "spinquant.workflow")),
    ("top", ("spinquant.batch", "spinquant.batch_jobs", "spinquant.batch_ray", "spinquant.api", "spinquant.cli",
             "spinquant", "spinquant.__main__")),
    ("experimental", ("spinquant.experimental.",)),
)


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a module of this package; KeyError for a module no layer names."""
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".") and (module + ".").startswith(member)):
                return index
    raise KeyError(module)
