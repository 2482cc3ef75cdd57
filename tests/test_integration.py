"""Across issues: pruned models through every exporter that can take them, and the whole build P -> KD -> Q."""

import json

import pytest

from edgekit.errors import EdgekitError
from edgekit.export import ExportConfig, export_model
from edgekit.prune import Budget, PruneConfig, prune_model


@pytest.fixture(scope="module")
def non_uniform(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("nu") / "llama"
    prune_model(tiny_models["llama"], out, PruneConfig(Budget(ratio=0.3), non_uniform=True, align=8, hidden_keep=1.0,
                                                       num_samples=8, seq_len=64), log=lambda m: None)
    return out


def test_non_uniform_prune_exports_as_deci_and_passes_the_gguf_gate(non_uniform, tmp_path):
    widths = json.loads((non_uniform / "config.json").read_text())["edgekit_layer_widths"]
    assert len({(w["intermediate_size"], w["num_attention_heads"]) for w in widths}) > 1  # really non-uniform
    meta = export_model(non_uniform, tmp_path / "g", ExportConfig(backend="gguf", precision="f32"))
    assert meta["gate"]["passed"] and meta["gate"]["greedy_match"]
    assert meta["model"]["layer_widths"] == widths
    assert meta.get("gguf_arch", meta.get("arch")) == "deci" or "deci" in json.dumps(meta)


@pytest.mark.smollm2
@pytest.mark.slow  # 109 s: the tiny-model Deci tests cover the path in the default run; this is the real-checkpoint check
def test_smollm2_non_uniform_prune_to_deci_q8_0(smollm2, tmp_path):
    """The real model, 25% removed with per-layer widths aligned to 32 (so q8_0 holds every row): the refit lowers
    the calibration loss of the cut, and llama.cpp's deci arch runs it within the q8_0 gate."""
    rep = prune_model(smollm2, tmp_path / "p", PruneConfig(Budget(ratio=0.25), non_uniform=True, align=32,
                                                           num_samples=8, seq_len=128, search_samples=2),
                      log=lambda m: None)
    widths = json.loads((tmp_path / "p" / "config.json").read_text())["edgekit_layer_widths"]
    inter = [w["intermediate_size"] for w in widths]
    assert len(set(inter)) > 3 and all(i % 32 == 0 for i in inter) and max(inter) <= 1536
    assert abs(rep["removed_fraction"] - 0.25) < 0.01
    assert rep["pruned_search_loss"] < rep["cut_search_loss"], rep
    meta = export_model(tmp_path / "p", tmp_path / "g", ExportConfig(backend="gguf", precision="q8_0"))
    assert meta["gate"]["passed"] and meta["model"]["layer_widths"] == widths


def test_non_uniform_into_onnx_is_a_clear_error(non_uniform, tmp_path):
    with pytest.raises(EdgekitError) as e:
        export_model(non_uniform, tmp_path / "o", ExportConfig(backend="onnxruntime", precision="fp32"))
    assert "per-layer widths" in str(e.value) and "gguf" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_build_prunes_distills_then_exports(cli, tiny_models, tmp_path):
    out = tmp_path / "b"
    m = json.loads(cli("build", "--target", "x86-cpu", "-b", "onnxruntime", tiny_models["llama"], "-o", out,
                       "--prune-ratio", "0.25",
                       "--distill-steps", "4", "--precision", "int8", "--bench-seconds", "0.3", "--json",
                       check=0).stdout)
    st = m["stages"]
    assert st["prune"]["status"] == "done" and st["distill"]["status"] == "done"
    assert st["export"]["result"]["gate"]["passed"] and st["export"]["result"]["precision"] == "int8"
    rep = json.loads((out / "report.json").read_text())
    before = rep["layer_widths"]["before"][0]["intermediate_size"]
    after = rep["layer_widths"]["after"][0]["intermediate_size"]
    assert after < before
    ppl = st["distill"]["result"]["heldout_perplexity"]  # the pruning cost and its recovery, in the report's words
    assert f"{ppl['teacher']:.2f} / {ppl['before']:.2f} / {ppl['after']:.2f}" in (out / "report.md").read_text()


def test_non_uniform_into_executorch(non_uniform, tmp_path):
    """ExecuTorch either runs per-layer widths through its gate or refuses them with a clear error."""
    try:
        meta = export_model(non_uniform, tmp_path / "e", ExportConfig(backend="executorch", precision="fp32",
                                                                      context_length=128))
    except EdgekitError as e:
        assert "width" in str(e) and "fix:" in str(e)
        assert not (tmp_path / "e").exists()
    else:
        assert meta["gate"]["passed"] and meta["gate"]["greedy_match"]


@pytest.mark.parametrize("backend,precision", [("onnxruntime", "fp32"), ("gguf", "f32")])
def test_last_logits_mode_matches_full_logits(tiny_models, tmp_path, backend, precision):
    """Benchmarks open runners with all_logits=False (no context x vocab buffer); the last row must be identical."""
    import numpy as np

    from edgekit.runtime import open_artifact

    export_model(tiny_models["qwen2"], tmp_path / "a", ExportConfig(backend=backend, precision=precision),
                 log=lambda m: None)
    full, last = open_artifact(tmp_path / "a"), open_artifact(tmp_path / "a", all_logits=False)
    ids = np.arange(1, 40, dtype=np.int64)
    a, b = full.forward(ids), last.forward(ids)
    assert b.shape == (1, a.shape[1])
    np.testing.assert_allclose(b, a[-1:], atol=1e-5)
    np.testing.assert_allclose(last.forward(ids[:1]), full.forward(ids[:1]), atol=1e-5)
