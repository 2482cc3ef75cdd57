"""GGUF calibrated quantization: edgekit's importance matrix (mean squared input activation per column, from the
calibration text) is named and sized as the GGUF tensors it weighs for every family, uniform and per-layer widths,
reaches llama.cpp's quantizer (the file changes), and q4_0 / q5_k_m export through the real llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.arch import FAMILIES
from edgekit.export import ExportConfig, export_model
from edgekit.testing import make_tiny_model

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

FAMS = sorted(FAMILIES)
ALIGNED = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def quiet(*a, **k):
    pass


def _export(src, out, precision, **kw):
    return export_model(Path(src), Path(out), ExportConfig(backend="gguf", precision=precision,
                                                           accept_gate_failure=True, **kw), log=quiet)


@pytest.fixture(scope="module")
def fam_models(tmp_path_factory):
    """{family: (dense folder, per-layer-widths folder)}: the per-layer one is where GGUF splits, pads or uses deci."""
    from edgekit.prune import PruneConfig, prune_model
    from edgekit.prune.config import Budget

    root = tmp_path_factory.mktemp("imatrix-fams")
    out = {}
    for i, f in enumerate(FAMS):
        dense = make_tiny_model(f, root / f, seed=i, quirks=True)
        nu = root / f"{f}-nu"  # layer 0 kept dense, so the widths really differ per layer
        prune_model(dense, nu, PruneConfig(budget=Budget(ratio=0.2), num_samples=4, search_samples=2, seq_len=64,
                                           align=8, non_uniform=True, protected_layers=(0,)), log=quiet)
        out[f] = (dense, nu)
    return out


def _matmul_weights(path: Path) -> dict[str, int]:
    """GGUF name -> row width (ne[0]) of every matrix llama.cpp multiplies activations by, read from the file."""
    r = gguf.GGUFReader(str(path))
    names = {t.name: int(t.shape[0]) for t in r.tensors if len(t.shape) == 2}
    if "output.weight" not in names:  # tied: the embedding is the output matrix
        return names
    return {n: w for n, w in names.items() if n != "token_embd.weight"}


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("shape", ["dense", "per-layer"])
def test_imatrix_names_and_lengths_match_the_gguf_tensors(fam_models, tmp_path, family, shape):
    from edgekit.errors import EdgekitError
    from edgekit.exporters import gguf_imatrix
    from edgekit.exporters.gguf import plan, write_gguf

    src = fam_models[family][shape == "per-layer"]
    config = json.loads((src / "config.json").read_text())
    try:
        p = plan(config, ExportConfig(backend="gguf", context_length=128))
    except EdgekitError as e:  # Phi-4-mini with its hidden width cut: no llama.cpp arch holds it (test_families)
        assert "heads x head_dim == hidden" in str(e)
        return
    f32 = tmp_path / "f32.gguf"
    write_gguf(src, f32, p, "f32")
    im = gguf_imatrix.compute(src, p, tokens=2 * 64, seq_len=64)
    want = _matmul_weights(f32)
    assert {n: v.size for n, v in im.vectors.items()} == want
    assert im.tokens == 128 and all(np.isfinite(v).all() and (v >= 0).all() and v.max() > 0
                                    for v in im.vectors.values())
    # q, k and v (split or fused) multiply one input, so they share one vector
    if "blk.0.attn_k.weight" in im.vectors:
        assert np.array_equal(im.vectors["blk.0.attn_q.weight"], im.vectors["blk.0.attn_k.weight"])


def test_imatrix_is_the_mean_squared_input_of_each_linear(tmp_path):
    """Against a direct computation: the MLP down projection's input is act(gate(x)) * up(x) of the normed stream."""
    import torch

    from edgekit.exporters.gguf_imatrix import activation_stats
    from edgekit.models import load_torch_model

    model, _ = load_torch_model(make_tiny_model("llama", tmp_path / "m", seed=1))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    stats, n = activation_stats(model, list(ids))
    seen = {}
    mlp = model.model.layers[1].mlp
    h = mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))  # returns None: output kept
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    h.remove()
    direct = (seen["x"].double() ** 2).reshape(-1, seen["x"].shape[-1]).mean(0).numpy()
    assert n == 32 and np.allclose(stats["model.layers.1.mlp.down_proj.weight"], direct, rtol=1e-5)
    assert stats["lm_head.weight"].size == model.config.hidden_size


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantizing_with_the_imatrix_changes_the_file(tmp_path, arch):
    """Same f32 file, with and without the importance matrix: llama.cpp reads every entry (its log names none it
    missed) and rounds differently, so the quantized blocks differ while the type mix stays the same."""
    from edgekit.exporters import gguf_imatrix
    from edgekit.exporters.gguf import plan, quantize, write_gguf

    src = make_tiny_model(arch, tmp_path / "m", seed=4, **ALIGNED)
    p = plan(json.loads((src / "config.json").read_text()), ExportConfig(backend="gguf", context_length=128))
    f32 = tmp_path / "f32.gguf"
    write_gguf(src, f32, p, "f32")
    im = gguf_imatrix.compute(src, p, tokens=4 * 64, seq_len=64)
    files = {}
    for name, imatrix in (("rtn", None), ("imatrix", im)):
        files[name] = tmp_path / f"{name}.gguf"
        log = quantize(f32, files[name], "q4_k_m", threads=2, imatrix=imatrix)
        if imatrix:
            assert f"have importance matrix data with {len(im.vectors)} entries" in log
            missed = {ln.split()[-1] for ln in log.splitlines() if "did not find weights" in ln}
            assert missed <= {"token_embd.weight"} - set(im.vectors), missed  # an untied embedding is a lookup
            assert "different from tensor size" not in log
    a, b = ({t.name: t for t in gguf.GGUFReader(str(files[k])).tensors} for k in ("rtn", "imatrix"))
    assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}
    changed = [n for n in a if n.startswith("blk.") and not np.array_equal(a[n].data, b[n].data)]
    assert len(changed) >= 14, changed  # every matrix of both layers


