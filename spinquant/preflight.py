"""Checks that run before any output is created: every bad input fails here, with the fix named.

Cheap by design: configs, safetensors headers (shapes, truncation) and tokenizers are read; the weights
only by ``check_finite_weights`` (one tensor at a time). Every model load checks them too
(``models.check_finite``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from spinquant.architectures import architecture_of, head_dim, rope_parameters, rope_type
from spinquant.data import local_data_files
from spinquant.errors import SpinQuantError
from spinquant.formats import describe_source, load_config, try_load_tokenizer
from spinquant.formats.hf import check_finite, check_weight_shapes, weight_shapes
from spinquant.hadamard import executorch_computes, hadamard_matrix, is_supported_size






def check_finite_weights(model_src: str | os.PathLike) -> None:
    """Refuse NaN/Inf weights of a local HF directory before any work, reading one tensor at a time (memory: the
    largest tensor). Other sources are checked when they are loaded (models.check_finite)."""
    from safetensors import safe_open

    if describe_source(model_src) != "hf":
        return
    weight_shapes(model_src)  # truncated shards fail here with their name

    def stream():
        for f in sorted(Path(model_src).expanduser().glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)

    check_finite(stream(), str(model_src))


def check_tokenizer_vocab(tokenizer: Any, config: Any, where: str) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    n = len(tokenizer)
    if n > config.vocab_size:
        raise SpinQuantError(f"the tokenizer has {n} tokens but the model {where} has only {config.vocab_size} embedding rows: "
                             f"pass the model's own tokenizer (--tokenizer DIR) or a model whose vocabulary covers it")


def executorch_rope_problem(config: Any) -> str | None:
    """Why ExecuTorch's Transformer cannot compute this model's positions (rope.py: llama3 scaling with low_freq_factor
    1, original context 8192 and integer factors, no scaling, or LongRoPE on the HF layout; sliding-window layers are
    not written into params.json); None when it can."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "sliding-window attention layers (which spinquant's ExecuTorch checkpoint does not describe)"
    rope, kind = rope_parameters(config), rope_type(config)
    if kind == "default" or (kind == "longrope" and not architecture_of(config).interleaved_rope):
        return None  # ExecuTorch's HF RoPE (use_hf_rope) computes LongRoPE (Phi-3/4)
    if kind != "llama3":
        return f"RoPE type '{kind}'"
    low, orig = float(rope.get("low_freq_factor", 1.0)), int(rope.get("original_max_position_embeddings", 8192))
    factor, high = float(rope.get("factor", 8)), float(rope.get("high_freq_factor", 4))
    if low != 1.0:
        return f"llama3 RoPE with low_freq_factor {low} (ExecuTorch fixes it at 1)"
    if orig != 8192:
        return f"llama3 RoPE with original_max_position_embeddings {orig} (ExecuTorch fixes it at 8192)"
    if factor != int(factor) or high != int(high):
        return f"llama3 RoPE with non-integer factor {factor} / high_freq_factor {high} (ExecuTorch takes integers)"
    return None


def check_executorch_rope(config: Any, where: str) -> None:
    problem = executorch_rope_problem(config)
    if problem:
        raise SpinQuantError(f"{where} uses {problem}, which ExecuTorch's Llama cannot compute, so its .pte would not match: "
                             f"pass --no-pte (the quantized run stays correct) or use a target without ExecuTorch export "
                             f"(qnn-float-rotated)")


def check_rotation_sizes(config: Any, r4: bool = True, executorch_r4: bool = False) -> None:
    """Hadamard matrices exist for R1 (hidden), R2 (head_dim) and R4 (intermediate); with ``executorch_r4`` the
    intermediate size must be a power of two (ExecuTorch's fast_hadamard_transform)."""

    sizes = [(config.hidden_size, "R1 (hidden_size)"), (head_dim(config), "R2 (head_dim)")]
    if r4:
        sizes.append((config.intermediate_size, "R4 (intermediate_size)"))
    for n, what in sizes:
        if not is_supported_size(n):
            hadamard_matrix(n, what)  # raises the one message that explains the supported sizes
    inter = config.intermediate_size
    if r4 and executorch_r4 and not executorch_computes(inter):
        raise SpinQuantError(f"intermediate size {inter} is not a power of two: ExecuTorch's online Hadamard "
                             f"(fast_hadamard_transform, R4) cannot compute it; pass --r4 off (no online Hadamard; the default "
                             f"--r4 auto does this) or --no-pte")


def check_model(model_src: str, tokenizer_src: str | None = None, need_tokenizer: bool = True) -> tuple[Any, Any]:
    """(config, tokenizer) of a model source, checked: a Llama, weights present and consistent with the config,
    a tokenizer whose vocabulary fits the embedding. Raises SpinQuantError with the fix named."""

    kind = describe_source(model_src)
    config = load_config(model_src)
    if kind == "hf":
        check_weight_shapes(weight_shapes(model_src), config, str(model_src))
    if tokenizer_src is not None and not Path(tokenizer_src).expanduser().exists() and kind != "hub":
        raise SpinQuantError(f"no such tokenizer directory: {tokenizer_src}")
    tokenizer = try_load_tokenizer(model_src, tokenizer_src)
    if tokenizer is None and need_tokenizer:
        raise SpinQuantError(f"{model_src} has no tokenizer, which calibration needs: pass --tokenizer DIR")
    if tokenizer is not None:
        check_tokenizer_vocab(tokenizer, config, str(model_src))
    return config, tokenizer


def check_data_path(data: str | None, flag: str) -> None:
    """A local data path given by the user must exist (names like wikitext2 and hub:... are resolved later)."""
    if data is None or data == "wikitext2" or data.startswith("hub:"):
        return
    p = Path(data).expanduser()
    if not p.exists():
        raise SpinQuantError(f"{flag} {data}: no such file or folder (pass a local .txt/.raw/.jsonl/.parquet file, a folder "
                             f"of them, wikitext2 or hub:NAME)")

    local_data_files(p)  # type and encoding checks


# Peak resident memory of a calibrate stage over the float32 size of the (untied) model, measured on the Llama-3.2-1B
# shape on 2 CPU cores with a little margin (docs/sizes.md has the runs): the whole model in memory ...
PEAK_OVER_FLOAT32 = {"quantize": 1.5, "export": 1.95, "learn": 3.05}
# ... and a model read layer by layer (a safetensors directory: spinquant.streaming); "export" counts executorch's
# exporter (a child process) beside spinquant's own
STREAMED_PEAK_OVER_FLOAT32 = {"quantize": 1.15, "export": 1.8}
SKIP_RESOURCE_CHECK = "SPINQUANT_SKIP_RESOURCE_CHECK"


def parameter_count(config: Any) -> int:
    """Parameters of the model as spinquant holds it: embedding and output layer untied, every decoder linear."""
    hd, hidden, inter = head_dim(config), config.hidden_size, config.intermediate_size
    attention = hidden * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return 2 * config.vocab_size * hidden + config.num_hidden_layers * (attention + 3 * hidden * inter)


def available_memory_bytes() -> int | None:
    """MemAvailable + SwapFree from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that will hold ``path`` (its nearest existing ancestor)."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def activation_bytes(hidden: int, gptq_tokens: int, float_objective: bool, streams_on_cpu: bool, tuning_tokens: int,
                     eval_tokens: int) -> int:
    """Bytes of calibration activations a calibrate run holds on the CPU beside the model, float32 and ``hidden``
    wide, one set after another (the largest counts): GPTQ's calibration stream over ``gptq_tokens`` tokens (two
    streams with the float objective, the float model's and the quantized one; on the GPU when GPTQ runs there), then
    the scale tuning's float reference (its final hidden states on ``tuning_tokens``), then the report's
    (``eval_tokens``). The measured peaks behind STREAMED_PEAK_OVER_FLOAT32 were taken at budgets where these are
    negligible; at GPTQ's default 128 x 2048 tokens they are GiBs."""
    streams = (2 if float_objective else 1) * gptq_tokens if streams_on_cpu else 0
    return 4 * hidden * max(streams, tuning_tokens, eval_tokens)


def check_resources(config: Any, out: Path, learn_on_cpu: bool, pte: bool, float_checkpoint: bool,
                    streamed: bool = False, activations: int = 0) -> str:
    """The memory and disk a calibrate run of this model needs, estimated from measured peaks (PEAK_OVER_FLOAT32, or
    STREAMED_PEAK_OVER_FLOAT32 after learning when ``streamed``: the model is read a layer at a time) plus the
    calibration ``activations`` (bytes, :func:`activation_bytes`), and the sizes of the files it writes;
    SpinQuantError before anything starts when the machine has less. Returns the line that states the estimate.
    Setting SPINQUANT_SKIP_RESOURCE_CHECK=1 turns the refusal into that line."""
    params = parameter_count(config)
    stages = ["learn"] if learn_on_cpu else []
    stages.append("export" if pte else "quantize")
    ratios = {**PEAK_OVER_FLOAT32, **(STREAMED_PEAK_OVER_FLOAT32 if streamed and not float_checkpoint else {})}
    memory = max(ratios[s] for s in stages) * 4 * params + activations
    # quantized.safetensors and the ExecuTorch checkpoint (and the .pte): int8 weights + float32 group scales; or the
    # float Meta checkpoint for a float target. GPTQ's finished layers (formats/layer_progress.py, at most the int8
    # model) are removed before the export writes, so they fit within the same count
    disk = 4 * params if float_checkpoint else (3 if pte else 2) * params * (1 + 4 / 32)
    available, free = available_memory_bytes(), free_disk_bytes(out)
    what = (f"{'/'.join(stages)} of a {params / 1e9:.2f}B-parameter model{', read layer by layer' if streamed else ''}"
            f"{f'; calibration activations {_size(activations)}' if activations else ''}")
    line = (f"[spinquant] resources: about {_size(memory)} of memory at peak ({what})"
            + (f", {_size(available)} available" if available is not None else "")
            + f"; about {_size(disk)} of disk, {_size(free)} free")
    short = []
    if available is not None and memory > available:
        short.append(f"about {_size(memory)} of memory at peak ({what}) but the machine has {_size(available)} available")
    if disk > free:
        short.append(f"about {_size(disk)} of disk for its outputs but {out} has {_size(free)} free")
    if short and not os.environ.get(SKIP_RESOURCE_CHECK):
        fixes = "free memory or disk, use a larger machine" + (", learn on a GPU (--device cuda)" if learn_on_cpu else "")
        raise SpinQuantError(f"this run needs {' and '.join(short)}: {fixes}, or set {SKIP_RESOURCE_CHECK}=1 to try anyway")
    return line


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
