"""The model-family registry: one module per family, one entry below. Nothing else in edgekit names a model_type.

Adding a family: a module beside this one with a FAMILY record (subclass Family only where the Hugging Face modules
differ from the Llama layout), its name in _MODULES, and a tiny config with its real quirks in edgekit/testing.py;
tests/test_families.py then runs every stage over it and fails until each works. Importing this package imports no
torch.
"""

from __future__ import annotations

import importlib

from edgekit.arch.base import WIDTHS_KEY, Family, Geometry, LayerWidths, Proj
from edgekit.errors import EdgekitError

_MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
FAMILIES: dict[str, Family] = {}
for _m in _MODULES:
    _f = importlib.import_module(f"edgekit.arch.{_m}").FAMILY
    FAMILIES[_f.model_type] = _f

# llama.cpp architecture names (GGUF general.architecture) of the families edgekit reads from a .gguf file
GGUF_ARCHS: dict[str, Family] = {}
for _f in FAMILIES.values():
    GGUF_ARCHS.setdefault(_f.gguf_arch, _f)  # `llama` files are Llama (Mistral GGUFs are written as llama too)


def supported() -> str:
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())


def get_family(model_type: str | None) -> Family:
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


def geometry(cfg: dict) -> Geometry:
    return get_family(cfg.get("model_type")).geometry(cfg)


__all__ = ["FAMILIES", "GGUF_ARCHS", "WIDTHS_KEY", "Family", "Geometry", "LayerWidths", "Proj", "family_of",
           "geometry", "get_family", "supported"]
