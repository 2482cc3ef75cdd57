"""What a vision-language family is (task "vlm"): a vision tower, a projector into the language model's embedding
space, and a decoder that is itself a registered causal-LM family.

Geometry is torch-free (one counter for both towers plus the projector). Module access works on a loaded
transformers model and hands the language model out as a plain causal LM view (edgekit's decoder pruner and the
decoder exporters then work on it unchanged); the vision tower has its own access (layers, q/k/v/out, fc1/fc2,
layer norms) and a width layout (every tensor by how it holds the hidden width, to cut heads with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edgekit.arch.base import Family, Geometry
from edgekit.errors import EdgekitError

VLM = "vlm"


@dataclass(frozen=True)
class VisionLayerWidths:
    intermediate_size: int
    num_attention_heads: int


@dataclass(frozen=True)
class VisionGeometry:
    """A ViT encoder (CLIP layout): patch conv, class + position embeddings, pre/post layer norms, N layers with
    biased q/k/v/out and fc1/fc2, two layer norms each."""

    hidden_size: int
    head_dim: int
    image_size: int
    patch_size: int
    channels: int
    layers: tuple[VisionLayerWidths, ...] = field(default_factory=tuple)
    class_token: bool = True
    pre_norm: bool = True
    post_norm: bool = True
    patch_bias: bool = False

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def layer_params(self, w: VisionLayerWidths) -> dict[str, int]:
        d, a = self.hidden_size, w.num_attention_heads * self.head_dim
        return {"attention": 3 * (d * a + a) + a * d + d,
                "mlp": d * w.intermediate_size + w.intermediate_size + w.intermediate_size * d + d, "norms": 4 * d}

    def params(self) -> int:
        d = self.hidden_size
        emb = self.channels * self.patch_size ** 2 * d + (d if self.patch_bias else 0)
        emb += (self.patches + int(self.class_token)) * d + (d if self.class_token else 0)
        emb += 2 * d * (int(self.pre_norm) + int(self.post_norm))
        return emb + sum(sum(self.layer_params(w).values()) for w in self.layers)

    def with_(self, **kw) -> "VisionGeometry":
        return replace(self, **kw)


@dataclass(frozen=True)
class WidthLayout:
    """An image tower's tensors (full state-dict names) by how they hold its hidden (residual) width. The attention
    sizes head_dim as hidden / heads, so heads are cut together with hidden channels (kept heads x head_dim of
    them): q/k/v rows and out columns follow the kept heads, everything listed here follows the kept channels."""

    vectors: tuple[str, ...] = ()  # last dim is the hidden width: norms, class / position embeddings, a probe
    writers: tuple[str, ...] = ()  # prefixes (+ "weight" / "bias") whose output rows are hidden channels
    readers: tuple[str, ...] = ()  # weights whose input columns are hidden channels
    # per attention block: ((q, k, v) prefixes, out prefix); one fused prefix holds [q; k; v] rows (MultiheadAttention)
    attention: tuple[tuple[tuple[str, ...], str], ...] = ()

    def __add__(self, o: "WidthLayout") -> "WidthLayout":
        return WidthLayout(self.vectors + o.vectors, self.writers + o.writers, self.readers + o.readers,
                           self.attention + o.attention)


def clip_width_layout(prefix: str, g: VisionGeometry) -> WidthLayout:
    """CLIP's tower layout (SigLIP's and Idefics3's share its names, without the class token and pre-norm)."""
    def norm(n):
        return (f"{prefix}{n}.weight", f"{prefix}{n}.bias")

    vec = [f"{prefix}embeddings.position_embedding.weight"] + ([f"{prefix}embeddings.class_embedding"]
                                                                if g.class_token else [])
    vec += norm("pre_layrnorm") if g.pre_norm else ()  # transformers' spelling
    vec += norm("post_layernorm") if g.post_norm else ()
    writers, readers, attn = [f"{prefix}embeddings.patch_embedding."], [], []
    for i in range(len(g.layers)):
        p = f"{prefix}encoder.layers.{i}."
        vec += norm(p[len(prefix):] + "layer_norm1") + norm(p[len(prefix):] + "layer_norm2")
        writers.append(p + "mlp.fc2.")
        readers.append(p + "mlp.fc1.weight")
        attn.append(((p + "self_attn.q_proj.", p + "self_attn.k_proj.", p + "self_attn.v_proj."),
                     p + "self_attn.out_proj."))
    return WidthLayout(tuple(vec), tuple(writers), tuple(readers), tuple(attn))


@dataclass(frozen=True)
class VlmGeometry:
    vision: VisionGeometry
    language: Geometry
    projector_in: int  # vision hidden x feature layers concatenated
    projector_bias: bool
    image_tokens: int  # positions one image takes in the language model's sequence (and its KV cache)
    projector_layers: int = 2  # LLaVA: linear_1 -> act -> linear_2; Idefics3: one linear after the pixel shuffle

    @property
    def projector_params(self) -> int:
        t = self.language.hidden_size
        if self.projector_layers == 1:
            return self.projector_in * t + (t if self.projector_bias else 0)
        return self.projector_in * t + t * t + (2 * t if self.projector_bias else 0)

    def params(self) -> int:
        return self.vision.params() + self.projector_params + self.language.params()

    def parts(self) -> dict[str, int]:
        return {"vision": self.vision.params(), "projector": self.projector_params,
                "language": self.language.params()}


