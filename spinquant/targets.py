"""Hardware targets: one registered :class:`Target` each (scheme, what is written, the runtime a .pte runs on here and
what that runtime computes). Adding a target is adding one entry to :data:`TARGETS` (and its line in docs/targets.md).

| name | block linears | output layer | embedding | written |
|---|---|---|---|---|
| xnnpack-8da4w-g32 (default) | W4 g32, A8 per token | W8 per channel, A8 | W8 per row | ExecuTorch `8da4w_output_8da8w` checkpoint + .pte |
| xnnpack-8da4w-g64 / -g128 / -g256 | W4 g64/128/256, A8 | W8, A8 | W8 | same, group 64/128/256 |
| xnnpack-8da4w | W4 g32, A8 | float | W8 | ExecuTorch `8da4w` checkpoint + .pte |
| vulkan-int4-weight-only | W4 g32, float activations | W8, float activations | W8 | the same checkpoint layout (ExecuTorch's WeightOnlyInt4Linear reads it); no .pte here (Vulkan) |
| qnn-float-rotated | float | float | float | float Meta checkpoint of the original model + R.bin, for `--optimized_rotation_path` |
"""

from __future__ import annotations

from dataclasses import dataclass

from spinquant.errors import SpinQuantError
from spinquant.hadamard import executorch_computes, is_supported_size
from spinquant.quant.scheme import FLOAT, QuantScheme

EXPORTERS = ("executorch", "float-rotated")  # what a target writes (spinquant.workflow runs the matching stage)


@dataclass(frozen=True)
class Target:
    """``scheme``: None for no quantization (the float checkpoint + R.bin, for backends that quantize by themselves);
    ``exporter``: one of :data:`EXPORTERS`; ``runtime``: the ExecuTorch backend a .pte is built for and verified on
    on this machine's CPU (None: no .pte here)."""

    name: str
    scheme: QuantScheme | None
    exporter: str
    runtime: str | None
    description: str

    @property
    def quantizes(self) -> bool:
        return self.scheme is not None

    @property
    def pte(self) -> bool:
        return self.runtime is not None and self.quantizes

    def computes_online_hadamard(self, n: int) -> bool:
        """Whether the deployed model can compute R4's online Hadamard of order ``n``: ExecuTorch's
        fast_hadamard_transform takes powers of two (and 28 x 2^k, seen unnormalised) only."""
        return executorch_computes(n) if self.exporter == "executorch" else is_supported_size(n)


def _xnnpack(group: int) -> Target:
    return Target(f"xnnpack-8da4w-g{group}", QuantScheme(group_size=group), "executorch", "xnnpack",
                  f"W4 (group {group}) + A8 per token; output W8A8 per channel; embedding W8 (Meta's scheme at group {group})")


TARGETS: dict[str, Target] = {t.name: t for t in [
    _xnnpack(32), _xnnpack(64), _xnnpack(128), _xnnpack(256),
    Target("xnnpack-8da4w", QuantScheme(output_w_bits=FLOAT, output_a_bits=FLOAT), "executorch", "xnnpack",
           "W4 g32 + A8 per token; output layer in float; embedding W8 (ExecuTorch preq_mode 8da4w)"),
    Target("vulkan-int4-weight-only", QuantScheme(a_bits=FLOAT, output_a_bits=FLOAT), "executorch", None,
           "W4 g32 weight-only (float activations); output W8; embedding W8; same checkpoint layout"),
    Target("qnn-float-rotated", None, "float-rotated", None,
           "float checkpoint of the original model + learned R.bin, for backends that quantize by themselves"),
]}
DEFAULT_TARGET = "xnnpack-8da4w-g32"


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise SpinQuantError(f"unknown target '{name}': choose one of {', '.join(TARGETS)}") from None
