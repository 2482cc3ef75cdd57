"""SmolVLM (`smolvlm`): the Idefics3 layout under its own model_type (edgekit/arch/idefics3.py)."""

from edgekit.arch.idefics3 import SMOLVLM as FAMILY

__all__ = ["FAMILY"]