@dataclass(frozen=True)
class VlmFamily:
    """A vision-language family. `language_families`: the decoder families its text_config may name."""

    model_type: str
    name: str
    config_class: str
    vision_model_types: tuple[str, ...]
    task: str = VLM
    image_token: str = "<image>"
    notes: tuple[str, ...] = ()
    image_token_key = "image_token_index"  # the config key holding the image token's id
    extra_tokens = ("<image>",)  # special tokens the family's tokenizer adds

    def image_token_id(self, cfg: dict) -> int:
        return cfg[self.image_token_key]

    def pixel_batch(self, proc, images) -> object:
        """pixel_values (numpy) of one image per prompt, as the family's image processor lays them out."""
        return proc(images=images, return_tensors="np")["pixel_values"]

    def image_prompt(self, tok, cfg: dict) -> list[int]:
        """The token ids one image takes in a prompt (the image tokens plus any wrapping the processor adds)."""
        return [self.image_token_id(cfg)] * self.image_tokens(cfg)
    # llama.cpp's clip.projector_type for this family's mmproj file; None: llama.cpp (or edgekit) has no mmproj for it
    mmproj_projector_type: str | None = None
    mmproj_template_pieces = ()  # ordinary text pieces llama.cpp's image template for the family looks up

    # -- config -> geometry (torch-free) ---------------------------------------------------------------------
    def language_family(self, cfg: dict) -> Family:
        from edgekit.arch import get_family

        return get_family((cfg.get("text_config") or {}).get("model_type", "llama"))

    def check_config(self, cfg: dict) -> None:
        vt = (cfg.get("vision_config") or {}).get("model_type", "clip_vision_model")
        if vt not in self.vision_model_types:
            raise EdgekitError(f"this {self.name} model has a {vt!r} vision tower; edgekit carries "
                               f"{', '.join(self.vision_model_types)}",
                               f"use a {self.name} checkpoint with a {self.vision_model_types[0]} vision tower")
        self.language_family(cfg).check_config(self.text_config(cfg))

    def text_config(self, cfg: dict) -> dict:
        t = dict(cfg.get("text_config") or {})
        t.setdefault("model_type", "llama")
        return t

    def vision_geometry(self, cfg: dict) -> VisionGeometry:
        v = cfg.get("vision_config") or {}
        d, h = v.get("hidden_size", 768), v.get("num_attention_heads", 12)
        inter, n = v.get("intermediate_size", 3072), v.get("num_hidden_layers", 12)
        return VisionGeometry(hidden_size=d, head_dim=d // h, image_size=v.get("image_size", 224),
                              patch_size=v.get("patch_size", 32), channels=v.get("num_channels", 3),
                              layers=(VisionLayerWidths(inter, h),) * n)

    def feature_layers(self, cfg: dict) -> int:
        f = cfg.get("vision_feature_layer", -2)
        return 1 if isinstance(f, int) else len(f)

    def image_tokens(self, cfg: dict) -> int:
        g = self.vision_geometry(cfg)
        full = cfg.get("vision_feature_select_strategy", "default") == "full"
        return g.patches + (1 if full else 0)

    def geometry(self, cfg: dict) -> VlmGeometry:
        vis = self.vision_geometry(cfg)
        t = self.text_config(cfg)
        return VlmGeometry(vision=vis, language=self.language_family(cfg).geometry(t),
                           projector_in=vis.hidden_size * self.feature_layers(cfg),
                           projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
                           image_tokens=self.image_tokens(cfg))

    # -- module access (a loaded transformers model) ---------------------------------------------------------
    def vision_tower(self, model):
        raise NotImplementedError

    def vision_layers(self, model) -> list:
        raise NotImplementedError

    # one vision encoder layer: CLIP's and SigLIP's share these names (a tower that differs overrides them)
    def vision_qkv(self, layer) -> tuple:
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj

    def vision_out(self, layer):
        return layer.self_attn.out_proj

    def vision_fc(self, layer) -> tuple:
        return layer.mlp.fc1, layer.mlp.fc2

    def vision_norms(self, layer) -> list:
        return [layer.layer_norm1, layer.layer_norm2]

    def projector(self, model):
        """The projector's linear layers, input side first."""
        raise NotImplementedError

    def vision_features(self, model, pixel_values):
        """The vision hidden states the projector reads (distillation's phase-2 target)."""
        raise NotImplementedError

    def prune_projector(self, sd: dict, hidden, inner) -> None:
        """Cut the projector tensors in state dict sd to the kept LM hidden channels (and inner units)."""
        raise NotImplementedError

    def vision_width_layout(self, cfg: dict) -> WidthLayout:
        """The vision tower's tensors by how they hold its hidden width (CLIP's names; SigLIP-style towers share
        them); the projector's input is cut apart (prune_projector_input)."""
        return clip_width_layout(self.VISION_PREFIX, self.vision_geometry(cfg))

    PROJECTOR_INPUT = ""  # the state-dict name of the weight reading the vision hidden states

    def prune_projector_input(self, sd: dict, channels, width: int) -> None:
        """Cut the projector's input columns to the kept vision channels. Its input is blocks of the vision width
        (LLaVA: feature layers concatenated; Idefics3: the scale^2 pixel-shuffled neighbours, each a whole
        vision-width vector): channel c of block j is column j * width + c."""
        import torch

        w = sd[self.PROJECTOR_INPUT]
        blocks = w.shape[1] // width
        cols = torch.cat([torch.as_tensor(channels, dtype=torch.long) + j * width for j in range(blocks)])
        sd[self.PROJECTOR_INPUT] = w[:, cols]

    def mmproj_tensors(self, model):
        """(name, tensor) pairs for the mmproj writer: "vision:<HF name under the tower>" (mapped by gguf-py) or
        "projector:<llama.cpp name>"."""
        raise NotImplementedError

    def language_view(self, model):
        """The language model as a plain causal LM sharing the VLM's parameters (gradients, cuts and saves go
        through it), so the decoder family's module access applies unchanged."""
        raise NotImplementedError
