"""llama.cpp's mmproj for the Idefics3 / SmolVLM layout (projector type idefics3, exporters/mmproj.py), loaded and run
by the real mtmd in llama-cpp-python (no mocks): image embeddings and whole image+text prompts against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.arch import VLM_FAMILIES
from edgekit.errors import EdgekitError

LAYOUT = ["idefics3", "smolvlm"]


def quiet(*a, **k):
    pass


def _lm_gguf(model, fam, path, d):
    from edgekit.export import ExportConfig
    from edgekit.exporters.gguf import plan, write_gguf
    from edgekit.vlm.export import save_language_model

    lm = save_language_model(model, fam, path, d / "lm")
    p = plan(json.loads((lm / "config.json").read_text()), ExportConfig(backend="gguf", precision="fp32",
                                                                         context_length=64).resolved())
    write_gguf(lm, d / "model.gguf", p, "f32")
    return d / "model.gguf"


@pytest.fixture(scope="module", params=LAYOUT)
def tiny(request, tmp_path_factory):
    """(family, folder, config, model, language GGUF) of a tiny Idefics3-layout VLM."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.testing import make_tiny_vlm

    d = tmp_path_factory.mktemp(request.param)
    path = make_tiny_vlm(request.param, d / "m", seed=5 + LAYOUT.index(request.param))
    cfg = json.loads((path / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    fam = VLM_FAMILIES[request.param]
    return fam, path, cfg, model, _lm_gguf(model, fam, path, d)


def _vision(tiny, out, precision):
    from edgekit.vlm.export import export_vision

    fam, path, cfg, model, lm = tiny
    return export_vision(model, fam, cfg, path, out, "gguf", precision, images=2, log=quiet, language_gguf=lm)


def test_idefics3_mmproj_is_what_llamacpp_reads_and_matches_pytorch(tiny, tmp_path):
    """fp16 mmproj: idefics3 keys (scale factor, the processor's longest edge), every layer and the post-layernorm,
    position rows written in transformers' bucketed order; mtmd's embeddings pass the fp16 gate, and whole prompts
    (mtmd's 1x1 slice + global image template, 2 x 16 image positions) match the PyTorch VLM fed the same ids."""
    import gguf
    import torch

    from edgekit.vlm.export import llamacpp_prompt_check

    fam, path, cfg, model, lm = tiny
    m = _vision(tiny, tmp_path / "v", "fp16")
    assert m["gate"]["passed"] and m["gate"]["min_cosine"] > 0.99999 and m["gate"]["max_abs_delta"] < 5e-3, m["gate"]
    r = gguf.GGUFReader(str(tmp_path / "v" / "mmproj.gguf"))
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    assert kv["clip.projector_type"] == "idefics3" and kv["clip.use_gelu"] and "clip.has_llava_projector" not in kv
    assert kv["clip.vision.projector.scale_factor"] == 2 and kv["clip.vision.preproc_image_size"] == 32
    assert kv["clip.vision.block_count"] == 3 and "clip.vision.feature_layer" not in kv
    t = {x.name: x for x in r.tensors}
    assert {"v.post_ln.weight", "v.blk.2.ffn_down.weight", "mm.model.fc.weight"} <= set(t)
    assert t["v.position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # ggml's CPU add needs it
    vm = model.model.vision_model
    pos = fam.full_image_positions(vm.embeddings.num_patches_per_side)
    want = vm.embeddings.position_embedding.weight.detach()[torch.tensor(pos)].numpy()
    assert np.array_equal(np.asarray(t["v.position_embd.weight"].data).reshape(want.shape), want)
    p = llamacpp_prompt_check(model, fam, cfg, path, tmp_path / "v" / "mmproj.gguf", lm)
    assert p["image_chunks"] == 2 and p["top1_agreement"] == 1.0 and p["max_abs_logit_delta"] < 5e-3, p


def test_idefics3_fp32_mmproj_gate_says_llamacpp_runs_f16(tiny, tmp_path):
    """llama.cpp computes parts of the tower in f16 even from an f32 file: the fp32 bound (1e-3) is missed at a
    cosine of 0.9999999, and the gate says so in one line with the fix."""
    from edgekit.vlm.export import vision_gate_error

    m = _vision(tiny, tmp_path / "v", "fp32")
    g = m["gate"]
    assert not g["passed"] and g["min_cosine"] > 0.99999 and 1e-3 < g["max_abs_delta"] < 5e-3, g
    line = vision_gate_error(m).line()
    assert "in f16 even from an f32 mmproj" in line and "--vision-precision fp16" in line and "\n" not in line


def test_vocab_without_the_template_token_is_refused_before_decoding(tiny, tmp_path):
    """mtmd's idefics3 template looks up "\\n\\n": a vocabulary without it (here the tiny LLaVA's, which also lacks
    the wrapping tokens) gets token -1, refused in one line instead of crashing llama.cpp."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.exporters.mmproj import MtmdEncoder
    from edgekit.testing import make_tiny_vlm

    m = _vision(tiny, tmp_path / "v", "fp16")
    lp = make_tiny_vlm("llava", tmp_path / "llava", seed=1)
    llava = AutoModelForImageTextToText.from_pretrained(lp, dtype=torch.float32).eval()
    lm = _lm_gguf(llava, VLM_FAMILIES["llava"], lp, tmp_path)
    enc = MtmdEncoder(tmp_path / "v" / m["file"], lm, threads=1)
    try:
        with pytest.raises(EdgekitError) as e:
            enc.layout(np.zeros((32, 32, 3), np.uint8), "hi")
    finally:
        enc.close()
    assert "token -1" in e.value.line() and '"\\n\\n"' in e.value.line() and "\n" not in e.value.line()


@pytest.mark.slow
def test_vlm_export_gguf_with_idefics3_mmproj_end_to_end(tiny, tmp_path, cli):
    """`edgekit vlm export -b gguf --vision-backend gguf --vision-precision fp16`: both parts pass, the whole image
    prompt through llama.cpp is recorded."""
    fam, path, *_ = tiny
    cli("vlm", "export", path, "-b", "gguf", "--vision-backend", "gguf", "--vision-precision", "fp16",
        "--context", "128", "-o", tmp_path / "a", check=0)
    m = json.loads((tmp_path / "a" / "vlm.json").read_text())
    assert m["vision"]["gate"]["passed"] and m["language"]["gate"]["passed"] and m["recomposed"]["passed"]
    p = m["vision"]["llamacpp_image_prompt"]
    assert p["image_chunks"] == 2 and p["max_abs_logit_delta"] < 5e-3, p
