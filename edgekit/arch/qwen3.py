"""Qwen3 (dense): Qwen2 without the q/k/v biases, with a head_dim-wide RMSNorm on queries and keys, and an explicit
head_dim (not hidden/heads). llama.cpp's `deci` has no q/k norms, so per-layer widths stay out of GGUF."""

from edgekit.arch.qwen2 import Qwen2Family

FAMILY = Qwen2Family(model_type="qwen3", name="Qwen3", config_class="Qwen3Config", tokenizer="bpe-nfc",
                     gguf_arch="qwen3", attention_bias_key="attention_bias", qk_norm=True, gguf_nonuniform=False,
                     notes=("q/k norms", "head_dim set explicitly"))
