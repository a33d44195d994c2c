"""``python -m spinquant.experimental``: the research commands, apart from the main CLI's ``--help``.

``learn-rotations`` takes every option of the main command plus the research settings of the learning
(spinquant.experimental.learning): int4 weights in the loop, the KL loss, GPTQ in the loop, channel scales.
"""

from __future__ import annotations

from typing import Any

import click

from spinquant.cli import friendly_errors, learn_options, option_stack, run_learn_rotations
from spinquant.experimental.learning import research_learner

RESEARCH_OPTIONS = [
    click.option("--w-bits", default=16, show_default=True, help="Weight bits while learning (16: Meta's recipe; 4: learn against int4 weights)."),
    click.option("--group-size", default=32, show_default=True, help="Weight group size when --w-bits < 16."),
    click.option("--loss", type=click.Choice(["ce", "kl"]), default="ce", show_default=True,
                 help="ce: cross-entropy on the text (Meta's); kl: KL divergence to the float model's predictions."),
    click.option("--weight-quant", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
                 help="With --w-bits < 16: the int4 weights the loss sees: round-to-nearest, or GPTQ of the current rotation."),
    click.option("--scales/--no-scales", default=False, show_default=True,
                 help="Also learn per-channel scales with R1/R2 (norm -> q/k/v and gate/up, v -> o per head channel, "
                      "up -> down), written as scales.safetensors beside R.bin; learn them against int4 weights (--w-bits 4)."),
    click.option("--scale-lr", default=0.01, show_default=True, help="Adam learning rate of the log-scales (cosine decay)."),
    click.option("--scale-init", type=float, default=None,
                 help="With --scales: start from SmoothQuant's scales of this alpha, measured on the first 8 learning windows [default: 1]."),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def experimental() -> None:
    """spinquant's research commands (docs/experimental.md): measured without a gain on the deployed targets."""


research_options = option_stack(RESEARCH_OPTIONS)


@experimental.command("learn-rotations")
@learn_options
@research_options
@friendly_errors
def learn_rotations_cmd(**options: Any) -> None:
    """learn-rotations with the research settings of the learning."""
    run_learn_rotations(learner_factory=research_learner, **options)