@pytest.mark.parametrize("precision,types", [("q4_0", {"Q4_0"}), ("q5_k_m", {"Q5_K", "Q6_K"})])
def test_q4_0_and_q5_k_m_export_with_their_types(tmp_path, precision, types):
    src = make_tiny_model("llama", tmp_path / "m", seed=5, **ALIGNED)
    meta = _export(src, tmp_path / "a", precision)
    assert types <= set(meta["tensor_types"]), meta["tensor_types"]
    assert meta["imatrix"]["tensors"] == 15 and meta["imatrix"]["tokens"] > 0
    assert meta["gate"]["top1_agreement"] > 0.3
    if precision == "q5_k_m":
        assert meta["k_quant_fallbacks"] == []
    plain = _export(src, tmp_path / "b", precision, calibrate=False)
    assert plain["imatrix"] is None
    assert (tmp_path / "a" / "model.gguf").read_bytes() != (tmp_path / "b" / "model.gguf").read_bytes()


def test_calibration_text_is_the_users_and_a_missing_one_is_one_line(tmp_path, cli):
    src = make_tiny_model("llama", tmp_path / "m", seed=7)
    text = tmp_path / "notes.txt"
    text.write_text("def f(x):\n    return x * 2\n\n" * 400)
    meta = _export(src, tmp_path / "a", "q4_0", calibration=text)
    assert meta["imatrix"]["text"] == str(text) and meta["imatrix"]["tokens"] > 0
    r = cli("export", src, "--backend", "gguf", "-p", "q4_0", "--calibration", tmp_path / "nope.txt",
            "-o", tmp_path / "b")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"edgekit: error: calibration text not found: {tmp_path / 'nope.txt'} (fix: pass a .txt or .jsonl file or "
        "a folder of them to --calibration)"]
    assert not (tmp_path / "b").exists()
