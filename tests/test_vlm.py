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


def test_registry_keeps_tasks_apart():
    from edgekit.arch import REGISTRY, get_family, get_vlm_family

    assert VLMS and set(VLM_FAMILIES).isdisjoint(FAMILIES)
    from edgekit.arch import VISION_ENCODERS

    assert set(REGISTRY) == set(FAMILIES) | set(VLM_FAMILIES) | set(VISION_ENCODERS)  # image towers: their own test
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
    assert g.image_tokens == cfg.get("image_seq_length", 16) == 16  # Idefics3: 64 patches pixel-shuffled by 2
    lm = fam.language_view(model)  # the language model as a plain causal LM sharing the VLM's tensors
    assert lm.model.embed_tokens.weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in lm.parameters()) == parts["language"]


@pytest.mark.parametrize("family", VLMS)
def test_image_features_and_prompt_match_transformers(vlm_models, pairs, family):
    """The family's written-out image path (what the vision export traces) equals transformers' own, and the image
    prompt has exactly the positions the model fills (Idefics3: wrapped in its image tokens)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.vlm.data import collate, encode, load_pairs

    path = vlm_models[family]
    cfg = json.loads((path / "config.json").read_text())
    fam = VLM_FAMILIES[family]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    tok, _, items = encode(path, load_pairs(pairs)[:3], fam, cfg)
    b = collate(items, tok.pad_token_id)
    with torch.no_grad():
        ours = fam.image_features(model, b.pixel_values)
        ref = model.model.get_image_features(b.pixel_values)
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
        assert ours.shape == (3, 16, 64) and torch.allclose(ours, ref.reshape(ours.shape), atol=1e-5)
        assert int((b.input_ids[0] == fam.image_token_id(cfg)).sum()) == fam.image_tokens(cfg) == 16
        assert torch.isfinite(model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                    pixel_values=b.pixel_values).logits).all()


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


# -- pruning both towers --------------------------------------------------------------------------------------------

def _prune(src, out, pairs, **kw):
    from edgekit.vlm.prune import VlmPruneConfig, prune_vlm

    return prune_vlm(src, out, VlmPruneConfig(calibration=pairs, num_samples=12, search_samples=4, **kw), log=quiet)


def _reload(path):
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.arch import vlm_family_of

    cfg = json.loads((path / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    g = vlm_family_of(cfg).geometry(cfg)
    assert sum(p.numel() for p in model.parameters()) == g.params()
    return model, cfg, g


@pytest.fixture(scope="session")
def vlm_pruned(vlm_models, pairs, tmp_path_factory):
    """{family: folder} cut by 30% with the cut shared between both towers and the LM hidden width narrowed."""
    root = tmp_path_factory.mktemp("vlm-pruned")
    return {f: (root / f, _prune(src, root / f, pairs, ratio=0.3, vision_share=0.3, hidden_keep=0.75))
            for f, src in vlm_models.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", VLMS)
def test_prune_both_towers_round_trips_through_from_pretrained(vlm_pruned, vlm_models, pairs, family):
    import torch

    from edgekit.vlm.data import collate, encode
    from edgekit.vlm.prune import caption_loss

    path, r = vlm_pruned[family]
    model, cfg, g = _reload(path)
    assert r["params_after"] == g.params() and 0.28 < r["removed_fraction"] < 0.4, r["removed_fraction"]
    before, after = r["parts_before"], r["parts_after"]
    assert after["vision"] < before["vision"] and after["language"] < before["language"]
    # vision MLP neurons; language hidden channels, and the projector follows the LM hidden width
    assert cfg["vision_config"]["intermediate_size"] < 128 and cfg["text_config"]["hidden_size"] == 48
    assert VLM_FAMILIES[family].projector(model)[-1].out_features == 48 and after["projector"] < before["projector"]
    # the reloaded folder computes what the report says, and is still close to the dense model
    from edgekit.vlm.data import load_pairs

    tok, _, items = encode(path, load_pairs(pairs)[12:16], VLM_FAMILIES[family], cfg)  # the held-out search pairs
    loss = caption_loss(model.eval(), items, tok.pad_token_id)
    assert abs(loss - r["pruned_search_loss"]) < 1e-4
    assert r["pruned_search_loss"] < r["dense_search_loss"] + 1.0
    assert (path / "preprocessor_config.json").is_file() and (path / "tokenizer.json").is_file()
    with torch.no_grad():
        b = collate(items[:2], 0)
        assert torch.isfinite(model(input_ids=b.input_ids, pixel_values=b.pixel_values).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", VLMS)
def test_keep_vision_and_keep_language_split_the_cut(vlm_models, pairs, tmp_path, family):
    src = vlm_models[family]
    kv = _prune(src, tmp_path / "kv", pairs, ratio=0.2, keep_vision=True)
    assert kv["parts_after"]["vision"] == kv["parts_before"]["vision"]
    assert kv["parts_after"]["language"] < kv["parts_before"]["language"]
    heads = kv["language"]  # the language cut goes through MLP neurons and, when it pays, heads and KV groups
    assert heads["intermediate"][1] < heads["intermediate"][0]
    kl = _prune(src, tmp_path / "kl", pairs, ratio=0.1, keep_language=True)
    assert kl["parts_after"]["language"] == kl["parts_before"]["language"]
    assert kl["parts_after"]["vision"] < kl["parts_before"]["vision"]
    for p in ("kv", "kl"):
        _reload(tmp_path / p)


def test_saliency_is_normalized_per_block_and_modality(vlm_models, pairs):
    """The two towers' raw saliencies sit on different scales; after normalization every block has mean 1."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.vlm.data import encode, load_pairs
    from edgekit.vlm.prune import normalize, saliency

    src = vlm_models["llava"]
    cfg = json.loads((src / "config.json").read_text())
    fam = VLM_FAMILIES["llava"]
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    tok, _, items = encode(src, load_pairs(pairs)[:2], fam, cfg)
    raw = saliency(model, fam, items, tok.pad_token_id)
    # the last vision layer's output is not read (vision_feature_layer -2): no gradient reaches it
    assert float(raw.vision_mlp[-1].abs().sum()) == 0 and float(raw.vision_mlp[0].sum()) > 0
    n = normalize(raw)
    for blocks in (n.vision_mlp[:-1], n.language.mlp, n.language.heads, n.language.kv):
        for b in blocks:
            assert abs(float(b.mean()) - 1) < 1e-6 or float(b.std()) == 0
    assert all(p.grad is None for p in model.parameters())


