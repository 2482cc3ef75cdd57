"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases; its tokenizer normalizes NFC (pre-tokenizer `qwen2`)."""

from edgekit.arch.llama import LlamaFamily


class Qwen2Family(LlamaFamily):
    def sliding_window(self, cfg: dict) -> int | None:
        return cfg.get("sliding_window") if cfg.get("use_sliding_window") else None

    def layer_types(self, cfg: dict) -> list[str]:
        if cfg.get("layer_types"):
            return list(cfg["layer_types"])
        n, w = cfg["num_hidden_layers"], self.sliding_window(cfg)
        first_full = cfg.get("max_window_layers", n)  # transformers: layers >= max_window_layers slide
        return ["sliding_attention" if w and i >= first_full else "full_attention" for i in range(n)]


FAMILY = Qwen2Family(model_type="qwen2", name="Qwen2", config_class="Qwen2Config", tokenizer="bpe-nfc",
                     gguf_arch="qwen2", qkv_bias=True)
