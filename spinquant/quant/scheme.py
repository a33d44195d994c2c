"""What to quantize and how: one frozen dataclass, validated against a model before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from spinquant.errors import SpinQuantError

WEIGHT_BITS = (2, 3, 4, 8, 16)
ACT_BITS = (4, 8, 16)
KV_BITS = (4, 8, 16)
GROUP_SIZES = (32, 64, 128, 256)  # what ExecuTorch's pre-quantized loader accepts; 0/None = per channel
FLOAT = 16  # "bits = 16" means: left in floating point
# GPTQ's float target (quant/apply.py): ridge damping of its least-squares fit, a fraction of the mean Hessian diagonal.
# Here, not in apply.py, so that the CLI can show it without importing torch.
FLOAT_TARGET_PERCDAMP = 0.1
# End-to-end scale tuning after GPTQ (quant/scale_tuning.py): Adam's learning rate on the log-scales (a relative change
# per step) and its default number of steps (one window each); calibrate's come from its recipe (recipe_files/).
DEFAULT_TUNE_LR = 1e-4
DEFAULT_TUNE_STEPS = 128


def check_damping(flag: str, value: object) -> None:
    """Refuse a GPTQ damping (a fraction of the mean Hessian diagonal) that is not a number >= 0, naming ``flag``."""
    if not isinstance(value, (int, float)) or not value >= 0:  # `not >=` also catches NaN
        raise SpinQuantError(f"{flag} {value}: damping must be a number >= 0 (a fraction of the mean Hessian diagonal)")


@dataclass(frozen=True)
class QuantScheme:
    """Bits and granularity of every quantized tensor. 16 bits = not quantized.

    Defaults are Meta's Llama 3.2 SpinQuant scheme for ExecuTorch ("8da4w_output_8da8w", group 32):
    block linears W4 symmetric per group of 32 columns with A8 asymmetric per token; output layer
    W8 per channel with A8 per token; embedding W8 per row; KV cache in float.
    """

    w_bits: int = 4
    group_size: int | None = 32
    a_bits: int = 8
    a_symmetric: bool = False
    a_clip: float = 1.0
    kv_bits: int = FLOAT
    output_w_bits: int = 8
    output_a_bits: int = 8
    embedding_bits: int = 8

    def __post_init__(self) -> None:
        checks = [("w_bits", self.w_bits, WEIGHT_BITS), ("a_bits", self.a_bits, ACT_BITS), ("kv_bits", self.kv_bits, KV_BITS),
                  ("output_w_bits", self.output_w_bits, (8, FLOAT)), ("output_a_bits", self.output_a_bits, (8, FLOAT)),
                  ("embedding_bits", self.embedding_bits, (4, 8, FLOAT))]
        for name, value, allowed in checks:
            if value not in allowed:
                raise SpinQuantError(f"{name}={value} is not supported: choose one of {', '.join(map(str, allowed))}")
        if self.group_size not in (None, 0, *GROUP_SIZES):
            raise SpinQuantError(f"group size {self.group_size} is not supported: choose {', '.join(map(str, GROUP_SIZES))} or 0 (per channel)")
        if not 0.0 < self.a_clip <= 1.0:
            raise SpinQuantError(f"activation clip ratio {self.a_clip} must be in (0, 1]")

    @property
    def group(self) -> int | None:
        """Group size, None for per-channel."""
        return self.group_size or None

    def check_model(self, config: Any) -> None:
        """Raise before any work if a block linear's input size is not a multiple of the group size."""
        g = self.group
        if g is None or self.w_bits == FLOAT:
            return
        for name, size in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                           ("num_attention_heads*head_dim", config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads))):
            if size % g:
                raise SpinQuantError(f"group size {g} does not divide the model's {name} ({size}): choose a group size that divides it")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QuantScheme":
        return QuantScheme(**{k: v for k, v in d.items() if k in QuantScheme.__dataclass_fields__})

    def describe(self) -> str:
        w = "W16" if self.w_bits == FLOAT else f"W{self.w_bits}" + (f"g{self.group}" if self.group else "pc")
        a = "A16" if self.a_bits == FLOAT else f"A{self.a_bits}{'sym' if self.a_symmetric else ''}"
        return f"{w}{a}KV{self.kv_bits}"


META_8DA4W = QuantScheme()
W4A4KV4 = QuantScheme(w_bits=4, group_size=None, a_bits=4, kv_bits=4)
