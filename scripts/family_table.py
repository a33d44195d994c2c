"""What spinquant does with every published config of the supported families: R1/R2/R4 sizes and their Hadamard
construction, what runs online, whether the preflight passes and a .pte is made (docs/families.md holds the output).

    .venv/bin/python scripts/family_table.py

Configs are the published config.json values (shapes, RoPE, ties), written here so that nothing is downloaded; the
checks are spinquant's own (architecture map, Hadamard sizes, R4 resolution for the xnnpack target, RoPE export).
"""

from __future__ import annotations

import sys

from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

from spinquant.architectures import architecture_of, head_dim
from spinquant.errors import SpinQuantError
from spinquant.hadamard import hadamard_factors
from spinquant.preflight import check_rotation_sizes, executorch_rope_problem
from spinquant.targets import get_target
from spinquant.workflow import resolve_r4

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
               "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}

# name -> (config class, hidden, intermediate, heads, kv heads, head_dim, extra config fields)
REAL_CONFIGS = {
    "Llama-3.2-1B": (LlamaConfig, 2048, 8192, 32, 8, 64, {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 131072}),
    "Llama-3.2-3B": (LlamaConfig, 3072, 8192, 24, 8, 128, {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 131072}),
    "Llama-3.1-8B": (LlamaConfig, 4096, 14336, 32, 8, 128, {"rope_parameters": {**LLAMA3_ROPE, "factor": 8.0},
                                                             "max_position_embeddings": 131072}),
    "SmolLM2-135M": (LlamaConfig, 576, 1536, 9, 3, 64, {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
    "SmolLM2-360M": (LlamaConfig, 960, 2560, 15, 5, 64, {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
    "SmolLM2-1.7B": (LlamaConfig, 2048, 8192, 32, 32, 64, {"rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}}),
    "Qwen2.5-0.5B": (Qwen2Config, 896, 4864, 14, 2, 64, {"rope_parameters": DEFAULT_ROPE}),
    "Qwen2.5-1.5B": (Qwen2Config, 1536, 8960, 12, 2, 128, {"rope_parameters": DEFAULT_ROPE}),
    "Qwen2.5-3B": (Qwen2Config, 2048, 11008, 16, 2, 128, {"rope_parameters": DEFAULT_ROPE}),
    "Qwen2.5-7B": (Qwen2Config, 3584, 18944, 28, 4, 128, {"rope_parameters": DEFAULT_ROPE}),
    "Qwen3-0.6B": (Qwen3Config, 1024, 3072, 16, 8, 128, {"rope_parameters": DEFAULT_ROPE}),
    "Qwen3-1.7B": (Qwen3Config, 2048, 6144, 16, 8, 128, {"rope_parameters": DEFAULT_ROPE}),
    "Qwen3-4B": (Qwen3Config, 2560, 9728, 32, 8, 128, {"rope_parameters": DEFAULT_ROPE}),
    "Qwen3-8B": (Qwen3Config, 4096, 12288, 32, 8, 128, {"rope_parameters": DEFAULT_ROPE}),
    "Phi-4-mini": (Phi3Config, 3072, 8192, 24, 8, 128, {
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                            "short_factor": [1.0] * 48, "long_factor": [1.0] * 48,
                            "original_max_position_embeddings": 4096},
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096}),
    "Gemma-3-1B": (Gemma3TextConfig, 1152, 6912, 4, 1, 256, {}),
}


def make_config(name: str):
    cls, hidden, inter, heads, kv, hd, extra = REAL_CONFIGS[name]
    return cls(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
               head_dim=hd, num_hidden_layers=2, **extra)


def _size(n: int) -> str:
    f = hadamard_factors(n)
    if f is None:
        return f"{n} (none)"
    return f"{n} = {f[0]}x{f[1]}" if f[0] > 1 else f"{n} = 2^{f[1].bit_length() - 1}"


def row(name: str) -> dict[str, str]:
    """One table row: what the preflight of `spinquant calibrate` (default target xnnpack-8da4w-g32) decides for this config."""
    config = make_config(name)
    out = {"model": name, "model_type": config.model_type, "R1 (hidden)": _size(config.hidden_size),
           "R2 (head_dim)": _size(head_dim(config)), "R4 (intermediate)": _size(config.intermediate_size)}
    try:
        architecture_of(config, name)
    except SpinQuantError as exc:
        return {**out, "online": "-", "preflight": f"refused: {str(exc).split(': ', 1)[1].split(';')[0]}", ".pte": "no"}
    r4, _ = resolve_r4("auto", config.intermediate_size, get_target("xnnpack-8da4w-g32"), pte=True)
    try:
        check_rotation_sizes(config, r4=r4 == "on", executorch_r4=r4 == "on")
        verdict = "passes"
    except SpinQuantError as exc:
        verdict = f"refused: {exc}"
    rope = executorch_rope_problem(config)
    online = "R4 (fast_hadamard_transform)" if r4 == "on" else "none: R4 off (not a power of two)"
    return {**out, "online": online, "preflight": verdict,
            ".pte": "no: " + rope if rope else ("yes" if verdict == "passes" else "no")}


def main() -> None:
    rows = [row(name) for name in REAL_CONFIGS]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")
    print(f"\n(command: python {' '.join(sys.argv)})")


if __name__ == "__main__":
    main()
