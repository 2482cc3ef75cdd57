"""What a vision-encoder family is (task "vision-encoder"): an image tower alone (CLIP's or SigLIP's vision model,
ViT), pixel_values -> token features and a pooled image embedding.

Geometry is torch-free (VisionGeometry, the counter the VLM towers use, plus the pooling head). Module access works
on a loaded transformers model: its layers, each layer's MLP (up, down) and attention projections, and every MLP
whose width is `intermediate_size` (SigLIP's attention-pooling head has one too, so a cut must take it along).
All three derive head_dim from hidden_size / heads, so heads are cut together with hidden channels (width_layout:
every tensor by how it holds the hidden width).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.arch.vlm import VisionGeometry, VisionLayerWidths, WidthLayout, clip_width_layout
from edgekit.errors import EdgekitError

VISION_ENCODER = "vision-encoder"


@dataclass(frozen=True)
class VisionEncoderGeometry:
    vision: VisionGeometry
    head_params: int  # the pooling head: SigLIP's attention pool, ViT's dense pooler; 0 for CLIP (post-norm only)

    def params(self) -> int:
        return self.vision.params() + self.head_params

    @property
    def tokens(self) -> int:
        return self.vision.patches + int(self.vision.class_token)


@dataclass(frozen=True)
class VisionEncoderFamily:
    model_type: str
    name: str
    model_class: str  # transformers class that loads a saved folder
    processor_class: str  # its image processor
    class_token: bool
    pre_norm: bool
    patch_bias: bool
    pooling: str  # "cls-norm" (CLIP), "attention-head" (SigLIP), "dense-tanh" (ViT)
    task: str = VISION_ENCODER
    notes: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output")  # what an exported encoder returns

    def check_config(self, cfg: dict) -> None:
        d, h = cfg.get("hidden_size", 768), cfg.get("num_attention_heads", 12)
        if d % h:
            raise EdgekitError(f"hidden_size {d} is not a multiple of num_attention_heads {h}",
                               f"use a {self.name} checkpoint whose config loads in transformers")

    def geometry(self, cfg: dict) -> VisionEncoderGeometry:
        d, h = cfg.get("hidden_size", 768), cfg.get("num_attention_heads", 12)
        inter, n = cfg.get("intermediate_size", 3072), cfg.get("num_hidden_layers", 12)
        vis = VisionGeometry(hidden_size=d, head_dim=d // h, image_size=cfg.get("image_size", 224),
                             patch_size=cfg.get("patch_size", 16), channels=cfg.get("num_channels", 3),
                             layers=(VisionLayerWidths(inter, h),) * n, class_token=self.class_token,
                             pre_norm=self.pre_norm, post_norm=True, patch_bias=self.patch_bias)
        return VisionEncoderGeometry(vis, self.head_params(cfg))

    def head_params(self, cfg: dict) -> int:
        return 0

    # -- module access (a loaded transformers model) ---------------------------------------------------------
    def layers(self, model) -> list:
        return list(model.vision_model.encoder.layers)

    def mlp(self, layer) -> tuple:
        return layer.mlp.fc1, layer.mlp.fc2

    def mlps(self, model) -> list[tuple]:
        """Every (up, down) pair whose width is config.intermediate_size."""
        return [self.mlp(layer) for layer in self.layers(model)]

    def attention(self, layer) -> tuple:
        """(q, k, v, out) projections of one layer."""
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj, a.out_proj

    def width_layout(self, cfg: dict) -> WidthLayout:
        return clip_width_layout("vision_model.", self.geometry(cfg).vision)

    def width_config(self, cfg: dict, hidden: int, heads: int) -> dict:
        """cfg with the hidden width and heads cut."""
        return {**cfg, "hidden_size": hidden, "num_attention_heads": heads}

    def pixel_batch(self, proc, images) -> object:
        """pixel_values (numpy) of the images, as the tower's image processor lays them out (the vision gate's hook)."""
        return proc(images=images, return_tensors="np")["pixel_values"]

    def image_features(self, model, pixel_values) -> tuple:
        """(last_hidden_state (B, tokens, hidden), pooled image embedding (B, hidden)): `outputs`, in order."""
        out = model(pixel_values=pixel_values)
        return out.last_hidden_state, out.pooler_output


class ClipVisionFamily(VisionEncoderFamily):
    pass


class SiglipVisionFamily(VisionEncoderFamily):
    def head_params(self, cfg: dict) -> int:
        if not cfg.get("vision_use_head", True):
            return 0
        d, inter = cfg.get("hidden_size", 768), cfg.get("intermediate_size", 3072)
        return d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * inter + inter + inter * d + d)

    def mlps(self, model) -> list[tuple]:
        head = getattr(model.vision_model, "head", None)
        return super().mlps(model) + ([(head.mlp.fc1, head.mlp.fc2)] if head is not None else [])

    def width_layout(self, cfg: dict) -> WidthLayout:
        base = super().width_layout(cfg)
        if not cfg.get("vision_use_head", True):
            return base
        h = "vision_model.head."  # the pooling attention has heads too: MultiheadAttention's fused in_proj
        return base + WidthLayout((h + "probe", h + "layernorm.weight", h + "layernorm.bias"), (h + "mlp.fc2.",),
                                  (h + "mlp.fc1.weight",), (((h + "attention.in_proj_",), h + "attention.out_proj."),))


class VitFamily(VisionEncoderFamily):
    def head_params(self, cfg: dict) -> int:
        d = cfg.get("hidden_size", 768)
        p = cfg.get("pooler_output_size") or d
        return d * p + p  # the pooler (ViTModel's default add_pooling_layer)

    def layers(self, model) -> list:
        return list(model.encoder.layer)

    def mlp(self, layer) -> tuple:
        return layer.intermediate.dense, layer.output.dense

    def attention(self, layer) -> tuple:
        a = layer.attention
        return a.attention.query, a.attention.key, a.attention.value, a.output.dense

    def width_layout(self, cfg: dict) -> WidthLayout:
        def norm(n):
            return (n + ".weight", n + ".bias")

        # mask_token / pooler only where the model has them (cut_width skips absent names; the load checks shapes)
        vec = ["embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token", *norm("layernorm")]
        writers, readers, attn = ["embeddings.patch_embeddings.projection."], ["pooler.dense.weight"], []
        for i in range(cfg.get("num_hidden_layers", 12)):
            p = f"encoder.layer.{i}."
            vec += norm(p + "layernorm_before") + norm(p + "layernorm_after")
            writers.append(p + "output.dense.")
            readers.append(p + "intermediate.dense.weight")
            attn.append(((p + "attention.attention.query.", p + "attention.attention.key.",
                          p + "attention.attention.value."), p + "attention.output.dense."))
        return WidthLayout(tuple(vec), tuple(writers), tuple(readers), tuple(attn))

    def width_config(self, cfg: dict, hidden: int, heads: int) -> dict:
        # the pooler's output is not a hidden channel: it keeps its width (the pooled embedding's size)
        return {**super().width_config(cfg, hidden, heads),
                "pooler_output_size": cfg.get("pooler_output_size") or cfg.get("hidden_size", 768)}
