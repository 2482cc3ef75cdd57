"""ONNX Runtime int4 for real: MatMulNBits 4-bit by HQQ (the LM head at 8 bits), gated, smaller than int8; group
sizes 32/64/128 and their refusal."""

import json

import numpy as np
import onnx
import pytest

from edgekit.export import ExportConfig, export_model
from edgekit.runtime import open_artifact
from edgekit.runtime.base import greedy


def _nbits(folder):
    """{weight K x N: bits} of every MatMulNBits node, and the other op types' counts."""
    g = onnx.load(str(folder / "model.onnx")).graph
    nodes = [n for n in g.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    return attrs, [n.op_type for n in g.node]


def test_int4_exports_gated_and_smaller_than_int8(declared_artifact, tiny_models, capfd):
    capfd.readouterr()
    art, meta = declared_artifact("onnxruntime", "int4")
    err = capfd.readouterr().err
    assert "skip to quantize" not in err  # the quantizer's per-node INFO flood stays off the terminal
    g = meta["gate"]
    # KL, not top-1: a tiny random model's logits are nearly flat, so 4-bit noise flips its argmax at random (on this
    # model HQQ gets top-1 0.56, GGUF q4_0 0.48, both at KL ~0.01); SmolLM2 and Qwen2.5-0.5B pass the whole gate
    # (bench/quantize_quality.md, and the slow test below)
    assert meta["precision"] == "int4" and g["mean_kl"] < 0.02
    assert all(f.startswith("top-1 agreement") for f in g["failures"])
    assert meta["group_size"] == 32 and "HQQ, uint8 zero points" in meta["quantization"]
    i8, _ = declared_artifact("onnxruntime", "int8")
    assert (art / "model.onnx").stat().st_size < (i8 / "model.onnx").stat().st_size
    attrs, ops = _nbits(art)
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    four = [a for a in attrs if a["bits"] == 4]
    # the lean graph projects q/k/v in one MatMul: fused qkv, o, gate, up, down per layer
    assert meta["graph"] == "lean" and "MatMul" not in ops
    assert len(four) == 5 * cfg["num_hidden_layers"] and all(a["block_size"] == 32 for a in four)
    # both widths on MatMulNBits' fast path: int8 compute, and HQQ's zero points stored as uint8, not float
    assert all(a.get("accuracy_level") == 4 for a in attrs)
    g4 = onnx.load(str(art / "model.onnx")).graph
    zps = {n.input[3] for n in g4.node if n.op_type == "MatMulNBits" and len(n.input) > 3}
    assert len(zps) == len(four) and {t.data_type for t in g4.initializer if t.name in zps} == {onnx.TensorProto.UINT8}
    assert [a["N"] for a in attrs if a["bits"] == 8] == [cfg["vocab_size"]]  # the LM head, 8 bits
    assert ops.count("Gather") >= 1  # the embedding stays a Gather (fp32)
    r = open_artifact(art)  # reloads torch-free and decodes
    assert len(greedy(r, np.arange(1, 6, dtype=np.int64), 8)) == 8


def test_int4_group_64_round_to_nearest(tiny_models, tmp_path):
    """Another group size, on another family, through the uncalibrated path (what the bench compares against)."""
    meta = export_model(tiny_models["qwen2"], tmp_path / "q", ExportConfig(
        precision="w4", group_size=64, calibrate=False, context_length=128, accept_gate_failure=True),
        log=lambda *_: None)
    assert meta["precision"] == "int4" and meta["group_size"] == 64 and "round-to-nearest" in meta["quantization"]
    assert "passed" in meta["gate"]
    attrs, _ = _nbits(tmp_path / "q")
    assert {a["block_size"] for a in attrs if a["bits"] == 4} == {64}


@pytest.mark.parametrize("args, msg", [
    (("--precision", "int4", "--group-size", "128"), "int4 group size 128 does not divide the model's hidden_size 64"),
    (("--precision", "int4", "--group-size", "48"), "int4 group size 48 is not one of 32, 64, 128"),
    (("--precision", "int8", "--group-size", "64"), "a group size applies to int4 only, not int8"),
])
def test_bad_group_size_is_one_line_and_writes_nothing(cli, tiny_models, tmp_path, args, msg):
    p = cli("export", tiny_models["llama"], "--backend", "onnxruntime", *args, "-o", tmp_path / "x")
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("edgekit: error:")]
    assert p.returncode == 2 and len(errors) == 1 and msg in errors[0] and "(fix: " in errors[0], p.stderr
    assert p.stderr.splitlines()[-1] == errors[0]  # before it only the progress line; no traceback
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_int4_passes_its_gate_on_the_fast_path(smollm2, tmp_path):
    """The real model, whole gate: integer zero points and int8 compute keep SmolLM2 within int4's thresholds."""
    meta = export_model(smollm2, tmp_path / "i4", ExportConfig(backend="onnxruntime", precision="int4",
                                                             context_length=256), log=lambda *_: None)
    g = meta["gate"]
    assert g["passed"] and g["top1_agreement"] >= 0.9 and g["mean_kl"] < 0.02, g
    attrs, _ = _nbits(tmp_path / "i4")
    assert attrs and all(a.get("accuracy_level") == 4 for a in attrs)
