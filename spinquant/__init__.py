"""spinquant: learned-rotation (SpinQuant) quantization of Llama models for ExecuTorch."""

__version__ = "0.1.0"
