"""The precision registry and the backend contract: one vocabulary, and the planner choosing only what a backend
builds (it once chose TensorRT int8 for a 3B Llama on a Jetson, and the export failed after every other stage ran)."""

from __future__ import annotations

import json

import pytest

from edgekit.errors import EdgekitError
from edgekit.exporters import REGISTRY
from edgekit.precision import PRECISIONS, backends_for, get_precision

# Shapes the planner meets: a tiny model, SmolLM2-135M, Qwen2.5-0.5B (untied), Llama-3.2-3B, a Gemma 3 (sliding).
CONFIGS = {
    "tiny": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": 4096, "tie_word_embeddings": True},
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                     "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "llama-3.2-3b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "intermediate_size": 8192,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True},
    "gemma3-1b": {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "num_hidden_layers": 26,
                  "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 6912,
                  "max_position_embeddings": 32768, "sliding_window": 512},
}


def test_every_declared_precision_is_registered_and_every_precision_has_a_backend():
    for spec in REGISTRY.values():
        assert spec.precisions, spec.name
        for p in spec.precisions:
            assert p in PRECISIONS, f"{spec.name} declares {p!r}, which the precision registry lacks"
        assert spec.precision(None) == spec.precisions[0]
    for name in PRECISIONS:
        assert backends_for(name), f"no backend lowers {name}"


@pytest.mark.parametrize("alias,name", [("F32", "fp32"), ("float32", "fp32"), ("f16", "fp16"), ("FP16", "fp16"),
                                        ("Q4_K_M", "q4_k_m"), (" q8_0 ", "q8_0"), ("INT8", "int8"), ("8DA4W", "8da4w")])
def test_names_are_case_insensitive_with_peer_tool_aliases(alias, name):
    assert get_precision(alias).name == name


def test_unknown_precision_and_a_backend_that_lacks_one_are_one_line_errors():
    with pytest.raises(EdgekitError, match="unknown precision 'q3_xs'; known: fp32") as e:
        get_precision("q3_xs")
    assert "case does not matter" in e.value.fix
    with pytest.raises(EdgekitError, match="backend gguf cannot produce precision 'int8'; int8 is built by "
                                           "onnxruntime"):
        REGISTRY["gguf"].precision("int8")
    with pytest.raises(EdgekitError, match="TensorRT int8 needs a calibrated"):
        REGISTRY["tensorrt"].precision("INT8")


def test_gate_and_planner_tables_derive_from_the_registry():
    from edgekit.plan import PlanRequest, memory
    from edgekit.verify import THRESHOLDS, thresholds_for

    assert set(THRESHOLDS) == set(PRECISIONS)
    assert thresholds_for("F16") is PRECISIONS["fp16"].gate
    req = PlanRequest(context=512)
    cfg = CONFIGS["smollm2-135m"]
    w = {p: memory(cfg, "tensorrt", p, req)["weights_bytes"] for p in REGISTRY["tensorrt"].precisions}
    assert w["fp32"] / w["fp16"] == pytest.approx(
        PRECISIONS["fp32"].bytes_per_weight / PRECISIONS["fp16"].bytes_per_weight, rel=1e-6)
    # GGUF counts its own bytes per tensor type (exporters/gguf_types.py, held to real files by test_gguf_types.py)
    g = {p: memory(cfg, "gguf", p, req)["weights_bytes"] for p in REGISTRY["gguf"].precisions}
    assert g["fp32"] > g["fp16"] > g["q8_0"] > g["q5_k_m"] > g["q4_k_m"] > g["q4_0"]
    # llama.cpp runs unquantized weights with an f32 cache, quantized ones with f16: the registry says which is which
    kv = {p: memory(cfg, "gguf", p, req)["kv_cache_bytes"] for p in ("fp16", "q8_0")}
    assert kv["fp16"] == 2 * kv["q8_0"]


def test_planner_chooses_only_what_the_backend_builds_on_every_target_and_shape():
    """Every target x backend x model shape x context x speed goal: the chosen precision is one its backend declares
    and the export config resolves (no stage after the plan can refuse it)."""
    from edgekit.export import ExportConfig
    from edgekit.plan import PlanRequest, make_plan
    from edgekit.target import builtin_targets

    seen = set()
    for target in builtin_targets().values():
        for backend in REGISTRY:
            for cfg in CONFIGS.values():
                for ctx in (256, 2048):
                    for tps in (None, 20.0):
                        try:
                            plan = make_plan(cfg, target, PlanRequest(context=ctx, min_decode_tps=tps), backend)
                        except EdgekitError as e:
                            assert "cannot" in str(e), e  # an honest "cannot hold/decode", never a crash
                            continue
                        assert plan.precision in REGISTRY[backend].precisions, (target.name, backend, plan)
                        ExportConfig(backend=backend, precision=plan.precision).resolved()
                        seen.add((target.name, backend, plan.precision))
    # the 3B Llama on the Orin Nano: fp16 (with pruning if needed), never the int8 TensorRT cannot build here
    orin = make_plan(CONFIGS["llama-3.2-3b"], builtin_targets()["jetson-orin-nano-8gb"], PlanRequest(context=2048))
    assert orin.backend == "tensorrt" and orin.precision == "fp16"
    assert {p for t, b, p in seen if b == "gguf"} >= {"fp16", "q4_k_m"}


