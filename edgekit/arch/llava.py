"""LLaVA (`llava`, transformers' LlavaForConditionalGeneration): a CLIP vision tower, a two-layer MLP projector
(linear_1 -> act -> linear_2) and a Llama-family language model reading the projected patches in place of the
<image> tokens. The language model's module access is its own family's (Llama, Qwen2, ...)."""

from __future__ import annotations

from edgekit.arch.vlm import VlmFamily


class LlavaFamily(VlmFamily):
    def vision_tower(self, model):
        return model.model.vision_tower

    def vision_layers(self, model) -> list:
        return list(model.model.vision_tower.vision_model.encoder.layers)

    def projector(self, model):
        p = model.model.multi_modal_projector
        return p.linear_1, p.linear_2

    def vision_features(self, model, pixel_values):
        layer = model.config.vision_feature_layer
        hs = self.vision_tower(model)(pixel_values, output_hidden_states=True).hidden_states
        return hs[layer if isinstance(layer, int) else layer[-1]]

    def prune_projector(self, sd: dict, hidden, inner) -> None:
        """linear_2's output follows the kept LM hidden channels; linear_1's output / linear_2's input keep `inner`."""
        pp = self.PROJECTOR_PREFIX
        sd[pp + "linear_1.weight"] = sd[pp + "linear_1.weight"][inner]
        sd[pp + "linear_2.weight"] = sd[pp + "linear_2.weight"][hidden][:, inner]
        if pp + "linear_1.bias" in sd:
            sd[pp + "linear_1.bias"] = sd[pp + "linear_1.bias"][inner]
            sd[pp + "linear_2.bias"] = sd[pp + "linear_2.bias"][hidden]

    def image_features(self, model, pixel_values):
        """(B, image_tokens, text hidden): what replaces the <image> tokens. Written out (not get_image_features,
        which returns a per-image list) so a traced export keeps the batch dimension dynamic."""
        cfg = model.config
        layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        hs = self.vision_tower(model)(pixel_values, output_hidden_states=True).hidden_states
        layers = [layer] if isinstance(layer, int) else list(layer)
        feats = [hs[i][:, 1:] if strategy == "default" else hs[i] for i in layers]
        import torch

        return model.model.multi_modal_projector(feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1))

    def mmproj_tensors(self, model):
        for n, t in self.vision_tower(model).state_dict().items():
            if not n.endswith("position_ids"):
                yield "vision:vision_tower." + n, t
        for i, lin in zip((0, 2), self.projector(model)):  # llama.cpp's LLaVA MLP: mm.0 -> GELU -> mm.2
            yield f"projector:mm.{i}.weight", lin.weight
            if lin.bias is not None:
                yield f"projector:mm.{i}.bias", lin.bias

    def language_view(self, model):
        import torch
        import transformers

        lm_cfg = model.config.get_text_config()
        with torch.device("meta"):
            lm = transformers.AutoModelForCausalLM.from_config(lm_cfg)
        lm.model = model.model.language_model
        lm.lm_head = model.lm_head
        return lm.eval()

    # tensor names in a saved folder
    VISION_PREFIX = "model.vision_tower.vision_model."
    PROJECTOR_PREFIX = "model.multi_modal_projector."
    PROJECTOR_INPUT = PROJECTOR_PREFIX + "linear_1.weight"
    LANGUAGE_PREFIX = "model.language_model."

    def language_state_name(self, name: str) -> str:
        """A causal-LM tensor name (model.layers.0..., lm_head.weight) as this VLM stores it."""
        return self.LANGUAGE_PREFIX + name[len("model."):] if name.startswith("model.") else name


FAMILY = LlavaFamily(model_type="llava", name="LLaVA", config_class="LlavaConfig",
                     vision_model_types=("clip_vision_model",), mmproj_projector_type="mlp",
                     notes=("CLIP vision tower", "MLP projector", "Llama-family language model"))
