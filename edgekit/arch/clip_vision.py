"""CLIP's image tower alone (`clip_vision_model`, transformers' CLIPVisionModel): class token, pre- and post-layer
norm, quick-GELU MLPs; the pooled embedding is the post-normed class token."""

from edgekit.arch.vision import ClipVisionFamily

FAMILY = ClipVisionFamily(model_type="clip_vision_model", name="CLIP vision", model_class="CLIPVisionModel",
                          processor_class="CLIPImageProcessor", class_token=True, pre_norm=True, patch_bias=False,
                          pooling="cls-norm", notes=("class token", "pre/post layer norm"))
