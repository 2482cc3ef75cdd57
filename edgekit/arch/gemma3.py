"""Gemma 3 text (`gemma3_text`): four norms per layer (pre/post around attention and MLP), q/k norms, RMSNorm
weights stored as w and applied as (1 + w), embeddings scaled by sqrt(hidden), sliding-window and global layers
interleaved, a head_dim that is not hidden/heads, GELU-tanh MLP. About 60% of a 270M Gemma sits in its embedding."""

from edgekit.arch.base import ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT, Family
from edgekit.errors import EdgekitError


class Gemma3Family(Family):
    def sliding_window(self, cfg: dict) -> int | None:
        return cfg.get("sliding_window") or None

    def layer_types(self, cfg: dict) -> list[str]:
        if cfg.get("layer_types"):
            return list(cfg["layer_types"])
        n, every = cfg["num_hidden_layers"], int(cfg.get("sliding_window_pattern") or 6)
        return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]

    def embed_fixup(self, d_old: int, d_new: int) -> float:
        # the model multiplies embeddings by sqrt(hidden_size): keep the kept channels' scale when hidden shrinks
        return (d_old / d_new) ** 0.5

    def check_config(self, cfg: dict) -> None:
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key):
                raise EdgekitError(f"this Gemma 3 config sets {key}, which Gemma 3 checkpoints do not use and "
                                   "edgekit's exporters do not carry", f"remove {key} from config.json")


FAMILY = Gemma3Family(
    model_type="gemma3_text", name="Gemma 3", config_class="Gemma3TextConfig", tokenizer="spm-bpe",
    gguf_arch="gemma3", attention_bias_key="attention_bias", qk_norm=True, norm_offset=1.0, gguf_nonuniform=False,
    tie_default=True, norm_names=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm"),
    norm_roles=(ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT),
    notes=("four norms per layer", "q/k norms", "(1 + w) norms", "scaled embedding", "interleaved sliding window"))
