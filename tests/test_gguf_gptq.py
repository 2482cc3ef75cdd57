"""GGUF GPTQ on llama.cpp's grids (exporters/gguf_gptq.py): the block grids and codes edgekit reads back are exactly
what llama.cpp's own dequantizer gives for every block type it re-rounds, packing them back is the identity, and a
calibrated export rewrites the codes of every matrix but the tied embedding, keeps llama.cpp's types and scales, lowers
each layer's weighted rounding error and loads in the real llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.export import ExportConfig
from edgekit.testing import make_tiny_model

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

ALIGNED = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _quantized(tmp_path, precision, imatrix=True, **shape):
    from edgekit.exporters import gguf_imatrix
    from edgekit.exporters.gguf import plan, quantize, write_gguf

    src = make_tiny_model("llama", tmp_path / "m", seed=3, **shape)
    p = plan(json.loads((src / "config.json").read_text()), ExportConfig(backend="gguf", context_length=128))
    f32 = tmp_path / "f32.gguf"
    write_gguf(src, f32, p, "f32")
    im = gguf_imatrix.compute(src, p, tokens=4 * 64, seq_len=64) if imatrix else None
    out = tmp_path / f"{precision}.gguf"
    quantize(f32, out, precision, threads=2, imatrix=im)
    return src, p, out


@pytest.mark.parametrize("precision,shape", [("q4_k_m", ALIGNED), ("q4_k_m", {}), ("q4_0", {}), ("q5_k_m", {})])
def test_grids_and_codes_are_llama_cpps_blocks(tmp_path, precision, shape):
    from gguf.quants import dequantize

    from edgekit.exporters import gguf_gptq as G

    _, _, path = _quantized(tmp_path, precision, imatrix=False, **shape)
    seen = set()
    for t in gguf.GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if kind not in G.GRIDS or len(t.shape) != 2:
            continue
        seen.add(kind)
        blocks = np.array(G.GridFile._blocks(t))
        a, b = G.grid(kind, blocks)
        q = G.codes(kind, blocks)
        group, qmax = G.GRIDS[kind]
        assert 0 <= q.min() and q.max() <= qmax
        values = (q.reshape(-1, group) * a[:, None] + b[:, None]).reshape(-1)
        assert np.array_equal(values, dequantize(t.data, t.tensor_type).reshape(-1)), (t.name, kind)
        assert np.array_equal(G.pack(kind, blocks, q), blocks), (t.name, kind)
    assert seen, "no re-roundable block type in the file"


@pytest.mark.slow  # ~45 s on a busy 2-core host
def test_gptq_rewrites_codes_on_the_same_grids_and_lowers_layer_error(tmp_path):
    import torch

    from edgekit.exporters import gguf_gptq as G
    from edgekit.models import load_torch_model
    from edgekit.prune.calib import calibration_sequences

    src, p, path = _quantized(tmp_path, "q4_k_m", **ALIGNED)
    before = {t.name: (t.tensor_type.name, np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}
    gf0 = G.GridFile(path)
    grids = {n: gf0.grid(n)[:2] for n in before  # every matrix but the embedding (a lookup; this one is untied)
             if n != "token_embd.weight" and before[n][0] in G.GRIDS}
    gf0.close()
    info = G.calibrate(src, p, path, tokens=4 * 64, threads=2)
    after = {t.name: (t.tensor_type.name, np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}
    assert {n: k for n, (k, _) in before.items()} == {n: k for n, (k, _) in after.items()}
    changed = {n for n in before if not np.array_equal(before[n][1], after[n][1])}
    assert changed == set(grids) and info["tensors"] == len(grids) == 15
    gf = G.GridFile(path)
    for n, (a, b) in grids.items():  # scales and minimums are llama.cpp's, untouched
        a2, b2, _, _ = gf.grid(n)
        assert np.array_equal(a, a2) and np.array_equal(b, b2), n
    # layer 0's v projection: GPTQ's rounding moves its outputs less than llama.cpp's, on the calibration inputs
    from gguf.quants import dequantize

    model, tok = load_torch_model(src)
    seqs = calibration_sequences(tok, None, 64, 4)
    seen = {}
    mod = model.model.layers[0].self_attn.v_proj
    h = mod.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(torch.stack(seqs))
    h.remove()
    x, w = seen["x"].double(), mod.weight.detach().double()
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    t = reader["blk.0.attn_v.weight"]

    def err(data):
        wq = torch.from_numpy(dequantize(data, t.tensor_type).reshape(w.shape).astype(np.float64))
        return float(((x @ (w - wq).T) ** 2).sum())

    assert err(after["blk.0.attn_v.weight"][1]) < err(before["blk.0.attn_v.weight"][1])


@pytest.mark.slow
def test_calibrated_export_records_its_rounding_and_runs_in_llama_cpp(tmp_path):
    from edgekit.export import export_model
    from edgekit.runtime import open_artifact

    src = make_tiny_model("llama", tmp_path / "m", seed=6, **ALIGNED)
    meta = export_model(src, tmp_path / "a", ExportConfig(backend="gguf", precision="q4_k_m",
                                                          accept_gate_failure=True), log=lambda *a: None)
    assert meta["rounding"]["tensors"] == 15 and meta["rounding"]["tokens"] > 0  # GPTQ is the default
    assert meta["gate"]["top1_agreement"] > 0.3
    logits = open_artifact(tmp_path / "a").forward(np.arange(1, 9))
    assert logits.shape[0] == 8 and np.isfinite(logits).all()
    plain = export_model(src, tmp_path / "b", ExportConfig(backend="gguf", precision="q4_k_m", calibrate=False,
                                                           accept_gate_failure=True), log=lambda *a: None)
    assert plain["rounding"] == "llama.cpp nearest" and plain["imatrix"] is None
    fast = export_model(src, tmp_path / "c", ExportConfig(backend="gguf", precision="q4_k_m", gptq=False,
                                                          accept_gate_failure=True), log=lambda *a: None)
    assert fast["rounding"] == "llama.cpp, imatrix-weighted" and fast["imatrix"] is not None


@pytest.mark.parametrize("kw,needle", [
    ({"backend": "onnxruntime", "precision": "int4"}, "--gptq re-rounds GGUF's 4- and 5-bit blocks, not onnxruntime"),
    ({"backend": "gguf", "precision": "q8_0"}, "not gguf q8_0"),
    ({"backend": "gguf", "precision": "Q4_K_M", "calibrate": False}, "which --no-calibrate turns off"),
])
def test_gptq_is_refused_where_it_cannot_apply(kw, needle, tiny_models, tmp_path):
    import edgekit
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match=needle):
        edgekit.export(tiny_models["llama"], out=tmp_path / "a", gptq=True, **kw)
    assert not (tmp_path / "a").exists()


def test_export_cli_refuses_gptq_on_another_backend(cli, tiny_models, tmp_path):
    p = cli("export", tiny_models["llama"], "-b", "onnxruntime", "-p", "int4", "--gptq", "-o", tmp_path / "a",
            check=2)
    assert "--gptq re-rounds GGUF's" in p.stderr and "fix:" in p.stderr and not (tmp_path / "a").exists()
