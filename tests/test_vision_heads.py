"""Vision heads cut with the vision hidden width (issue #16), in every registered image tower: the vision-encoder
families (CLIP / SigLIP vision, ViT) and the VLM families' towers (LLaVA's CLIP, Idefics3's / SmolVLM's SigLIP-style
tower, whose pixel-shuffle connector follows the kept channels in each shuffled copy).

A residual-channel cut is no mask (LayerNorm statistics change), so the reference is the dense model with every
tower LayerNorm computing its statistics over the kept channels only (and writing zeros elsewhere), the removed
heads' output columns zeroed and, where the raw residual leaves the tower (LLaVA's feature layer), the removed
channels zeroed there: that model computes exactly what the cut one does, so any tensor sliced on the wrong axis or
with the wrong indices shows up in the outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from edgekit.arch import VISION_ENCODERS, VLM_FAMILIES
from edgekit.errors import EdgekitError

ENCODERS = sorted(VISION_ENCODERS)
VLMS = sorted(VLM_FAMILIES)
# kept sets that no slicing along the wrong axis or in the wrong order could reproduce: channels scattered over all
# four heads' spans, a different head set per attention block
CHANNELS = [0, 2, 3, 5, 8, 9, 11, 12, 14, 17, 18, 19, 20, 22, 23, 25, 26, 27, 28, 29, 30, 31, 6, 15]
HEADS = [[0, 1, 3], [1, 2, 3], [0, 2, 3], [0, 1, 2]]


def quiet(*a, **k):
    pass


class MaskedLayerNorm(torch.nn.Module):
    """A LayerNorm over the kept channels only, zeros elsewhere: what the cut tower's LayerNorm computes, in the
    dense width."""

    def __init__(self, ln, kept):
        super().__init__()
        self.ln, self.kept = ln, torch.tensor(kept)

    def forward(self, x):
        k = self.kept
        y = torch.nn.functional.layer_norm(x[..., k], (len(k),), self.ln.weight[k], self.ln.bias[k], self.ln.eps)
        return torch.zeros_like(x).index_copy(-1, k, y)


def mask_norms(tower, kept) -> None:
    """Every LayerNorm under `tower` (in place) computes over the kept channels only."""
    for name, m in list(tower.named_modules()):
        if isinstance(m, torch.nn.LayerNorm):
            parent, _, leaf = name.rpartition(".")
            setattr(tower.get_submodule(parent) if parent else tower, leaf, MaskedLayerNorm(m, kept))


def silence_heads(outs, heads, head_dim: int) -> None:
    """Each out projection (in place) reads only its kept heads."""
    with torch.no_grad():
        for o, keep in zip(outs, heads, strict=True):
            for h in range(o.weight.shape[1] // head_dim):
                if h not in keep:
                    o.weight[:, h * head_dim:(h + 1) * head_dim] = 0


def _kept():
    return sorted(CHANNELS), HEADS


# -- image towers alone ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    from edgekit.testing import make_tiny_vision_encoder

    root = tmp_path_factory.mktemp("towers")
    return {f: make_tiny_vision_encoder(f, root / f, seed=i) for i, f in enumerate(ENCODERS)}


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_head_cut_is_the_masked_dense_tower_and_loads(towers, tmp_path, family):
    import transformers

    from edgekit.vision.prune import cut_encoder_width, load_encoder

    model, fam, cfg = load_encoder(towers[family])
    channels, heads = _kept()
    blocks = len(fam.width_layout(cfg).attention)  # SigLIP: 2 layers + the pooling head's attention
    assert blocks == 2 + (family == "siglip_vision_model")
    heads = heads[:blocks]
    cut = cut_encoder_width(model, fam, channels, heads)
    assert (cut.config.hidden_size, cut.config.num_attention_heads) == (24, 3)
    # the reference (module access, not the cut's tensor names): the dense tower, norms over the kept channels,
    # dropped heads silent; SigLIP's pooling query (its probe, read by in_proj columns) only in the kept channels
    ref = copy.deepcopy(model)
    mask_norms(ref, channels)
    outs = [fam.attention(layer)[3] for layer in fam.layers(ref)]
    if family == "siglip_vision_model":
        outs.append(ref.vision_model.head.attention.out_proj)
        with torch.no_grad():
            ref.vision_model.head.probe[..., [c for c in range(32) if c not in channels]] = 0
    silence_heads(outs, heads, 8)
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, pooled = fam.image_features(cut, px)
        rh, rp = fam.image_features(ref, px)
        dense = fam.image_features(model, px)[0]
    k = torch.tensor(channels)
    assert torch.allclose(hidden, rh[..., k], atol=1e-5), (hidden - rh[..., k]).abs().max()
    # CLIP's pooled output is the post-normed class token, SigLIP's the head's residual stream: hidden channels;
    # ViT's is the pooler's output, which keeps its width
    want = rp if family == "vit" else rp[..., k]
    assert pooled.shape == want.shape and torch.allclose(pooled, want, atol=1e-5), (pooled - want).abs().max()
    assert not torch.allclose(hidden, dense[..., k], atol=1e-3)  # a real change

    # a plain Hugging Face folder: from_pretrained loads every tensor at its shape, the counters agree
    cut.save_pretrained(tmp_path / "cut")
    loaded, info = getattr(transformers, fam.model_class).from_pretrained(tmp_path / "cut", output_loading_info=True)
    assert not any(info[x] for x in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    c2 = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert (c2["hidden_size"], c2["num_attention_heads"]) == (24, 3)
    n = sum(p.numel() for p in loaded.parameters())
    assert n == fam.geometry(c2).params() == sum(p.numel() for p in cut.parameters())
    assert n < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(fam.image_features(loaded.eval(), px)[0], hidden, atol=1e-5)


@pytest.mark.parametrize("family", ENCODERS)
def test_prune_vision_encoder_with_heads_reports_both_widths(towers, tmp_path, family):
    from edgekit.vision.prune import VisionPruneConfig, prune_vision_encoder

    r = prune_vision_encoder(towers[family], tmp_path / "p", VisionPruneConfig(ratio=0.5, num_samples=8, heads=3),
                             log=quiet)
    assert r["num_attention_heads"] == [4, 3] and r["hidden_size"] == [32, 24]
    assert r["intermediate_size"][1] < 128 and r["intermediate_size"][1] % 8 == 0  # MLPs make up the rest
    assert 0.5 <= r["removed_fraction"] < 0.6
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (24, 3,
                                                                                           r["intermediate_size"][1])
    if family == "vit":
        assert cfg["pooler_output_size"] == 32  # the pooled embedding keeps its size
    # compared on the kept channels (the pooled output too, where it narrowed)
    assert all(-1 <= v <= 1 for v in r["held_out"].values()) and r["held_out"]["token_mean_cosine"] > 0.3, r


@pytest.mark.parametrize("family", ENCODERS)
def test_width_scores_keep_what_the_outputs_need(towers, family):
    """The scored channels and heads keep the tower's token features closer than the lowest-scored ones."""
    from edgekit.vision.prune import (calibration_pixels, cut_encoder_width, embedding_agreement,
                                      kept_channels_and_heads, load_encoder, width_scores)

    model, fam, cfg = load_encoder(towers[family])
    px = calibration_pixels(towers[family], cfg, None, 16)
    held = calibration_pixels(towers[family], cfg, None, 8, seed=777)
    ch, hs = width_scores(model, fam.width_layout(cfg), 32, 8, lambda: [fam.image_features(model, px)[0]])
    assert ch.shape == (32,) and all(h.shape == (4,) for h in hs) and (ch > 0).all()
    with torch.no_grad():
        dense = fam.image_features(model, held)
    cos = {}
    for name, sign in (("top", 1), ("bottom", -1)):
        c, h = kept_channels_and_heads(sign * ch, [sign * x for x in hs], 3, 8)
        with torch.no_grad():
            cos[name] = embedding_agreement(dense, fam.image_features(cut_encoder_width(model, fam, c, h), held),
                                            c)["token_mean_cosine"]
    assert cos["top"] > cos["bottom"] + 0.02, cos


