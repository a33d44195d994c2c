"""Quantization: formulas (primitives), the scheme (scheme), fake-quant modules, range setting, GPTQ."""
