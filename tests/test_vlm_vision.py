"""Vision-tower export beyond ONNX Runtime (exporters/vision.py, exporters/mmproj.py): ExecuTorch (.pte run by
ExecuTorch's Python runtime), TensorRT (ONNX + trtexec plan, gated through ONNX Runtime: TensorRT can't run here) and
llama.cpp's mmproj (run by llama.cpp's own mtmd), each gated on image embeddings against PyTorch."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from edgekit.arch import VLM_FAMILIES
from edgekit.errors import EdgekitError, GateFailed

VLMS = sorted(VLM_FAMILIES)


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.testing import make_tiny_vlm

    path = make_tiny_vlm("llava", tmp_path_factory.mktemp("vis") / "llava", seed=3)
    cfg = json.loads((path / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return path, cfg, model


def _vision(llava, out, backend, precision="fp32", **kw):
    from edgekit.vlm.export import export_vision

    path, cfg, model = llava
    return export_vision(model, VLM_FAMILIES["llava"], cfg, path, out, backend, precision, images=2, log=quiet, **kw)


def test_every_vision_backend_is_declared_and_implemented():
    from edgekit.exporters import REGISTRY
    from edgekit.exporters.vision import BACKENDS
    from edgekit.vlm.export import VISION_GATES

    declared = {n for n, s in REGISTRY.items() if s.vision_precisions}
    assert declared == set(BACKENDS) == {"onnxruntime", "executorch", "tensorrt", "gguf"}
    assert all(p in VISION_GATES for s in REGISTRY.values() for p in s.vision_precisions)


def test_tensorrt_vision_plans_the_engine_and_gates_the_onnx(llava, tmp_path):
    from edgekit.target import get_target

    with pytest.raises(EdgekitError, match="needs a target with runtime.tensorrt"):
        _vision(llava, tmp_path / "none", "tensorrt", "fp16")
    m = _vision(llava, tmp_path / "v", "tensorrt", "fp16", target=get_target("jetson-orin"))
    assert m["gate"]["passed"] and m["gate"]["min_cosine"] > 0.9999 and m["gate"]["runtime"].startswith("onnxruntime")
    plan = json.loads((tmp_path / "v" / "trt.json").read_text())
    assert plan["tensorrt_version"] == "10.3" and plan["gpu_sm"] == "8.7" and plan["opset"] <= 17
    cmd = plan["build_command"]
    assert cmd[:3] == ["trtexec", "--onnx=vision_encoder.onnx", "--saveEngine=vision.engine"]
    assert "--minShapes=pixel_values:1x3x32x32" in cmd and "--maxShapes=pixel_values:4x3x32x32" in cmd
    assert "--fp16" in cmd and any(c.startswith("--memPoolSize=workspace:") for c in cmd)
    # the ONNX the engine is built from is fp16-safe and runs any batch up to the profile's max
    import onnx
    import onnxruntime as ort

    g = onnx.load(str(tmp_path / "v" / "vision_encoder.onnx"))
    assert g.opset_import[0].version == plan["opset"]
    ref = np.load(tmp_path / "v" / "reference.npz")
    sess = ort.InferenceSession(str(tmp_path / "v" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": ref["pixel_values"][:1]})[0]
    assert np.abs(got - ref["image_embeds"][:1]).max() < 1e-4


@pytest.mark.slow  # XNNPACK lowering of even the tiny tower takes ~30 s on 2 cores
def test_executorch_vision_pte_runs_in_executorch_and_passes(llava, tmp_path):
    m = _vision(llava, tmp_path / "v", "executorch")
    g = m["gate"]
    assert g["passed"] and g["min_cosine"] > 0.99999 and g["max_abs_delta"] < 1e-5, g
    assert m["file"] == "vision_encoder.pte" and m["delegated_ops"] > 0 and g["shape"] == [2, 16, 64]
    with pytest.raises(EdgekitError, match="fp32 only"):
        _vision(llava, tmp_path / "q", "executorch", "fp16")


IDEFICS3_LAYOUT = ["idefics3", "smolvlm"]


@pytest.fixture(scope="module", params=IDEFICS3_LAYOUT)
def idefics(request, tmp_path_factory):
    """A tiny Idefics3-layout VLM (SigLIP-style tower, pixel-shuffle connector): (family, folder, config, model)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.testing import make_tiny_vlm

    path = make_tiny_vlm(request.param, tmp_path_factory.mktemp("vis") / request.param,
                         seed=5 + IDEFICS3_LAYOUT.index(request.param))  # the same layout: different weights
    cfg = json.loads((path / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, path, cfg, model


def test_idefics3_position_ids_are_transformers_bucketize():
    """The numpy position ids (a constant in the exported graph) are exactly what transformers' torch.bucketize
    gives a full grid, at every grid side up to 80 (SmolVLM's 512 / 16 = 32, Idefics3's 364 / 14 = 26)."""
    import torch

    for n in range(1, 81):
        bounds = torch.arange(1 / n, 1.0, 1 / n)
        b = torch.bucketize(torch.arange(n, dtype=torch.float32) / n * (1 - 1e-6), bounds, right=True)
        assert VLM_FAMILIES["idefics3"].full_image_positions(n) == (b[:, None] * n + b).flatten().tolist(), n


def test_executorch_vision_runs_the_idefics3_layout(idefics, tmp_path):
    """Idefics3 / SmolVLM's tower + connector lowers to XNNPACK (no aten.bucketize left in the graph), and the .pte
    run by ExecuTorch's runtime matches transformers' own get_image_features."""
    import torch

    from edgekit.exporters.vision import VisionInputs, executorch_open
    from edgekit.vlm.export import export_vision

    arch, path, cfg, model = idefics
    m = export_vision(model, VLM_FAMILIES[arch], cfg, path, tmp_path, "executorch", images=2, log=quiet)
    g = m["gate"]
    assert g["passed"] and g["runtime"] == "executorch" and g["shape"] == [2, 16, 64], g
    assert g["min_cosine"] > 0.99999 and g["max_abs_delta"] < 1e-5, g
    assert m["delegated_ops"] > 0 and m["input"]["pixel_values"] == [1, 3, 32, 32]  # (images, C, H, W) per prompt
    ref = np.load(tmp_path / "reference.npz")
    run = executorch_open(tmp_path, m)
    got = run(VisionInputs(ref["pixel_values"], ref["images"]))[0]
    with torch.no_grad():
        hf = model.model.get_image_features(torch.as_tensor(ref["pixel_values"])).numpy()
    assert np.abs(got - hf.reshape(got.shape)).max() < 1e-5


@pytest.mark.slow
def test_vlm_export_both_parts_to_executorch_idefics3(idefics, tmp_path, cli):
    """`edgekit vlm export -b executorch --vision-backend executorch` for the Idefics3 layout: both .pte files gated in
    ExecuTorch's runtime, and the split matches the whole VLM on image+text prompts."""
    arch, path, _, _ = idefics
    cli("vlm", "export", path, "-b", "executorch", "--vision-backend", "executorch", "--context", "64",
        "-o", tmp_path / "a", check=0)
    m = json.loads((tmp_path / "a" / "vlm.json").read_text())
    v = m["vision"]
    assert m["arch"] == arch and v["file"] == "vision_encoder.pte" and v["gate"]["passed"], v["gate"]
    assert v["gate"]["min_cosine"] > 0.99999 and v["gate"]["max_abs_delta"] < 1e-5, v["gate"]
    assert m["language"]["backend"] == "executorch" and m["language"]["gate"]["passed"]
    assert m["recomposed"]["passed"] and m["recomposed"]["max_abs_logit_delta"] < 1e-4, m["recomposed"]


@pytest.fixture(scope="module")
def lm_gguf(llava, tmp_path_factory):
    """The tiny LLaVA's language model as an f32 GGUF (mtmd needs a llama model for its context)."""
    from edgekit.exporters.gguf import plan, write_gguf
    from edgekit.vlm.export import save_language_model

    path, cfg, model = llava
    d = tmp_path_factory.mktemp("lm")
    lm = save_language_model(model, VLM_FAMILIES["llava"], path, d / "lm")
    from edgekit.export import ExportConfig

    p = plan(json.loads((lm / "config.json").read_text()), ExportConfig(backend="gguf", precision="fp32",
                                                                         context_length=64).resolved())
    write_gguf(lm, d / "model.gguf", p, "f32")
    return d / "model.gguf"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_mmproj_is_what_llamacpp_reads_and_runs(llava, lm_gguf, tmp_path, precision):
    """The mmproj reads back with gguf-py (arch clip, LLaVA MLP projector, feature layer, one tensor per weight) and
    llama.cpp's mtmd loads and runs it. mtmd in llama-cpp-python 0.3.36 appends CLIP's class token after the patches
    and gathers rows 1..n (llama.cpp #25814), so its embeddings match a PyTorch model of that graph, not the VLM: the
    gate fails and says why."""
    import gguf

    m = _vision(llava, tmp_path / "v", "gguf", precision, language_gguf=lm_gguf)
    r = gguf.GGUFReader(str(tmp_path / "v" / "mmproj.gguf"))
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    assert kv["general.architecture"] == "clip" and kv["clip.projector_type"] == "mlp"
    assert kv["clip.has_vision_encoder"] and kv["clip.has_llava_projector"] and not kv["clip.use_gelu"]  # quick_gelu
    assert kv["clip.vision.block_count"] == 2 and kv["clip.vision.feature_layer"] == [2]  # layer -2 of 3
    assert kv["clip.vision.image_size"] == 32 and kv["clip.vision.projection_dim"] == 64
    names = {t.name: t for t in r.tensors}
    assert {"v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "v.pre_ln.weight", "v.blk.1.ffn_up.weight",
            "mm.0.weight", "mm.2.bias"} <= set(names) and "v.blk.2.attn_q.weight" not in names
    assert "v.post_ln.weight" not in names  # the LLaVA graph reads the hidden state before it
    want = gguf.GGMLQuantizationType.F16 if precision == "fp16" else gguf.GGMLQuantizationType.F32
    assert names["v.blk.0.attn_q.weight"].tensor_type == want
    assert names["v.blk.0.ln1.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    g = m["gate"]
    assert g["vs_llamacpp_graph"]["min_cosine"] > (0.9999 if precision == "fp32" else 0.999), g
    assert not g["passed"] and g["min_cosine"] < 0.99
    from edgekit.vlm.export import vision_gate_error

    line = vision_gate_error(m).line()
    assert "#25814" in line and "--vision-backend onnxruntime" in line and "\n" not in line


def test_vision_backend_refusals_are_one_line(llava, tmp_path, capsys):
    from edgekit.cli import main
    from edgekit.exporters.mmproj import check_supported

    path, cfg, _ = llava
    for argv, want in ((["--vision-backend", "gguf"], "mmproj runs beside a GGUF language model"),
                       (["--vision-backend", "executorch", "--vision-precision", "fp16"], "built in fp32, not fp16"),
                       (["--vision-backend", "onnxruntime", "--vision-precision", "int4"], "not int4")):
        assert main(["vlm", "export", str(path), *argv, "-o", str(tmp_path / "o")]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert want in line and "(fix: " in line, line
    assert not (tmp_path / "o").exists()
    # a VLM family llama.cpp has no mmproj for
    fam = replace(VLM_FAMILIES["llava"], mmproj_projector_type=None)
    with pytest.raises(EdgekitError) as e:
        check_supported(fam, cfg)
    assert "no llama.cpp multimodal projector (mmproj) support" in e.value.line() and "--vision-backend onnxruntime" in \
        e.value.line()
    with pytest.raises(EdgekitError, match="class token"):
        check_supported(VLM_FAMILIES["llava"], {**cfg, "vision_feature_select_strategy": "full"})


@pytest.mark.slow
def test_vlm_export_gguf_with_mmproj_end_to_end(llava, tmp_path, cli):
    """`edgekit vlm export -b gguf --vision-backend gguf`: the language GGUF passes its gate; the mmproj fails its
    gate in this llama.cpp (#25814) and exits 3, and --accept-gate-failure keeps both parts with the result recorded."""
    path, _, _ = llava
    p = cli("vlm", "export", path, "-b", "gguf", "--vision-backend", "gguf", "--context", "64", "-o", tmp_path / "a",
            check=3)
    assert "#25814" in p.stderr and "match PyTorch on that graph" in p.stderr
    cli("vlm", "export", path, "-b", "gguf", "--vision-backend", "gguf", "--context", "64", "--accept-gate-failure",
        "-o", tmp_path / "b", check=0)
    m = json.loads((tmp_path / "b" / "vlm.json").read_text())
    assert m["language"]["gate"]["passed"] and not m["vision"]["gate"]["passed"]
    assert m["vision"]["language_gguf"] == "../language/model.gguf"
    # whole image+text prompts evaluated by llama.cpp (mtmd + the language GGUF) match PyTorch on llama.cpp's graph
    p = m["vision"]["llamacpp_image_prompt"]
    assert p["max_abs_logit_delta_vs_llamacpp_graph"] < 5e-3 < p["max_abs_logit_delta"], p
    # the benchmark times the real image prompt through mtmd
    r = json.loads(cli("vlm", "bench", tmp_path / "b", "--runs", "2", "--json", check=0).stdout)
    assert "run by llama.cpp's mtmd" in r["ttft_prefill"] and r["ttft_ms"]["p50"] > 0

    assert (tmp_path / "b" / "vision" / "mmproj.gguf").is_file() and (tmp_path / "b" / "language" / "model.gguf").is_file()


def test_vlm_plan_counts_both_towers_and_the_image_tokens_kv():
    """LLaVA-1.5-7B's shape (transformers' LlavaConfig defaults: CLIP ViT-L/14 at 336, Llama 7B), arithmetic only."""
    import transformers

    from edgekit.arch import vlm_family_of
    from edgekit.plan import PlanRequest, memory
    from edgekit.target import get_target
    from edgekit.vlm.plan import VlmPlanRequest, vlm_memory

    cfg = transformers.LlavaConfig().to_dict()
    fam = vlm_family_of(cfg)
    g = fam.geometry(cfg)
    assert g.image_tokens == 576
    req = VlmPlanRequest(context=2048, language_backend="gguf", language_precision="q4_k_m", vision_backend="gguf",
                         vision_precision="fp16")
    m = vlm_memory(cfg, get_target("jetson-orin"), req)
    lang = memory(fam.text_config(cfg), "gguf", "q4_k_m", PlanRequest(context=2048))
    assert m["language"] == lang  # the language model is planned by the decoder planner, context incl. image tokens
    assert m["vision"]["weights_bytes"] == (g.vision.params() + g.projector_params) * 2
    assert m["image_kv_cache_bytes"] == lang["kv_cache_bytes"] * 576 // 2048
    assert m["vision"]["runtime_overhead_bytes"] == 0  # mmproj runs inside llama.cpp's process
    assert m["total_bytes"] == lang["total_bytes"] + sum(m["vision"].values())
    assert not m["fits"] and m["total_bytes"] > 5.5e9  # 7B at q4_k_m + CLIP-L does not fit an 8 GB Orin Nano
    assert vlm_memory(cfg, get_target("x86-cpu"), req)["fits"]
    other = vlm_memory(cfg, get_target("x86-cpu"), VlmPlanRequest(context=2048, images=2, vision_backend="executorch"))
    assert other["vision"]["runtime_overhead_bytes"] > 0 and other["image_positions"] == 1152
    with pytest.raises(EdgekitError, match="take 576 positions, the whole context of 512"):
        vlm_memory(cfg, get_target("x86-cpu"), VlmPlanRequest(context=512))


@pytest.mark.slow
def test_vlm_bench_reports_encode_ttft_and_decode(llava, tmp_path, cli):
    path, _, _ = llava
    cli("vlm", "export", path, "-b", "gguf", "--context", "64", "-o", tmp_path / "a", check=0)
    p = cli("vlm", "bench", tmp_path / "a", "--runs", "3", "--json", check=0)
    r = json.loads(p.stdout)
    assert r["vision"] == {"backend": "onnxruntime", "precision": "fp32"} and r["language"]["backend"] == "gguf"
    assert 0 < r["image_encode_ms"]["p50"] <= r["ttft_ms"]["p50"] and r["decode_tokens_per_s"] > 0
    assert r["ttft_prefill"].startswith("32 positions (16 image + 16 text)")


def test_vlm_bench_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    from edgekit.cli import main

    assert main(["vlm", "bench", str(tmp_path)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not an exported VLM (no vlm.json)" in line and "edgekit vlm export" in line


@pytest.mark.slow
def test_vlm_export_both_parts_to_executorch(llava, tmp_path, cli):
    """Vision tower and language model both as .pte, each gated in ExecuTorch's runtime, then benchmarked."""
    path, _, _ = llava
    cli("vlm", "export", path, "-b", "executorch", "--vision-backend", "executorch", "--context", "64",
        "-o", tmp_path / "a", check=0)
    m = json.loads((tmp_path / "a" / "vlm.json").read_text())
    assert m["vision"]["gate"]["passed"] and m["vision"]["file"] == "vision_encoder.pte"
    assert m["language"]["backend"] == "executorch" and m["language"]["gate"]["passed"] and m["recomposed"]["passed"]
    r = json.loads(cli("vlm", "bench", tmp_path / "a", "--runs", "2", "--json", check=0).stdout)
    assert r["vision"]["backend"] == "executorch" and r["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("family", VLMS)
def test_family_without_mmproj_is_refused_in_one_line(family, tmp_path, capsys, monkeypatch):
    """A registered VLM family llama.cpp's mmproj is not written for (every family has one today: each is made one
    here) says so in one line before anything is loaded."""
    from edgekit.cli import main
    from edgekit.testing import VLM_TINY

    monkeypatch.setitem(VLM_FAMILIES, family, replace(VLM_FAMILIES[family], mmproj_projector_type=None))

    d = tmp_path / "m"
    d.mkdir()
    import transformers

    cfg = getattr(transformers, VLM_FAMILIES[family].config_class)(**VLM_TINY[family]).to_dict()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text("{}")
    assert main(["vlm", "export", str(d), "-b", "gguf", "--vision-backend", "gguf", "-o", str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no llama.cpp multimodal projector (mmproj) support" in line and "--vision-backend onnxruntime" in line
    assert not (tmp_path / "o").exists()
