from spinquant.experimental.cli import experimental

experimental(prog_name="python -m spinquant.experimental")
