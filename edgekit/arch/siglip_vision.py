"""SigLIP's image tower alone (`siglip_vision_model`, transformers' SiglipVisionModel): no class token, a biased patch
embedding, a post-layer norm and an attention-pooling head whose MLP is intermediate_size wide (cut with the rest)."""

from edgekit.arch.vision import SiglipVisionFamily

FAMILY = SiglipVisionFamily(model_type="siglip_vision_model", name="SigLIP vision", model_class="SiglipVisionModel",
                            processor_class="SiglipImageProcessor", class_token=False, pre_norm=False,
                            patch_bias=True, pooling="attention-head", notes=("no class token", "attention pool head"))
