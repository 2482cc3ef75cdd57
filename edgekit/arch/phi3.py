"""Phi-3 and Phi-4-mini (`phi3`): fused qkv_proj (q rows, then k, then v) and gate_up_proj (gate rows, then up),
partial rotary (Phi-4-mini rotates 3/4 of each head), an optional sliding window."""

from edgekit.arch.base import LayerWidths, Proj
from edgekit.arch.llama import LlamaFamily
from edgekit.errors import EdgekitError


class Phi3Family(LlamaFamily):
    def sliding_window(self, cfg: dict) -> int | None:
        return cfg.get("sliding_window") or None

    def check_config(self, cfg: dict) -> None:
        rs = cfg.get("rope_scaling") or {}
        kind = rs.get("rope_type") or rs.get("type") or "default"
        if kind != "default":
            raise EdgekitError(f"rope_scaling {kind!r} (long-context Phi-3) is not supported by edgekit yet",
                               "use the 4k-context checkpoint of this model")

    def qkv(self, layer):
        a = layer.self_attn
        hd = a.head_dim
        q = a.config.num_attention_heads * hd  # per layer after reshape_layer (each layer has its own config)
        kv = (a.qkv_proj.out_features - q) // 2
        return Proj(a.qkv_proj, 0, q), Proj(a.qkv_proj, q, q + kv), Proj(a.qkv_proj, q + kv, q + 2 * kv)

    def gate_up(self, layer):
        gu = layer.mlp.gate_up_proj
        half = gu.out_features // 2
        return Proj(gu, 0, half), Proj(gu, half, 2 * half)

    def layer_state(self, i: int, t: dict) -> dict:
        import torch

        p = f"model.layers.{i}."
        out = {f"{p}self_attn.qkv_proj.weight": torch.cat([t["q.weight"], t["k.weight"], t["v.weight"]]),
               f"{p}self_attn.o_proj.weight": t["o.weight"],
               f"{p}mlp.gate_up_proj.weight": torch.cat([t["gate.weight"], t["up.weight"]]),
               f"{p}mlp.down_proj.weight": t["down.weight"]}
        for n in self.norm_names:
            out[p + n + ".weight"] = t[n + ".weight"]
        return out

    def reshape_layer(self, layer, w: LayerWidths, hidden: int, head_dim: int) -> None:
        import copy

        from torch import nn

        a, m = layer.self_attn, layer.mlp
        H, K, I = w.num_attention_heads, w.num_key_value_heads, w.intermediate_size
        a.qkv_proj = nn.Linear(hidden, (H + 2 * K) * head_dim, bias=False)
        a.o_proj = nn.Linear(H * head_dim, hidden, bias=False)
        # Phi3Attention splits qkv with config.num_attention_heads and self.num_key_value_heads: give the layer a
        # config of its own so each layer splits at its own widths
        a.config = copy.copy(a.config)
        a.config.num_attention_heads, a.config.num_key_value_heads = H, K
        a.num_key_value_heads, a.num_key_value_groups = K, H // K
        m.gate_up_proj = nn.Linear(hidden, 2 * I, bias=False)
        m.down_proj = nn.Linear(I, hidden, bias=False)


FAMILY = Phi3Family(model_type="phi3", name="Phi-3 / Phi-4-mini", config_class="Phi3Config", tokenizer="spm-bpe",
                    gguf_arch="phi3", fused=True, notes=("fused qkv_proj and gate_up_proj", "partial rotary"))
