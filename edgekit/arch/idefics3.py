"""Idefics3 / SmolVLM (`idefics3`, `smolvlm`: transformers' Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration): a SigLIP-style vision transformer (no class token, a biased patch conv, no pre-norm,
a post-layernorm whose output feeds the connector), a pixel-shuffle connector (scale_factor^2 neighbouring patches
folded into one token, then one bias-free linear `modality_projection.proj` into the LM's hidden width) and a
Llama-family language model. An image is wrapped as <fake_token_around_image><global-img><image>*n
<fake_token_around_image>, as the family's processor writes it without image splitting.

Vision heads are cut only with the vision hidden width (head_dim is hidden / heads here too); the connector's input,
the vision hidden width x scale^2, follows the kept vision channels in each of the scale^2 shuffled copies, its
output rows the language model's kept hidden channels."""

from __future__ import annotations

from edgekit.arch.vlm import VisionGeometry, VisionLayerWidths, VlmFamily, VlmGeometry


class Idefics3Family(VlmFamily):
    image_token_key = "image_token_id"
    # text pieces llama.cpp's idefics3 image template looks up in the vocabulary (real tokenizers have them)
    mmproj_template_pieces = ("\n\n", "\n")
    wrap_tokens = ("<fake_token_around_image>", "<global-img>")  # before the image tokens; the first also after
    extra_tokens = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")

    # -- geometry (torch-free) ---------------------------------------------------------------------------------
    def vision_geometry(self, cfg: dict) -> VisionGeometry:
        v = cfg.get("vision_config") or {}
        d, h = v.get("hidden_size", 1152), v.get("num_attention_heads", 16)
        return VisionGeometry(hidden_size=d, head_dim=d // h, image_size=v.get("image_size", 384),
                              patch_size=v.get("patch_size", 14), channels=v.get("num_channels", 3),
                              layers=(VisionLayerWidths(v.get("intermediate_size", 3072), h),) *
                              v.get("num_hidden_layers", 12),
                              class_token=False, pre_norm=False, post_norm=True, patch_bias=True)

    def scale(self, cfg: dict) -> int:
        return int(cfg.get("scale_factor", 2))

    def image_tokens(self, cfg: dict) -> int:
        return self.vision_geometry(cfg).patches // self.scale(cfg) ** 2

    def geometry(self, cfg: dict) -> VlmGeometry:
        vis = self.vision_geometry(cfg)
        return VlmGeometry(vision=vis, language=self.language_family(cfg).geometry(self.text_config(cfg)),
                           projector_in=vis.hidden_size * self.scale(cfg) ** 2, projector_bias=False,
                           image_tokens=self.image_tokens(cfg), projector_layers=1)

    def pixel_batch(self, proc, images) -> object:
        # a flat list would be one prompt with len(images) images: (1, N, C, H, W); one image per prompt instead
        return proc(images=[[im] for im in images], return_tensors="np")["pixel_values"]

    def image_prompt(self, tok, cfg: dict) -> list[int]:
        fake, glob = (tok.convert_tokens_to_ids(t) for t in self.wrap_tokens)
        return [fake, glob] + [cfg[self.image_token_key]] * self.image_tokens(cfg) + [fake]

    # -- module access ---------------------------------------------------------------------------------------
    def vision_tower(self, model):
        return model.model.vision_model

    def vision_layers(self, model) -> list:
        return list(model.model.vision_model.encoder.layers)

    def projector(self, model):
        return (model.model.connector.modality_projection.proj,)

    def _pixels(self, pixel_values):
        # (B, images, C, H, W) from the processor -> (B * images, C, H, W); edgekit feeds one unsplit image each
        return pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values

    @staticmethod
    def full_image_positions(n: int) -> list[int]:
        """The position ids transformers' embedding buckets for a full (unpadded) n x n patch grid, computed as it
        does in float32 (fractional coordinates bucketized; with exact binary fractions they are not simply
        0..n*n-1). In numpy, not torch: torch.export traces torch ops even on constants, and ExecuTorch has no
        aten.bucketize."""
        import numpy as np

        bounds = np.arange(1 / n, 1.0, 1 / n).astype(np.float32)  # torch.arange: float64 steps, float32 values
        x = np.arange(n, dtype=np.float32) / np.float32(n) * np.float32(1 - 1e-6)
        b = np.searchsorted(bounds, x, side="right")  # == torch.bucketize(x, bounds, right=True)
        return (b[:, None] * n + b).flatten().tolist()

    def vision_features(self, model, pixel_values):
        """The vision tower's output (post-layernorm) for full, unpadded images, written out: the transformers
        embedding loops over the batch to bucket position ids for padded images, which a traced export would freeze
        at the example batch; for full images every image has the same ids, a constant here."""
        import torch

        vm = self.vision_tower(model)
        x = self._pixels(pixel_values)
        e = vm.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
        pos = torch.tensor(self.full_image_positions(vm.embeddings.num_patches_per_side), device=e.device)
        e = e + vm.embeddings.position_embedding(pos)
        h = vm.encoder(inputs_embeds=e).last_hidden_state
        return vm.post_layernorm(h)

    def image_features(self, model, pixel_values):
        """(B, image_tokens, text hidden): what replaces the <image> tokens."""
        return model.model.connector(self.vision_features(model, pixel_values))

    def mmproj_tensors(self, model):
        import torch

        vm = self.vision_tower(model)
        # llama.cpp adds position row i to patch i; transformers adds row full_image_positions[i]: written gathered
        pos = torch.tensor(self.full_image_positions(vm.embeddings.num_patches_per_side))
        for n, t in vm.state_dict().items():
            if not n.endswith("position_ids"):
                yield "vision:model.vision_model." + n, t[pos] if n == "embeddings.position_embedding.weight" else t
        yield "projector:mm.model.fc.weight", self.projector(model)[0].weight

    def language_view(self, model):
        import torch
        import transformers

        with torch.device("meta"):
            lm = transformers.AutoModelForCausalLM.from_config(model.config.get_text_config())
        lm.model = model.model.text_model
        lm.lm_head = model.lm_head
        return lm.eval()

    def prune_projector(self, sd: dict, hidden, inner) -> None:
        """The connector's output rows follow the kept LM hidden channels (its input, vision hidden x scale^2, follows
        the vision channels: prune_projector_input)."""
        k = self.PROJECTOR_PREFIX + "modality_projection.proj.weight"
        sd[k] = sd[k][hidden]

    VISION_PREFIX = "model.vision_model."
    PROJECTOR_PREFIX = "model.connector."
    PROJECTOR_INPUT = PROJECTOR_PREFIX + "modality_projection.proj.weight"
    LANGUAGE_PREFIX = "model.text_model."

    def language_state_name(self, name: str) -> str:
        return self.LANGUAGE_PREFIX + name[len("model."):] if name.startswith("model.") else name


FAMILY = Idefics3Family(model_type="idefics3", name="Idefics3", config_class="Idefics3Config",
                        vision_model_types=("idefics3_vision",), mmproj_projector_type="idefics3",
                        notes=("SigLIP-style vision tower", "pixel-shuffle connector", "Llama language model"))
SMOLVLM = Idefics3Family(model_type="smolvlm", name="SmolVLM", config_class="SmolVLMConfig",
                         vision_model_types=("smolvlm_vision",), mmproj_projector_type="idefics3",
                         notes=("Idefics3 layout", "SigLIP-style vision tower", "pixel-shuffle connector"))