def test_pruned_heads_tower_exports_to_onnxruntime_gated(towers, tmp_path):
    """SigLIP: its pooling head's fused attention cut too, through the ONNX export and its gate."""
    from edgekit.vision.export import VisionExportConfig, export_vision_encoder
    from edgekit.vision.prune import VisionPruneConfig, prune_vision_encoder

    prune_vision_encoder(towers["siglip_vision_model"], tmp_path / "p", VisionPruneConfig(
        ratio=0.45, num_samples=8, heads=3), log=quiet)
    m = export_vision_encoder(tmp_path / "p", tmp_path / "art", VisionExportConfig(gate_images=2), log=quiet)
    outs = m["gate"]["outputs"]
    assert m["gate"]["passed"] and all(c["min_cosine"] > 0.9999 for c in outs.values()), outs


def test_vision_heads_bad_requests_are_one_line(towers, tmp_path, capsys):
    from edgekit.cli import main

    src = towers["clip_vision_model"]

    def err(*argv):
        assert main([str(a) for a in argv]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("edgekit: error: ") and "(fix: " in line
        return line

    assert "at least one attention head" in err("vision", "prune", src, "--ratio", "0.3", "--heads", "0",
                                                "-o", tmp_path / "p")
    assert "more heads than the tower's 4" in err("vision", "prune", src, "--ratio", "0.3", "--heads", "5",
                                                  "-o", tmp_path / "p")
    line = err("vision", "prune", src, "--ratio", "0.2", "--heads", "2", "-o", tmp_path / "p")
    assert "--heads 2 alone removes" in line and "--ratio 0." in line
    assert not (tmp_path / "p").exists()


# -- the VLM towers -------------------------------------------------------------------------------------------------

def _batch(path, pairs, fam, cfg, n=2):
    from edgekit.vlm.data import collate, encode, load_pairs

    tok, _, items = encode(path, load_pairs(pairs)[:n], fam, cfg)
    return collate(items, tok.pad_token_id)


@pytest.mark.parametrize("family", VLMS)
def test_vlm_tower_head_cut_is_the_masked_dense_model(vlm_models, pairs, family):
    """The whole VLM's logits: vision heads + hidden (and MLP neurons) cut, the projector's input following."""
    from transformers import AutoModelForImageTextToText

    from edgekit.vlm.prune import VlmPlan, build_vlm, pruned_vlm

    fam = VLM_FAMILIES[family]
    src = vlm_models[family]
    cfg = json.loads((src / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    channels, heads = _kept()
    L = cfg["vision_config"]["num_hidden_layers"]
    mlp = [list(range(0, 128, 2)), list(range(64)), list(range(64, 128))][:L]
    cut = build_vlm(fam, *pruned_vlm(model, fam, VlmPlan(mlp, None, None, channels, heads[:L])))
    v = cut.config.vision_config
    assert (v.hidden_size, v.num_attention_heads, v.intermediate_size) == (24, 3, 64)
    proj = fam.projector(cut)[0]
    assert proj.in_features == 24 * (4 if family != "llava" else 1)  # Idefics3: 4 pixel-shuffled copies

    ref = copy.deepcopy(model)
    mask_norms(fam.vision_tower(ref), channels)
    silence_heads([fam.vision_out(layer) for layer in fam.vision_layers(ref)], heads[:L], 8)
    with torch.no_grad():
        for layer, keep in zip(fam.vision_layers(ref), mlp):  # dropped MLP neurons: their fc2 columns silent
            fam.vision_fc(layer)[1].weight[:, [j for j in range(128) if j not in keep]] = 0
    dropped = [c for c in range(32) if c not in channels]
    if family == "llava":  # the projector reads a raw residual stream (feature layer -2): its dropped channels
        fam.projector(ref)[0].register_forward_pre_hook(lambda m, a: (a[0].index_fill(-1, torch.tensor(dropped),
                                                                                       0),))
    # Idefics3 / SmolVLM: the connector reads the masked post-layernorm, nothing to add: the pixel-shuffle column
    # mapping is what this checks
    b = _batch(src, pairs, fam, cfg)
    with torch.no_grad():
        got = cut(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values).logits
        want = ref(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values).logits
        dense = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (got - dense).abs().max() > 1e-3  # the image really reaches the logits through the cut tower


@pytest.fixture(scope="module")
def heads_pruned(vlm_models, pairs, tmp_path_factory):
    """{family: (folder, report)}: 30% removed, vision heads 4 -> 3 (hidden 32 -> 24), the rest shared; two
    re-scored steps, so the iterative path applies the width cut in its first step."""
    from edgekit.vlm.prune import VlmPruneConfig, prune_vlm

    root = tmp_path_factory.mktemp("heads-pruned")
    return {f: (root / f, prune_vlm(src, root / f, VlmPruneConfig(
        ratio=0.3, vision_share=0.3, vision_heads=3, calibration=pairs, num_samples=8, search_samples=4, steps=2),
        log=quiet)) for f, src in vlm_models.items()}


@pytest.mark.parametrize("family", VLMS)
def test_vlm_prune_with_vision_heads_round_trips(heads_pruned, pairs, family):
    from transformers import AutoModelForImageTextToText

    fam = VLM_FAMILIES[family]
    path, r = heads_pruned[family]
    assert r["vision"]["heads"] == [4, 3] and r["vision"]["hidden"] == [32, 24] and "heads_not_cut" not in r["vision"]
    assert r["vision"]["intermediate"][1] < 128 and r["language"]["intermediate"][1] < r["language"]["intermediate"][0]
    assert 0.28 < r["removed_fraction"] < 0.4, r["removed_fraction"]
    assert r["parts_after"]["projector"] < r["parts_before"]["projector"]
    model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[x] for x in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["vision_config"]["hidden_size"], cfg["vision_config"]["num_attention_heads"]) == (24, 3)
    assert sum(p.numel() for p in model.parameters()) == fam.geometry(cfg).params() == r["params_after"]
    b = _batch(path, pairs, fam, cfg)
    with torch.no_grad():
        out = model.eval()(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                           labels=b.labels)
    assert out.logits.shape[-1] == cfg["text_config"]["vocab_size"] and torch.isfinite(out.loss)


def test_vlm_head_cut_vision_exports_to_onnxruntime_gated(heads_pruned, tmp_path):
    """Idefics3's narrowed tower and pixel-shuffle connector through the VLM vision export and its gate."""
    import transformers

    from edgekit.vlm.export import export_vision

    path, _ = heads_pruned["idefics3"]
    cfg = json.loads((path / "config.json").read_text())
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    m = export_vision(model, VLM_FAMILIES["idefics3"], cfg, path, tmp_path / "vision", images=2, log=quiet)
    assert m["gate"]["passed"] and m["gate"]["min_cosine"] > 0.9999, m["gate"]


def test_vlm_vision_heads_without_heads_cut_keeps_the_note(vlm_models, pairs, tmp_path):
    from edgekit.vlm.prune import VlmPruneConfig, prune_vlm

    r = prune_vlm(vlm_models["llava"], tmp_path / "p", VlmPruneConfig(
        ratio=0.1, keep_language=True, vision_heads=4, calibration=pairs, num_samples=4, search_samples=2, steps=1),
        log=quiet)
    assert r["vision"]["heads"] == [4, 4] and r["vision"]["hidden"] == [32, 32] and "heads_not_cut" in r["vision"]


def test_vlm_vision_heads_bad_requests_are_one_line(vlm_models, tmp_path, capsys):
    from edgekit.cli import main

    src = vlm_models["llava"]

    def err(*argv):
        assert main([str(a) for a in argv]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("edgekit: error: ") and "(fix: " in line
        return line

    base = ("vlm", "prune", src, "-o", tmp_path / "p")
    assert "at least one attention head" in err(*base, "--ratio", "0.3", "--vision-heads", "0")
    assert "more heads than the tower's 4" in err(*base, "--ratio", "0.3", "--vision-heads", "8")
    assert "--keep-vision leaves it whole" in err(*base, "--ratio", "0.3", "--vision-heads", "2", "--keep-vision")
    line = err(*base, "--ratio", "0.01", "--vision-heads", "1")
    assert "--vision-heads 1 alone removes" in line and "--ratio 0." in line
    assert not (tmp_path / "p").exists()
    with pytest.raises(EdgekitError, match="at least one attention head"):
        from edgekit.vlm.prune import VlmPruneConfig

        VlmPruneConfig(ratio=0.3, vision_heads=True).check()  # a bool is not a head count