def test_modality_scores_read_text_positions_and_unread_vision_layers(vlm_models, pairs):
    """The default criterion: language units scored on the text positions only (checked by hand on layer 0's MLP),
    the vision layer the projector does not read scores zero, the rest is activation_scores'."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.vlm.data import encode, load_pairs
    from edgekit.vlm.prune import VlmPlan, activation_scores, distinct, modality_scores

    src = vlm_models["llava"]
    cfg = json.loads((src / "config.json").read_text())
    fam = VLM_FAMILIES["llava"]
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    tok, _, items = encode(src, load_pairs(pairs)[:3], fam, cfg)
    act = activation_scores(model, fam, items, tok.pad_token_id)
    mod = modality_scores(model, fam, items, tok.pad_token_id)
    # layer 0's MLP input on the text rows, by hand
    lm, lfam = fam.language_view(model), fam.language_family(cfg)
    layer = list(lfam.layers(lm))[0]
    rows = []
    h = lfam.down(layer).register_forward_pre_hook(lambda m, i: rows.append(i[0].detach().double()))
    with torch.no_grad():
        for b in items:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values, use_cache=False)
    h.remove()
    text = torch.cat([r[0][b.input_ids[0] != cfg["image_token_index"]] for r, b in zip(rows, items)])
    want = text.pow(2).mean(0) * lfam.down(layer).weight.detach().double().pow(2).sum(0)
    assert torch.allclose(mod.language.mlp[0], want, rtol=1e-4)
    assert not torch.allclose(mod.language.mlp[0], act.language.mlp[0], rtol=1e-2)
    assert float(mod.vision_mlp[-1].abs().sum()) == 0 and float(mod.vision_heads[-1].abs().sum()) == 0
    assert torch.equal(mod.vision_mlp[0], act.vision_mlp[0]) and torch.equal(mod.language.hidden, act.language.hidden)
    # candidates whose plans coincide (shares past the vision MLPs' floor) are scored once
    cands = {(0.5, None): VlmPlan([[0, 1]], None, None), (0.7, None): VlmPlan([[0, 1]], None, None),
             (0.3, None): VlmPlan([[0, 1, 2]], None, None)}
    assert distinct(list(cands), cands) == [(0.5, None), (0.3, None)]


def test_vlm_prune_bad_requests_are_one_line(vlm_models, tmp_path, capsys):
    from edgekit.cli import main

    src = vlm_models[VLMS[0]]

    def err(*argv):
        assert main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("edgekit: error: ") and "(fix: " in lines[-1]
        return lines[-1]

    line = err("vlm", "prune", src, "--ratio", "0.95", "-o", tmp_path / "p")
    assert "can give at most" in line and "--ratio 0." in line
    assert "--hidden-keep must be in (0, 1]" in err("vlm", "prune", src, "--ratio", "0.3", "--hidden-keep", "2",
                                                     "-o", tmp_path / "p")
    line = err("prune", src, "--ratio", "0.3", "-o", tmp_path / "p")  # the decoder pruner refuses a VLM
    assert "vision-language model" in line and "edgekit vlm prune" in line
    line = err("vlm", "prune", src, "--ratio", "0.3", "--calibration", tmp_path / "nothing", "-o", tmp_path / "p")
    assert "holds no image captions" in line
    assert not (tmp_path / "p").exists()


# -- export -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", VLMS)
@pytest.mark.parametrize("backend,precision", [("onnxruntime", "fp32"), ("gguf", "f16")])
def test_export_vision_onnx_and_language_artifact_gates_pass(vlm_pruned, tmp_path, family, backend, precision, cli):
    import numpy as np
    import onnxruntime as ort

    path, _ = vlm_pruned[family]
    out = tmp_path / "art"
    cli("vlm", "export", path, "-b", backend, "-p", precision, "--context", "128", "-o", out, check=0)
    m = json.loads((out / "vlm.json").read_text())
    assert m["vision"]["gate"]["passed"] and m["vision"]["gate"]["min_cosine"] > 0.9999
    assert m["recomposed"]["passed"] and m["language"]["gate"]["passed"]
    assert m["image_tokens"] == 16 and m["task"] == "vlm"
    # the vision artifact alone reproduces its shipped reference in ONNX Runtime (what a device re-checks)
    ref = np.load(out / "vision" / "reference.npz")
    sess = ort.InferenceSession(str(out / "vision" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": ref["pixel_values"][:1]})[0]  # batch is dynamic
    assert got.shape == (1, 16, 48) and np.abs(got - ref["image_embeds"][:1]).max() < 1e-4
    lang = json.loads((out / "language" / "artifact.json").read_text())
    assert lang["backend"] == backend and lang["model"]["hidden_size"] == 48


# -- recovery -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", VLMS)
def test_three_phase_distill_lowers_each_phase_loss(vlm_pruned, vlm_models, pairs, tmp_path, family):
    from edgekit.vlm.distill import VlmDistillConfig, distill_vlm

    student, _ = vlm_pruned[family]  # both towers cut: phase 2 has a real vision gap to close
    r = distill_vlm(vlm_models[family], student, tmp_path / "d", VlmDistillConfig(
        steps=(12, 12, 12), calibration=pairs, num_samples=16, held_out=8), log=quiet)
    assert [p["phase"] for p in r["phases"]] == ["projector", "vision+projector", "whole"]
    trainable = [p["trainable_params"] for p in r["phases"]]
    assert trainable[0] < trainable[1] < trainable[2]
    for p in r["phases"]:
        assert p["held_out_loss_after"] < p["held_out_loss_before"], p
    assert r["caption_loss"]["after"] < r["caption_loss"]["before"]
    model, _, g = _reload(tmp_path / "d")
    assert g.params() == trainable[2]


def test_vlm_distill_bad_requests_are_one_line(vlm_models, tmp_path, capsys):
    from edgekit.cli import main

    src = vlm_models[VLMS[0]]
    for argv, want in ((["--steps", "1,2"], "three non-negative step counts"),
                       (["--steps", "a,b,c"], "not three comma-separated integers"),
                       (["--temperature", "0"], "temperature must be positive")):
        assert main(["vlm", "distill", "--teacher", str(src), "--student", str(src), *argv,
                     "-o", str(tmp_path / "d")]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert want in line and "(fix: " in line
    assert not (tmp_path / "d").exists()
