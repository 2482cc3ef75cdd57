"""The VLM meta-test: every registered vision-language family (edgekit.arch.VLM_FAMILIES, task "vlm"), as a tiny
random model from configs with an <image> tokenizer and its image processor, goes through geometry, pruning of
both towers, and export of the vision tower + projector and of the language model. The decoder families have their
own meta-test (tests/test_families.py); the parametrization here is the VLM registry itself."""

from __future__ import annotations

import json

import pytest

from edgekit.arch import FAMILIES, VLM_FAMILIES
from edgekit.errors import EdgekitError

VLMS = sorted(VLM_FAMILIES)


def quiet(*a, **k):
    pass


@pytest.fixture(scope="session")
def vlm_models(tmp_path_factory):
    from edgekit.testing import make_tiny_vlm

    root = tmp_path_factory.mktemp("vlm")
    return {f: make_tiny_vlm(f, root / f, seed=i) for i, f in enumerate(VLMS)}


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    from edgekit.vlm.data import generate_pairs

    return generate_pairs(tmp_path_factory.mktemp("pairs"), n=24)


def test_registry_keeps_tasks_apart():
    from edgekit.arch import REGISTRY, get_family, get_vlm_family

    assert VLMS and set(VLM_FAMILIES).isdisjoint(FAMILIES)
    assert set(REGISTRY) == set(FAMILIES) | set(VLM_FAMILIES)
    assert all(f.task == "causal-lm" for f in FAMILIES.values()) and all(f.task == "vlm" for f in VLM_FAMILIES.values())
    with pytest.raises(EdgekitError, match="vision-language model.*edgekit vlm prune"):
        get_family("llava")  # a decoder stage handed a VLM says where to go, in one line
    with pytest.raises(EdgekitError, match="not a vision-language family"):
        get_vlm_family("llama")


@pytest.mark.parametrize("family", VLMS)
def test_geometry_counts_every_parameter_of_both_towers(vlm_models, family):
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.arch import vlm_family_of

    path = vlm_models[family]
    cfg = json.loads((path / "config.json").read_text())
    fam = vlm_family_of(cfg)
    g = fam.geometry(cfg)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert g.params() == sum(p.numel() for p in model.parameters())
    parts = g.parts()
    assert parts["vision"] == sum(p.numel() for p in fam.vision_tower(model).parameters())
    assert parts["projector"] == sum(p.numel() for m in fam.projector(model) for p in m.parameters())
    assert g.image_tokens == cfg["image_seq_length"] == 16
    lm = fam.language_view(model)  # the language model as a plain causal LM sharing the VLM's tensors
    assert lm.model.embed_tokens.weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in lm.parameters()) == parts["language"]


def test_generated_pairs_are_deterministic_and_decodable(tmp_path):
    from edgekit.vlm.data import generate_pairs, load_image, load_pairs

    a, b = generate_pairs(tmp_path / "a", n=6), generate_pairs(tmp_path / "b", n=6)
    pa, pb = load_pairs(a), load_pairs(b)
    assert [p.text for p in pa] == [p.text for p in pb] and len(pa) == 6
    assert all(x.image.read_bytes() == y.image.read_bytes() for x, y in zip(pa, pb))
    im = load_image(pa[0].image)
    assert im.size == (64, 64) and im.mode == "RGB"
    # the caption says what is drawn: the named colour is the most common non-background colour
    import numpy as np

    from edgekit.vlm.data import BACKGROUNDS, COLORS

    for p in pa:
        px = np.asarray(load_image(p.image)).reshape(-1, 3)
        bg = next(v for k, v in BACKGROUNDS.items() if f"{k} background" in p.text)
        fg = px[(px != bg).any(1)]
        color = next(k for k in COLORS if f" {k} " in p.text)
        assert (fg == COLORS[color]).all(1).mean() > 0.5, p.text


def test_bad_image_inputs_are_one_line(tmp_path):
    from edgekit.vlm.data import generate_pairs, load_image, load_pairs

    d = generate_pairs(tmp_path / "d", n=3)
    (d / "images" / "0001.png").write_bytes(b"this is not a png")
    with pytest.raises(EdgekitError) as e:
        load_image(d / "images" / "0001.png")
    assert "0001.png cannot be decoded" in e.value.line() and "valid PNG/JPEG" in e.value.line()
    (d / "images" / "0002.png").unlink()
    with pytest.raises(EdgekitError) as e:
        load_pairs(d)
    assert "1 image(s) that do not exist: images/0002.png (line 3)" in e.value.line()
    assert "\n" not in e.value.line() and "fix:" in e.value.line()
    with pytest.raises(EdgekitError, match="holds no image captions"):
        load_pairs(tmp_path / "empty-dir-or-missing")
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n')
    with pytest.raises(EdgekitError, match="bad.jsonl:1 is not a JSON object"):
        load_pairs(tmp_path / "bad.jsonl")
