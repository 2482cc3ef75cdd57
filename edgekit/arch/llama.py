"""Llama 1/2/3.x (and SmolLM, TinyLlama): the reference layout every other family is described against."""

from edgekit.arch.base import Family
from edgekit.errors import EdgekitError

ROPE_TYPES = ("default", "linear", "llama3")  # what edgekit carries into every backend


class LlamaFamily(Family):
    def check_config(self, cfg: dict) -> None:
        rs = cfg.get("rope_scaling") or {}
        kind = rs.get("rope_type") or rs.get("type") or "default"
        if kind not in ROPE_TYPES:
            raise EdgekitError(f"rope_scaling {kind!r} of this {self.name} model is not supported",
                               f"use a checkpoint with rope scaling {', '.join(ROPE_TYPES)}")


FAMILY = LlamaFamily(model_type="llama", name="Llama", config_class="LlamaConfig", tokenizer="bpe-bytelevel",
                     gguf_arch="llama", attention_bias_key="attention_bias", mlp_bias_key="mlp_bias")
