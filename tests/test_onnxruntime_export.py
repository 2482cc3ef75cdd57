"""The ONNX Runtime path for real: export with a KV cache, gate against PyTorch, reload torch-free."""

import json

import numpy as np
import pytest

from edgekit.export import ExportConfig, export_model
from edgekit.runtime import open_artifact
from edgekit.runtime.base import greedy, sequence_logits

ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    return {(a, p): export_model(tiny_models[a], root / f"{a}-{p}", ExportConfig(precision=p)) and root / f"{a}-{p}"
            for a in ARCHS for p in ("fp32", "int8")}


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_gate_passes_with_identical_greedy(artifacts, tiny_models, arch):
    meta = json.loads((artifacts[(arch, "fp32")] / "artifact.json").read_text())
    g = meta["gate"]
    assert g["passed"] and g["greedy_match"] and g["top1_agreement"] == 1.0
    assert g["max_abs_logit_delta"] < 1e-4
    cfg = json.loads((tiny_models[arch] / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA exercised
    assert meta["model"]["num_kv_heads"] == 2 and meta["model"]["arch"] == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_gate_and_size(artifacts, arch):
    meta = json.loads((artifacts[(arch, "int8")] / "artifact.json").read_text())
    assert meta["gate"]["passed"] and meta["gate"]["top1_agreement"] >= 0.85
    f32 = (artifacts[(arch, "fp32")] / "model.onnx").stat().st_size
    i8 = (artifacts[(arch, "int8")] / "model.onnx").stat().st_size
    assert i8 < 0.6 * f32  # the fp32 embedding table (a Gather) stays; every projection is int8
    import onnx

    ops = [n.op_type for n in onnx.load(str(artifacts[(arch, "int8")] / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head


def test_kv_cache_decode_equals_full_prefill(artifacts):
    """Token-by-token decoding through the cache gives the same logits as one prefill of the whole sequence."""
    r = open_artifact(artifacts[("llama", "fp32")])
    ids = np.arange(1, 25, dtype=np.int64)
    full = sequence_logits(r, ids)
    stepped = sequence_logits(r, ids, chunk=1)
    chunked = sequence_logits(r, ids, chunk=7)
    assert full.shape == (24, 512)
    np.testing.assert_allclose(stepped, full, atol=1e-4)
    np.testing.assert_allclose(chunked, full, atol=1e-4)
    assert len(greedy(r, ids[:5], 10)) == 10


def test_gate_fails_on_a_wrong_artifact(artifacts, tiny_models, tmp_path):
    """The gate can fail: the Qwen2 reference against the Llama artifact."""
    from edgekit.models import load_torch_model
    from edgekit.verify import THRESHOLDS, compare, make_reference

    model, tok = load_torch_model(tiny_models["qwen2"])
    res = compare(make_reference(model, tok), open_artifact(artifacts[("llama", "fp32")]), THRESHOLDS["fp32"])
    assert not res["passed"] and any("top-1" in f for f in res["failures"])


def test_corrupt_artifact_detected(artifacts, tmp_path, cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifacts[("llama", "fp32")], bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    p = cli("verify", bad)
    assert p.returncode == 2
    assert "does not match its sha256" in p.stderr and p.stderr.count("\n") == 1
    ok = cli("verify", artifacts[("llama", "fp32")], "--json", check=0)
    assert json.loads(ok.stdout)["passed"] is True


def test_export_cli_rejects_unknown_precision(cli, tiny_models, tmp_path):
    p = cli("export", tiny_models["llama"], "--backend", "onnxruntime", "--precision", "q4_k_m", "-o", tmp_path / "x")
    assert p.returncode == 2 and "cannot export precision 'q4_k_m'" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.smollm2
def test_smollm2_fp32_export_gate(smollm2, tmp_path):
    meta = export_model(smollm2, tmp_path / "smol", ExportConfig(precision="fp32"))
    g = meta["gate"]
    assert g["passed"] and g["greedy_match"] and g["top1_agreement"] == 1.0 and g["max_abs_logit_delta"] < 1e-3
    assert meta["model"]["num_layers"] == 30 and meta["model"]["num_kv_heads"] == 3
