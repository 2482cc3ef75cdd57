"""KV-cache quantization (issue #14): llama.cpp's q8_0 K/V cache, asked for or chosen by the planner at long
contexts, served and gated as asked, counted by the planner, the roofline and the agent's pre-load check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from edgekit.plan import PlanRequest, make_plan, memory
from edgekit.precision import KV_CACHES, get_kv_cache
from edgekit.target import get_target

# Llama-3.2-3B's shape: at long contexts its f16 cache outweighs its 4-bit weights
LLAMA3B = {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
           "tie_word_embeddings": True, "max_position_embeddings": 131072}


def test_planner_quantizes_the_cache_before_the_weights():
    rpi = get_target("raspberry-pi-5")
    short = make_plan(LLAMA3B, rpi, PlanRequest(context=8192))
    assert (short.precision, short.kv_cache) == ("q4_k_m", None)  # the f16 cache fits: untouched
    long = make_plan(LLAMA3B, rpi, PlanRequest(context=32768))
    assert (long.precision, long.prune_ratio, long.kv_cache) == ("q4_k_m", 0.0, "q8_0")
    assert "q8_0 KV cache" in long.reason and long.chosen["total_bytes"] <= long.budget_bytes
    f16 = memory(LLAMA3B, "gguf", "q4_k_m", PlanRequest(context=32768))
    assert f16["total_bytes"] > long.budget_bytes  # what the default cache would have needed
    # 28 layers x 8 KV heads x 128 x 32768 tokens x (K, V), 34 bytes per 32 elements
    assert long.chosen["kv_cache_bytes"] == int(28 * 8 * 128 * 32768 * 2 * 34 / 32)
    pinned = make_plan(LLAMA3B, rpi, PlanRequest(context=32768, kv_cache="f16"))
    assert pinned.kv_cache == "f16" and pinned.prune_ratio > 0  # pinned: prune rather than touch the cache


def test_kv_cache_refusals_are_one_line(tiny_models, cli, tmp_path):
    with pytest.raises(EdgekitError, match="backend onnxruntime does not take a KV-cache type .*q8_0 is gguf's"):
        make_plan(LLAMA3B, get_target("x86-cpu"), PlanRequest(context=4096, kv_cache="q8_0"), backend="onnxruntime")
    with pytest.raises(EdgekitError, match="unknown KV-cache type 'q4'"):
        get_kv_cache("q4")
    p = cli("export", tiny_models["llama"], "-b", "onnxruntime", "--kv-cache", "q8_0", "-o", tmp_path / "a", check=2)
    assert "fix: drop --kv-cache, or use --backend gguf" in p.stderr and not (tmp_path / "a").exists()
    # the tiny models' head_dim is 16: q8_0 blocks of 32 cannot tile it (llama.cpp would refuse the context)
    p = cli("export", tiny_models["llama"], "-b", "gguf", "--kv-cache", "q8_0", "-o", tmp_path / "b", check=2)
    assert "head_dim 16 is not a multiple of 32" in p.stderr and not (tmp_path / "b").exists()
    p = cli("plan", tiny_models["llama"], "-t", "rpi5", "--kv-cache", "q8_0", check=2)
    assert "head_dim 16 is not a multiple of 32" in p.stderr


def test_q8_0_cache_is_served_and_gated(tmp_path):
    """A real llama.cpp context with a q8_0 K/V cache (flash attention): gated with q8_0's thresholds, and visibly
    not the f32 cache (its logits move)."""
    pytest.importorskip("llama_cpp")
    from edgekit.export import ExportConfig, export_model
    from edgekit.runtime import open_artifact
    from edgekit.testing import make_tiny_model
    from edgekit.verify import thresholds_for

    model = make_tiny_model("llama", tmp_path / "m", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=256)  # head_dim 32
    meta = export_model(model, tmp_path / "a", ExportConfig(backend="gguf", precision="f32", kv_cache="q8_0"),
                        log=lambda *_: None)
    assert meta["kv_cache"] == "q8_0"
    g = meta["gate"]
    assert g["passed"] and g["thresholds"] == json.loads(json.dumps(thresholds_for("q8_0").__dict__))
    # quantized K/V move logits (an f32 file with an f32 cache stays under 1e-4: test_gguf.py)
    assert 1e-3 < g["max_abs_logit_delta"] < 0.5
    runner = open_artifact(tmp_path / "a")
    assert runner.llm.context_params.type_k == 8 and runner.llm.context_params.type_v == 8
    import edgekit

    dry = edgekit.build(model, target="rpi5", kv_cache="q8_0", out=tmp_path / "b", dry_run=True)
    assert "with a q8_0 KV cache" in json.dumps(dry.to_dict())


def test_roofline_and_agent_count_the_cache_as_shipped(tmp_path):
    from edgekit.agent.jobs import estimate_memory_bytes
    from edgekit.exporters import get

    rt = get("gguf").memory
    assert rt.kv_element_bytes(False) == 4 and rt.kv_element_bytes(True) == 2
    assert rt.kv_element_bytes(True, "q8_0") == KV_CACHES["q8_0"].bytes_per_element == 34 / 32
    meta = {"backend": "gguf", "precision": "q4_k_m", "model": {"num_heads": 4, "num_layers": 2, "num_kv_heads": 2,
                                                                 "head_dim": 32, "hidden_size": 128}}
    est = {kv: estimate_memory_bytes({**meta, "kv_cache": kv}, tmp_path, 4096) for kv in ("f16", "q8_0")}
    assert est["f16"] - est["q8_0"] == int(2 * 2 * 32 * 4096 * 2 * (2 - 34 / 32))