def test_plan_and_build_agree_on_a_backend_outside_the_target_and_on_aliases(cli, tiny_models, tmp_path):
    """`plan -t x86 -b gguf` chose f32 while `build -b gguf` refused 'fp32'; `plan -t rpi5 -p int8` said it fits.
    (x86-cpu builds GGUF itself now: jetson-orin is the target whose backend list lacks it.)"""
    m = tiny_models["llama"]
    plan = json.loads(cli("plan", m, "-t", "jetson-orin", "-b", "gguf", "--context", "128", "--json").stdout)
    assert plan["precision"] == "fp32"
    dry = cli("build", m, "-t", "jetson-orin", "-b", "gguf", "--context", "128", "--dry-run", "--json",
              "-o", tmp_path / "b")
    assert json.loads(dry.stdout)["resolved"]["precision"] == "fp32"
    dry = cli("build", m, "-t", "raspberry-pi-5", "-p", "Q8_0", "--context", "128", "--dry-run", "--json",
              "-o", tmp_path / "c")
    assert json.loads(dry.stdout)["resolved"]["precision"] == "q8_0"
    for argv in (("plan", m, "-t", "raspberry-pi-5", "-p", "int8", "--context", "128"),
                 ("build", m, "-t", "raspberry-pi-5", "-p", "int8", "--dry-run", "-o", tmp_path / "d")):
        p = cli(*argv, check=2)
        assert p.stderr.strip() == ("edgekit: error: backend gguf cannot produce precision 'int8'; int8 is built by "
                                    "onnxruntime (fix: use --precision with one of fp32, fp16, q8_0, q5_k_m, q4_k_m, q4_0)")
    assert not (tmp_path / "d").exists()


def test_a_target_profile_may_spell_precisions_as_peer_tools_do(tmp_path):
    from pathlib import Path

    from edgekit.target import load_target_file

    text = (Path(__file__).parents[1] / "targets" / "raspberry-pi-5-8gb.toml").read_text()
    text = text.replace('precisions = ["q4_k_m", "q8_0", "fp16", "fp32"]',
                                    'precisions = ["Q4_K_M", "Q8_0", "F16", "f32"]').replace(
        'precision = "q4_k_m"', 'precision = "Q4_K_M"')
    (tmp_path / "pi.toml").write_text(text)
    t = load_target_file(tmp_path / "pi.toml")
    assert t.build.precisions == ("q4_k_m", "q8_0", "fp16", "fp32") and t.build.precision == "q4_k_m"
    (tmp_path / "bad.toml").write_text(text.replace('"Q8_0"', '"q3_xs"'))
    with pytest.raises(EdgekitError, match=r"build precision\(s\) \['q3_xs'\] unknown"):
        load_target_file(tmp_path / "bad.toml")


@pytest.mark.parametrize("backend,precision", [(b, p) for b, s in REGISTRY.items() for p in s.precisions])
def test_every_backend_exports_every_precision_it_declares(declared_artifact, backend, precision):
    """The contract, exercised: each declared (backend, precision) converts on a tiny model, runs in its real runtime
    (TensorRT: the source graph in ONNX Runtime, as its gate does on the host) and records the canonical name.
    Unquantized precisions must pass their gate; a quantized gate on random weights is recorded, not required."""
    from dataclasses import asdict

    from edgekit.runtime import read_artifact

    out, meta = declared_artifact(backend, precision)
    assert meta["precision"] == precision and meta["backend"] == backend
    assert read_artifact(out)["files"] == meta["files"]
    gate = meta["gate"]
    assert gate["positions"] == 64 and 0 <= gate["top1_agreement"] <= 1 and gate["mean_kl"] >= 0
    assert gate["thresholds"] == asdict(get_precision(precision).gate)
    if not get_precision(precision).quantized:
        assert gate["passed"], gate["failures"]
    else:
        assert gate["top1_agreement"] > 0.3, gate  # quantized, yet still the same model
