"""The vision-encoder meta-test: every registered image-tower family (edgekit.arch.VISION_ENCODERS, task
"vision-encoder": CLIP / SigLIP vision models, ViT), as a tiny random model from its config with its image processor,
goes through geometry, widthwise MLP pruning (reloaded by from_pretrained) and export gated on its token features
and pooled embedding in the backend's real runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.arch import VISION_ENCODERS
from edgekit.errors import EdgekitError

ENCODERS = sorted(VISION_ENCODERS)


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    from edgekit.testing import make_tiny_vision_encoder

    root = tmp_path_factory.mktemp("towers")
    return {f: make_tiny_vision_encoder(f, root / f, seed=i) for i, f in enumerate(ENCODERS)}


@pytest.fixture(scope="module")
def pruned(towers, tmp_path_factory):
    from edgekit.vision.prune import VisionPruneConfig, prune_vision_encoder

    root = tmp_path_factory.mktemp("towers-pruned")
    return {f: (root / f, prune_vision_encoder(src, root / f, VisionPruneConfig(ratio=0.3, num_samples=16), log=quiet))
            for f, src in towers.items()}


def _load(path):
    import transformers

    from edgekit.arch import vision_encoder_of

    cfg = json.loads((path / "config.json").read_text())
    fam = vision_encoder_of(cfg)
    return getattr(transformers, fam.model_class).from_pretrained(path), fam, cfg


def test_registry_and_refusals():
    from edgekit.arch import REGISTRY, get_family, vision_encoder_of

    assert set(ENCODERS) == {"clip_vision_model", "siglip_vision_model", "vit"}
    assert all(REGISTRY[f].task == "vision-encoder" for f in ENCODERS)
    with pytest.raises(EdgekitError, match="image encoder.*edgekit vision prune"):
        get_family("vit")  # a decoder stage handed an image tower says where to go
    with pytest.raises(EdgekitError, match="not an image encoder edgekit supports"):
        vision_encoder_of({"model_type": "llava"})


@pytest.mark.parametrize("family", ENCODERS)
def test_geometry_counts_every_parameter(towers, family):
    model, fam, cfg = _load(towers[family])
    g = fam.geometry(cfg)
    assert g.params() == sum(p.numel() for p in model.parameters())
    assert g.tokens == 16 + int(fam.class_token)
    assert all(up.out_features == cfg["intermediate_size"] == down.in_features for up, down in fam.mlps(model))


@pytest.mark.parametrize("family", ENCODERS)
def test_prune_mlps_round_trips_and_keeps_the_embedding(pruned, family):
    path, r = pruned[family]
    model, fam, cfg = _load(path)
    assert sum(p.numel() for p in model.parameters()) == fam.geometry(cfg).params() == r["params_after"]
    assert 0.3 <= r["removed_fraction"] < 0.4 and cfg["intermediate_size"] == r["intermediate_size"][1]
    assert cfg["intermediate_size"] % 8 == 0
    assert r["held_out"]["pooled_mean_cosine"] > 0.9 and r["held_out"]["token_mean_cosine"] > 0.9, r["held_out"]
    assert (path / "preprocessor_config.json").is_file()


def test_refit_recovers_more_than_the_cut_alone(towers, tmp_path):
    from edgekit.vision.prune import VisionPruneConfig, prune_vision_encoder

    src = towers["clip_vision_model"]
    a = prune_vision_encoder(src, tmp_path / "a", VisionPruneConfig(ratio=0.3, num_samples=16), log=quiet)
    b = prune_vision_encoder(src, tmp_path / "b", VisionPruneConfig(ratio=0.3, num_samples=16, refit=False), log=quiet)
    assert a["held_out"]["token_mean_cosine"] > b["held_out"]["token_mean_cosine"]


@pytest.mark.parametrize("family", ENCODERS)
def test_export_onnxruntime_gates_tokens_and_pooled(pruned, tmp_path, family):
    import onnxruntime as ort

    from edgekit.vision.export import VisionExportConfig, export_vision_encoder

    path, _ = pruned[family]
    m = export_vision_encoder(path, tmp_path / "art", VisionExportConfig(gate_images=2), log=quiet)
    outs = m["gate"]["outputs"]
    assert m["gate"]["passed"] and set(outs) == {"last_hidden_state", "pooler_output"}
    assert all(c["min_cosine"] > 0.9999 and c["max_abs_delta"] < 1e-4 for c in outs.values()), outs
    ref = np.load(tmp_path / "art" / "reference.npz")
    sess = ort.InferenceSession(str(tmp_path / "art" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    hidden, pooled = sess.run(None, {"pixel_values": ref["pixel_values"][:1]})  # the batch is dynamic
    assert hidden.shape == (1, m["tokens"], 32) and pooled.shape == (1, 32)
    assert np.abs(pooled - ref["pooler_output"][:1]).max() < 1e-4


def test_export_tensorrt_plans_the_engine(pruned, tmp_path):
    from edgekit.target import get_target
    from edgekit.vision.export import VisionExportConfig, export_vision_encoder

    path, _ = pruned["siglip_vision_model"]
    m = export_vision_encoder(path, tmp_path / "trt", VisionExportConfig("tensorrt", "fp16", get_target("jetson-orin"),
                                                                         gate_images=2), log=quiet)
    assert m["gate"]["passed"] and "--fp16" in m["build_command"]
    assert "--maxShapes=pixel_values:4x3x32x32" in json.loads((tmp_path / "trt" / "trt.json").read_text())[
        "build_command"]


@pytest.mark.slow  # XNNPACK lowering takes ~30 s on 2 cores
def test_export_executorch_runs_in_executorch(pruned, tmp_path):
    from edgekit.vision.export import VisionExportConfig, export_vision_encoder

    path, _ = pruned["vit"]
    m = export_vision_encoder(path, tmp_path / "et", VisionExportConfig("executorch", gate_images=2), log=quiet)
    assert m["gate"]["passed"] and m["file"] == "vision_encoder.pte"
    assert all(c["min_cosine"] > 0.99999 for c in m["gate"]["outputs"].values())


def test_bad_requests_are_one_line(towers, tmp_path, capsys):
    from edgekit.cli import main

    src = towers["vit"]

    def err(*argv):
        assert main([str(a) for a in argv]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("edgekit: error: ") and "(fix: " in line
        return line

    assert "can give at most" in err("vision", "prune", src, "--ratio", "0.9", "-o", tmp_path / "p")
    assert "built in fp32, not fp16" in err("vision", "export", src, "-b", "executorch", "-p", "fp16",
                                            "-o", tmp_path / "e")
    assert "image encoder" in err("prune", src, "--ratio", "0.3", "-o", tmp_path / "p")
    (tmp_path / "notvision").mkdir()
    (tmp_path / "notvision" / "config.json").write_text('{"model_type": "llama"}')
    assert "not an image encoder edgekit supports" in err("vision", "export", tmp_path / "notvision",
                                                          "-o", tmp_path / "e")
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()
