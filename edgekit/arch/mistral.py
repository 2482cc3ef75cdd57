"""Mistral: the Llama layout with an optional sliding attention window on every layer."""

from edgekit.arch.llama import LlamaFamily


class MistralFamily(LlamaFamily):
    def sliding_window(self, cfg: dict) -> int | None:
        return cfg.get("sliding_window") or None


FAMILY = MistralFamily(model_type="mistral", name="Mistral", config_class="MistralConfig", tokenizer="spm-bpe",
                       gguf_arch="llama", notes=("sliding window on every layer",))
