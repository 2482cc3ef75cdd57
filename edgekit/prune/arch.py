"""Per-architecture adapters (one small entry each) and the geometry of a (possibly pruned) decoder.

Llama, Qwen2 and Mistral share Hugging Face's decoder layout (model.embed_tokens, model.layers[i].self_attn.{q,k,v,o}
_proj, .mlp.{gate,up,down}_proj, .input_layernorm, .post_attention_layernorm, model.norm, lm_head); what differs is
which projections carry biases and which config class rebuilds them. An adapter says exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edgekit.errors import EdgekitError

WIDTHS_KEY = "edgekit_layer_widths"  # config.json key of a non-uniform pruned folder (contract with the GGUF exporter)


@dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    config_class: str  # transformers class name that rebuilds the pruned config
    qkv_bias: bool = False  # Qwen2 always has q/k/v biases
    # config keys whose truth may make biases appear on other projections
    attention_bias_key: str | None = "attention_bias"
    mlp_bias_key: str | None = "mlp_bias"

    def has_qkv_bias(self, cfg: dict) -> bool:
        return self.qkv_bias or bool(self.attention_bias_key and cfg.get(self.attention_bias_key))

    def has_o_bias(self, cfg: dict) -> bool:
        return bool(self.attention_bias_key and cfg.get(self.attention_bias_key))

    def has_mlp_bias(self, cfg: dict) -> bool:
        return bool(self.mlp_bias_key and cfg.get(self.mlp_bias_key))

    # module access: identical for the three supported layouts
    @staticmethod
    def layers(model):
        return model.model.layers

    @staticmethod
    def norms(model) -> list:
        """Every RMSNorm that scales the residual stream, in forward order (its weight is a hidden-size vector)."""
        out = []
        for layer in model.model.layers:
            out += [layer.input_layernorm, layer.post_attention_layernorm]
        return out + [model.model.norm]


ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", "LlamaConfig"),
    "mistral": ArchAdapter("mistral", "MistralConfig", attention_bias_key=None, mlp_bias_key=None),
    "qwen2": ArchAdapter("qwen2", "Qwen2Config", qkv_bias=True, attention_bias_key=None, mlp_bias_key=None),
}


def get_adapter(model_type: str) -> ArchAdapter:
    if model_type not in ADAPTERS:
        raise EdgekitError(f"pruning does not support architecture {model_type or '(none)'!r}; it supports "
                           f"{', '.join(sorted(ADAPTERS))}", "use a Llama, Qwen2 or Mistral causal LM")
    return ADAPTERS[model_type]


@dataclass(frozen=True)
class LayerWidths:
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def to_dict(self) -> dict:
        return {"intermediate_size": self.intermediate_size, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads}


@dataclass(frozen=True)
class Geometry:
    """Everything that decides the parameter count of a decoder."""

    vocab_size: int
    hidden_size: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    layers: tuple[LayerWidths, ...] = field(default_factory=tuple)

    @classmethod
    def from_config(cls, cfg: dict) -> "Geometry":
        ad = get_adapter(cfg.get("model_type", ""))
        missing = [k for k in ("num_attention_heads", "hidden_size", "vocab_size") + (
            () if cfg.get(WIDTHS_KEY) else ("intermediate_size", "num_hidden_layers")) if k not in cfg]
        if missing:
            raise EdgekitError(f"config.json of this {ad.model_type} model lacks {', '.join(missing)}",
                               "use the config.json the model was trained with (save_pretrained writes it whole)")
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        if cfg.get(WIDTHS_KEY):
            layers = tuple(LayerWidths(**w) for w in cfg[WIDTHS_KEY])
        else:
            layers = (LayerWidths(cfg["intermediate_size"], heads, kv),) * cfg["num_hidden_layers"]
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=ad.has_qkv_bias(cfg),
                   o_bias=ad.has_o_bias(cfg), mlp_bias=ad.has_mlp_bias(cfg), layers=layers)

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def layer_params(self, w: LayerWidths) -> dict[str, int]:
        d, hd = self.hidden_size, self.head_dim
        q, kv = w.num_attention_heads * hd, w.num_key_value_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        mlp = 3 * d * w.intermediate_size + (2 * w.intermediate_size + d if self.mlp_bias else 0)
        return {"attention": attn, "mlp": mlp, "norms": 2 * d}

    def params(self) -> int:
        emb = self.vocab_size * self.hidden_size * (1 if self.tied else 2)
        return emb + self.hidden_size + sum(sum(self.layer_params(w).values()) for w in self.layers)

    def with_(self, **kw) -> "Geometry":
        return replace(self, **kw)
