"""spinquant: learned-rotation (SpinQuant) quantization of Llama-family models into verified ExecuTorch programs.

The Python API (spinquant.api): ``spinquant.calibrate(model, out, recipe, **options)``, ``spinquant.quantize(model,
recipe, **options) -> model``, ``spinquant.export(model_or_run, out)``, ``spinquant.load_model(source)``. It is loaded
on first use, so that ``import spinquant.errors`` (or the CLI's start) does not pay for torch and transformers twice.
"""

__version__ = "0.1.0"
__all__ = ["calibrate", "quantize", "export", "load_model"]


def __getattr__(name: str):
    if name in __all__:
        from spinquant import api

        return getattr(api, name)
    raise AttributeError(f"module 'spinquant' has no attribute {name!r}")
