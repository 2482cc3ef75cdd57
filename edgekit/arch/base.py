"""What a model family is: geometry (a torch-free parameter counter), module access for pruning, and export facts.

A family is one frozen `Family` record (subclassed only where its modules differ from the Llama layout). Everything
family-specific lives here and in the family's module; the stages ask the family, never `config.model_type`.

Module access works on *logical* projections: q/k/v and gate/up are `Proj` views (a module and a row range), so a
fused `qkv_proj` (Phi-3) or `gate_up_proj` is read and cut exactly like split ones. Residual-stream norms are listed
with the role of what reads or writes them, so pruning hidden channels touches every one of them (Gemma 3 has four
per layer) and importance knows which projections read each.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edgekit.errors import EdgekitError

WIDTHS_KEY = "edgekit_layer_widths"  # config.json key of a non-uniform pruned folder (contract with the exporters)

# Roles of residual-stream norms: what consumes the norm's output.
ATTN_IN = "attn_in"  # read by q/k/v
MLP_IN = "mlp_in"  # read by gate/up
ATTN_OUT = "attn_out"  # normalizes the attention output before it joins the stream (Gemma's post norms)
MLP_OUT = "mlp_out"
FINAL = "final"  # read by the LM head


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
    """Everything that decides the parameter count of a decoder (one counter for plan, prune, report, exporters)."""

    vocab_size: int
    hidden_size: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    layers: tuple[LayerWidths, ...] = field(default_factory=tuple)
    norms_per_layer: int = 2  # residual-stream norms per layer (Gemma 3: 4)
    qk_norm: bool = False  # a head_dim-wide norm on queries and one on keys, per layer (Qwen3, Gemma 3)

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied else 2)

    def layer_params(self, w: LayerWidths) -> dict[str, int]:
        d, hd = self.hidden_size, self.head_dim
        q, kv = w.num_attention_heads * hd, w.num_key_value_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * d * w.intermediate_size + (2 * w.intermediate_size + d if self.mlp_bias else 0)
        return {"attention": attn, "mlp": mlp, "norms": self.norms_per_layer * d}

    def params(self) -> int:
        return self.embedding_params + self.hidden_size + sum(sum(self.layer_params(w).values()) for w in self.layers)

    def with_(self, **kw) -> "Geometry":
        return replace(self, **kw)


@dataclass(frozen=True)
class Proj:
    """Rows [start, stop) of a linear layer: one logical projection (the whole module unless it is fused)."""

    module: object
    start: int
    stop: int

    @classmethod
    def whole(cls, module) -> "Proj":
        return cls(module, 0, module.out_features)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def weight(self):
        return self.module.weight[self.start:self.stop]

    @property
    def bias(self):
        b = self.module.bias
        return None if b is None else b[self.start:self.stop]


@dataclass(frozen=True)
class Family:
    """One model family. Fields are facts; methods give module access on a loaded Hugging Face model."""

    model_type: str  # config.json model_type
    name: str  # what users call it
    config_class: str  # transformers config class that rebuilds a pruned config
    tokenizer: str  # the tokenizer kind its checkpoints ship: bpe-bytelevel | bpe-nfc | spm-bpe
    gguf_arch: str  # llama.cpp architecture for uniform widths
    task: str = "causal-lm"  # the registry's task key (edgekit.arch: decoder families vs VLM families)
    qkv_bias: bool = False  # q/k/v biases always (Qwen2)
    attention_bias_key: str | None = None  # config key that adds biases to q/k/v/o
    mlp_bias_key: str | None = None
    qk_norm: bool = False
    norm_names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    norm_roles: tuple[str, ...] = (ATTN_IN, MLP_IN)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (offset + weight)
    # llama.cpp's `deci` builds each layer with its own widths but has the Llama layout only (two norms, SiLU MLP,
    # no q/k norms, no embedding scale): families that fit it can export per-layer widths to GGUF.
    gguf_nonuniform: bool = True
    # ONNX Runtime's lean decoder graph (onnxruntime-genai's builder, exporters/ort_genai.py) takes this family;
    # tests/test_families.py gates it against PyTorch for each one. False: optimum's graph (slower per kernel).
    ort_lean: bool = True
    fused: bool = False  # checkpoints store qkv_proj and gate_up_proj fused (llama.cpp's own arch keeps them so)
    notes: tuple[str, ...] = ()  # export quirks worth saying in docs and errors
    tie_default: bool = False  # tie_word_embeddings when config.json omits it (save_pretrained omits defaults)

    # -- config -> geometry (torch-free) ---------------------------------------------------------------------
    def has_qkv_bias(self, cfg: dict) -> bool:
        return self.qkv_bias or bool(self.attention_bias_key and cfg.get(self.attention_bias_key))

    def has_o_bias(self, cfg: dict) -> bool:
        return bool(self.attention_bias_key and cfg.get(self.attention_bias_key))

    def has_mlp_bias(self, cfg: dict) -> bool:
        return bool(self.mlp_bias_key and cfg.get(self.mlp_bias_key))

    def tied(self, cfg: dict) -> bool:
        return bool(cfg.get("tie_word_embeddings", self.tie_default))

    def head_dim(self, cfg: dict) -> int:
        return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])

    def rotary_dim(self, cfg: dict) -> int:
        """Channels of each head that carry rotary position (all, unless the family rotates part of the head)."""
        return int(self.head_dim(cfg) * float(cfg.get("partial_rotary_factor") or 1.0))

    def geometry(self, cfg: dict) -> Geometry:
        required = ("num_attention_heads", "hidden_size", "vocab_size")
        if not cfg.get(WIDTHS_KEY):
            required += ("intermediate_size", "num_hidden_layers")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise EdgekitError(f"config.json of this {self.name} model lacks {', '.join(missing)}",
                               "use the config.json the model was trained with (save_pretrained writes it whole)")
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        if cfg.get(WIDTHS_KEY):
            layers = tuple(LayerWidths(**w) for w in cfg[WIDTHS_KEY])
        else:
            layers = (LayerWidths(cfg["intermediate_size"], heads, kv),) * cfg["num_hidden_layers"]
        return Geometry(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], head_dim=self.head_dim(cfg),
                        tied=self.tied(cfg), qkv_bias=self.has_qkv_bias(cfg),
                        o_bias=self.has_o_bias(cfg), mlp_bias=self.has_mlp_bias(cfg), layers=layers,
                        norms_per_layer=len(self.norm_names), qk_norm=self.qk_norm)

    def sliding_window(self, cfg: dict) -> int | None:
        """The attention window, when some layer attends only to the last N tokens (None: full attention)."""
        return None

    def layer_types(self, cfg: dict) -> list[str]:
        """Per layer "full_attention" or "sliding_attention"."""
        w = self.sliding_window(cfg)
        kind = "sliding_attention" if w else "full_attention"
        return list(cfg.get("layer_types") or [kind] * cfg["num_hidden_layers"])

    # -- module access (a loaded transformers model) ---------------------------------------------------------
    def layers(self, model) -> list:
        return list(model.model.layers)

    def qkv(self, layer) -> tuple[Proj, Proj, Proj]:
        a = layer.self_attn
        return Proj.whole(a.q_proj), Proj.whole(a.k_proj), Proj.whole(a.v_proj)

    def o(self, layer):
        return layer.self_attn.o_proj

    def gate_up(self, layer) -> tuple[Proj, Proj]:
        return Proj.whole(layer.mlp.gate_proj), Proj.whole(layer.mlp.up_proj)

    def down(self, layer):
        return layer.mlp.down_proj

    def qk_norms(self, layer) -> list:
        a = layer.self_attn
        return [a.q_norm, a.k_norm] if self.qk_norm else []

    def layer_norms(self, layer) -> list:
        return [getattr(layer, n) for n in self.norm_names]

    def final_norm(self, model):
        return model.model.norm

    def norms(self, model) -> list:
        """Every norm on the residual stream, in forward order: each layer's (norm_names), then the final one."""
        out = []
        for layer in self.layers(model):
            out += self.layer_norms(layer)
        return out + [self.final_norm(model)]

    def norm_role_list(self, n_layers: int) -> list[str]:
        return list(self.norm_roles) * n_layers + [FINAL]

    def mlp_input_norm(self, layer):
        """The norm whose input is the residual stream entering the MLP block (after attention has written)."""
        return getattr(layer, self.norm_names[self.norm_roles.index(MLP_IN)])

    def widths_of(self, layer, head_dim: int) -> LayerWidths:
        q, k, _ = self.qkv(layer)
        return LayerWidths(self.gate_up(layer)[0].out_features, q.out_features // head_dim,
                           k.out_features // head_dim)

    # -- pruned checkpoints ----------------------------------------------------------------------------------
    def scale_norm(self, weight, scale: float):
        """The norm weight that multiplies its output by `scale` (RMS correction after a hidden cut)."""
        return (weight + self.norm_offset) * scale - self.norm_offset

    def layer_state(self, i: int, t: dict) -> dict:
        """Standard Hugging Face tensor names of layer i from logical pieces (q/k/v/o/gate/up/down .weight/.bias,
        norm names, q_norm/k_norm)."""
        p = f"model.layers.{i}."
        out = {}
        for k, v in t.items():
            proj, _, kind = k.partition(".")
            if proj in ("q", "k", "v", "o"):
                out[f"{p}self_attn.{proj}_proj.{kind}"] = v
            elif proj in ("gate", "up", "down"):
                out[f"{p}mlp.{proj}_proj.{kind}"] = v
            elif proj in ("q_norm", "k_norm"):
                out[f"{p}self_attn.{k}"] = v
            else:
                out[p + k] = v
        return out

    def embed_fixup(self, d_old: int, d_new: int) -> float:
        """Factor the kept embedding columns are multiplied by when the hidden width changes (1: none needed)."""
        return 1.0

    def reshape_layer(self, layer, w: LayerWidths, hidden: int, head_dim: int) -> None:
        """Give one decoder layer of a freshly built model its own widths (non-uniform pruning)."""
        from torch import nn

        a, m = layer.self_attn, layer.mlp
        H, K, I = w.num_attention_heads, w.num_key_value_heads, w.intermediate_size
        D, hd = hidden, head_dim

        def lin(i, o, old):
            return nn.Linear(i, o, bias=old.bias is not None)

        a.q_proj, a.k_proj = lin(D, H * hd, a.q_proj), lin(D, K * hd, a.k_proj)
        a.v_proj, a.o_proj = lin(D, K * hd, a.v_proj), lin(H * hd, D, a.o_proj)
        a.num_key_value_groups = H // K
        m.gate_proj, m.up_proj, m.down_proj = lin(D, I, m.gate_proj), lin(D, I, m.up_proj), lin(I, D, m.down_proj)
        for n in ("num_heads", "num_attention_heads"):  # not read by current transformers; kept truthful anyway
            if hasattr(a, n):
                setattr(a, n, H)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_config(self, cfg: dict) -> None:
        """Refuse configs whose quirks edgekit cannot carry (before any work)."""


def describe(families) -> str:
    return ", ".join(f.name for f in families)
