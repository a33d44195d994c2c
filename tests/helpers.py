"""Builders for tiny models and tokenizers made in code (no downloads)."""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A rotation leaves the function of the float model unchanged.",
    "Quantization maps weights to a small set of integers with a scale.",
    "Robert Boulter is an English film, television and theatre actor.",
    "The river flows north through the valley towards the old town.",
    "In 1998 the museum opened a new wing for modern paintings.",
    "Numbers such as 42, 1024 and 3.14 appear in many texts.",
    "She said that the weather would change before the evening.",
]
# A small corpus: enough tokens for calibration and evaluation windows in tests.
CORPUS = "".join(
    f" = Section {i} = \n \n" + " ".join(_SENTENCES[(i + j) % len(_SENTENCES)] for j in range(6)) + " \n \n"
    for i in range(120)
)


def make_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS, with BOS/EOS like Llama 3 and a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    return fast


def make_tiny_config(vocab_size: int = 320, **overrides) -> LlamaConfig:
    """hidden 64 (head_dim 16, 4 heads, 2 kv heads: GQA), intermediate 128, 2 layers, tied embeddings."""
    kw = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}, bos_token_id=0, eos_token_id=1,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@torch.no_grad()
def make_tiny_model(vocab_size: int = 320, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama with non-trivial RMSNorm scales (so fusion is really exercised)."""
    model = LlamaForCausalLM(make_tiny_config(vocab_size, **overrides)).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds, naming what was awaited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


# Tiny random models of every supported non-Llama family, each with its real head_dim, GQA ratio, biases and norms
# (Qwen2.5-0.5B: head_dim 64, 7 query heads per kv head, q/k/v biases; Qwen3-0.6B: head_dim 128, 2 per kv head, q/k
# norms, heads x head_dim != hidden; Phi-4-mini: head_dim 128, 3 per kv head, fused qkv/gate_up, partial rotary 0.75)
FAMILY_SHAPES = {
    "qwen2": dict(hidden_size=448, num_attention_heads=7, num_key_value_heads=1, rope_theta=1000000.0),
    "qwen3": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=128, rope_theta=1000000.0),
    "phi3": dict(hidden_size=384, num_attention_heads=3, num_key_value_heads=1, partial_rotary_factor=0.75,
                 rope_theta=10000.0, longrope=True),
}


@torch.no_grad()
def make_tiny_family_model(family: str, vocab_size: int = 384, intermediate_size: int = 256):
    """A random tiny model of ``family`` (FAMILY_SHAPES), 2 layers, tied embeddings, non-trivial norms and biases."""
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(FAMILY_SHAPES[family])
    rope = {"rope_theta": shape.pop("rope_theta"), "rope_type": "default"}
    if "partial_rotary_factor" in shape:
        rope["partial_rotary_factor"] = shape.pop("partial_rotary_factor")
    if shape.pop("longrope", False):  # Phi-4-mini's LongRoPE: factors per rotary frequency, over 128 original positions
        pairs = int(128 * rope["partial_rotary_factor"]) // 2
        rope.update(rope_type="longrope", original_max_position_embeddings=128,
                    short_factor=[1.0 + 0.05 * i for i in range(pairs)], long_factor=[2.0 + 0.1 * i for i in range(pairs)])
        shape["original_max_position_embeddings"] = 128
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                             "phi3": (Phi3Config, Phi3ForCausalLM)}[family]
    config = config_cls(vocab_size=vocab_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                        max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_parameters=rope,
                        bos_token_id=0, eos_token_id=1, pad_token_id=None, **shape)
    model = model_cls(config).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.05)
    return model
