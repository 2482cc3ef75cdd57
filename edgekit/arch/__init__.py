"""The model-family registry: one module per family, one entry below. Nothing else in edgekit names a model_type.

Adding a family: a module beside this one with a FAMILY record (subclass Family only where the Hugging Face modules
differ from the Llama layout), its name in _MODULES, and a tiny config with its real quirks in edgekit/testing.py;
tests/test_families.py then runs every stage over it and fails until each works. Importing this package imports no
torch.

Every FAMILY carries its task: "causal-lm" (decoder-only LMs: FAMILIES, what the decoder stages and the decoder
meta-test take), "vlm" (vision-language models: VLM_FAMILIES, edgekit/vlm and tests/test_vlm.py) or
"vision-encoder" (image towers alone: VISION_ENCODERS, edgekit/vision and tests/test_vision_encoder.py).
"""

from __future__ import annotations

import importlib

from edgekit.arch.base import WIDTHS_KEY, Family, Geometry, LayerWidths, Proj
from edgekit.arch.vision import VISION_ENCODER, VisionEncoderFamily
from edgekit.arch.vlm import VlmFamily, VlmGeometry
from edgekit.errors import EdgekitError

_MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "llava", "idefics3", "smolvlm", "clip_vision",
            "siglip_vision", "vit")
REGISTRY: dict[str, object] = {}  # every family, any task
for _m in _MODULES:
    _f = importlib.import_module(f"edgekit.arch.{_m}").FAMILY
    REGISTRY[_f.model_type] = _f
CAUSAL_LM, VLM = "causal-lm", "vlm"
FAMILIES: dict[str, Family] = {k: f for k, f in REGISTRY.items() if f.task == CAUSAL_LM}
VLM_FAMILIES: dict[str, VlmFamily] = {k: f for k, f in REGISTRY.items() if f.task == VLM}
VISION_ENCODERS: dict[str, VisionEncoderFamily] = {k: f for k, f in REGISTRY.items() if f.task == VISION_ENCODER}

# llama.cpp architecture names (GGUF general.architecture) of the families edgekit reads from a .gguf file
GGUF_ARCHS: dict[str, Family] = {}
for _f in FAMILIES.values():
    GGUF_ARCHS.setdefault(_f.gguf_arch, _f)  # `llama` files are Llama (Mistral GGUFs are written as llama too)


def supported() -> str:
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())


def get_family(model_type: str | None) -> Family:
    if model_type in VLM_FAMILIES:
        raise EdgekitError(f"{model_type!r} is a vision-language model ({VLM_FAMILIES[model_type].name}); this "
                           "command takes decoder-only causal LMs",
                           "use `edgekit vlm prune` / `edgekit vlm export` for it")
    if model_type in VISION_ENCODERS:
        raise EdgekitError(f"{model_type!r} is an image encoder ({VISION_ENCODERS[model_type].name}); this command "
                           "takes decoder-only causal LMs", "use `edgekit vision prune` / `edgekit vision export` for it")
    if model_type not in FAMILIES:
        raise EdgekitError(f"unsupported model family {model_type or '(none)'!r}; edgekit supports decoder-only "
                           f"causal LMs of these families: {supported()}",
                           "use a checkpoint of one of those families (encoder-only and mixture-of-experts models "
                           "are not supported)")
    return FAMILIES[model_type]


def family_of(cfg: dict) -> Family:
    fam = get_family(cfg.get("model_type"))
    fam.check_config(cfg)
    return fam


def get_vlm_family(model_type: str | None) -> VlmFamily:
    if model_type not in VLM_FAMILIES:
        raise EdgekitError(f"{model_type or '(none)'!r} is not a vision-language family edgekit supports; it "
                           f"supports {', '.join(f'{f.name} ({k})' for k, f in VLM_FAMILIES.items())}",
                           "pass a LLaVA, Idefics3 or SmolVLM folder (config.json model_type llava, idefics3 or "
                           "smolvlm), or use `edgekit prune` / "
                           "`edgekit export` for a decoder-only LM")
    return VLM_FAMILIES[model_type]


def vlm_family_of(cfg: dict) -> VlmFamily:
    fam = get_vlm_family(cfg.get("model_type"))
    fam.check_config(cfg)
    return fam


def vision_encoder_of(cfg: dict) -> VisionEncoderFamily:
    mt = cfg.get("model_type")
    if mt not in VISION_ENCODERS:
        raise EdgekitError(f"{mt or '(none)'!r} is not an image encoder edgekit supports; it supports "
                           f"{', '.join(f'{f.name} ({k})' for k, f in VISION_ENCODERS.items())}",
                           "pass a CLIPVisionModel / SiglipVisionModel / ViTModel folder (a whole CLIP or SigLIP "
                           "checkpoint: save its vision_model alone)")
    fam = VISION_ENCODERS[mt]
    fam.check_config(cfg)
    return fam


def geometry(cfg: dict) -> Geometry:
    return get_family(cfg.get("model_type")).geometry(cfg)


__all__ = ["CAUSAL_LM", "FAMILIES", "GGUF_ARCHS", "REGISTRY", "VLM", "VLM_FAMILIES", "WIDTHS_KEY", "Family",
           "Geometry", "LayerWidths", "Proj", "VISION_ENCODERS", "VisionEncoderFamily", "VlmFamily", "VlmGeometry",
           "family_of", "geometry", "get_family", "get_vlm_family", "supported", "vision_encoder_of", "vlm_family_of"]
