"""Hardware targets: named presets of quantization scheme + export format, in one table.

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
from spinquant.quant.scheme import FLOAT, QuantScheme


@dataclass(frozen=True)
class Target:
    name: str
    scheme: QuantScheme | None  # None: no quantization (float checkpoint + R.bin)
    pte: bool  # can a .pte be built and run on this machine's CPU (XNNPACK)
    description: str


def _xnnpack(group: int) -> Target:
    return Target(f"xnnpack-8da4w-g{group}", QuantScheme(group_size=group), True,
                  f"W4 (group {group}) + A8 per token; output W8A8 per channel; embedding W8 (Meta's scheme at group {group})")


TARGETS: dict[str, Target] = {t.name: t for t in [
    _xnnpack(32), _xnnpack(64), _xnnpack(128), _xnnpack(256),
    Target("xnnpack-8da4w", QuantScheme(output_w_bits=FLOAT, output_a_bits=FLOAT), True,
           "W4 g32 + A8 per token; output layer in float; embedding W8 (ExecuTorch preq_mode 8da4w)"),
    Target("vulkan-int4-weight-only", QuantScheme(a_bits=FLOAT, output_a_bits=FLOAT), False,
           "W4 g32 weight-only (float activations); output W8; embedding W8; same checkpoint layout"),
    Target("qnn-float-rotated", None, False,
           "float checkpoint of the original model + learned R.bin, for backends that quantize by themselves"),
]}
DEFAULT_TARGET = "xnnpack-8da4w-g32"


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise SpinQuantError(f"unknown target '{name}': choose one of {', '.join(TARGETS)}") from None
