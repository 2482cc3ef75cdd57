"""Shared by the VLM image-prompt tests: each tiny VLM family built and exported once per module."""

from __future__ import annotations

import json


def quiet(*a, **k):
    pass


def export_cache(root, **export):
    """family -> (model folder, config, PyTorch VLM, export folder, vlm.json): the tiny family (seed 5) exported with
    VlmExportConfig(**export) on first use."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.testing import make_tiny_vlm
    from edgekit.vlm.export import VlmExportConfig, export_vlm

    cache = {}

    def get(family):
        if family not in cache:
            path = make_tiny_vlm(family, root / family, seed=5)
            m = export_vlm(path, root / f"{family}-art", VlmExportConfig(**export), log=quiet)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
            cache[family] = path, json.loads((path / "config.json").read_text()), model, root / f"{family}-art", m
        return cache[family]
    return get
