"""ViT (`vit`, transformers' ViTModel): class token, pre-norm layers (layernorm_before/after), a final layer norm
and a dense + tanh pooler on the class token."""

from edgekit.arch.vision import VitFamily

FAMILY = VitFamily(model_type="vit", name="ViT", model_class="ViTModel", processor_class="ViTImageProcessor",
                   class_token=True, pre_norm=False, patch_bias=True, pooling="dense-tanh",
                   notes=("class token", "dense pooler"))
