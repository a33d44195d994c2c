"""Research kept off the main path: measured without a gain on a deployed target (docs/experimental.md).

- ``learning``: the rotation learner's research settings (int4 weights in the loop, RTN or GPTQ's integers
  (``rotation_gptq``); KL to the float model as the loss; channel scales learned with R1/R2, from SmoothQuant's
  closed-form scales (``smoothing``)). Command: ``python -m spinquant.experimental learn-rotations``.
- ``norm_tuning``: the end-to-end scale tuning with the RMSNorm weights tuned too.

These modules import the main package, never the reverse (spinquant/layers.py).
"""
