"""The Python API: edgekit.build / prune / export / bench return typed frozen results, raise EdgekitError, stay quiet,
cost nothing at import, and are what the CLI runs (its --json is the result's to_dict())."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import edgekit
from edgekit.errors import EdgekitError

from conftest import ROOT, cli_env


def test_import_is_cheap_silent_and_the_verbs_are_callable():
    """`python -W error -c "import edgekit; edgekit.build"` prints nothing and imports no torch or runtime, and
    edgekit.prune / edgekit.export stay callable after their submodules are imported."""
    code = ("import sys, edgekit; edgekit.build; edgekit.bench; edgekit.prune; edgekit.export; edgekit.BuildResult\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp', 'executorch', 'optimum', "
            "'rich') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import edgekit.prune, edgekit.export\n"
            "from edgekit.prune import PruneConfig\n"
            "from edgekit.export import ExportConfig\n"
            "assert callable(edgekit.prune) and callable(edgekit.export) and callable(edgekit.build)\n"
            "import inspect\n"
            "assert 'ratio' in inspect.signature(edgekit.prune).parameters\n"
            "assert 'backend' in inspect.signature(edgekit.export).parameters\n")
    p = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=cli_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""


def test_build_returns_a_gated_artifact_quietly(tiny_models, tmp_path, capfd):
    out = tmp_path / "b"
    capfd.readouterr()
    res = edgekit.build(tiny_models["llama"], target="x86", backend="onnxruntime", precision="F32", out=str(out),
                        context=128, bench=False)
    printed = capfd.readouterr()
    assert isinstance(res, edgekit.BuildResult)
    assert res.out_dir == out and res.backend == "onnxruntime" and res.precision == "fp32"  # aliases resolved
    assert res.artifact.is_dir() and (res.artifact / "artifact.json").is_file()
    assert res.passed and res.gate.passed and not res.gate.overridden and res.gate.top1_agreement == 1.0
    assert res.gate.max_abs_logit_delta <= 1e-3 and res.bench is None and res.report.is_file()
    assert res.to_dict() == json.loads((out / "manifest.json").read_text())
    assert res.manifest["stages"]["bench"]["status"] == "passed-through"
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.backend = "gguf"
    # quiet by default: none of the CLI's stage log, progress or spinner, and no library notices either
    assert printed.out == "" and printed.err == "", printed


def test_build_dry_run_equals_the_cli_json_and_takes_options(cli, tiny_models, tmp_path):
    m, out = tiny_models["llama"], tmp_path / "d"
    plan = edgekit.build(m, target="raspberry-pi-5", out=out, context=128, dry_run=True)
    assert isinstance(plan, edgekit.BuildPlan) and not out.exists()
    shown = json.loads(cli("build", m, "-t", "raspberry-pi-5", "-o", out, "--context", "128", "--dry-run", "--json",
                           check=0).stdout)
    assert shown == plan.to_dict()
    assert [s.stage for s in plan.stages] == [s["stage"] for s in shown["stages"]]
    # a typed options object, and keywords that override it
    opts = edgekit.BuildOptions(precision="q8_0", context_length=128)
    assert edgekit.build(m, target="rpi5", out=out, options=opts, dry_run=True).precision == "q8_0"
    over = edgekit.build(m, target="rpi5", out=out, options=opts, precision="Q4_K_M", dry_run=True)
    assert over.precision == "q4_k_m" and over.context_length == 128


def test_prune_returns_widths_that_from_pretrained_reloads(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = edgekit.PruneConfig(edgekit.Budget(ratio=0.3), num_samples=4)  # the typed config instead of keywords
    res = edgekit.prune(tiny_models["llama"], out=tmp_path / "p", config=cfg)
    assert isinstance(res, edgekit.PruneResult) and res.uniform
    assert res.params_after < res.params_before and abs(res.removed_fraction - 0.3) < 0.05
    m = AutoModelForCausalLM.from_pretrained(res.out_dir)
    c = m.config
    assert c.hidden_size == res.hidden_size and len(res.widths) == c.num_hidden_layers
    for w in res.widths:
        assert (w.intermediate_size, w.num_attention_heads, w.num_key_value_heads) == (
            c.intermediate_size, c.num_attention_heads, c.num_key_value_heads)
    assert sum(p.numel() for p in m.parameters()) == res.params_after
    assert res.to_dict() == json.loads((res.out_dir / "edgekit-prune.json").read_text())


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "art"
    return edgekit.export(tiny_models["qwen2"], backend="onnxruntime", out=out, context=128)


def test_export_returns_a_gated_artifact(exported):
    res = exported
    assert isinstance(res, edgekit.ExportResult) and res.backend == "onnxruntime" and res.precision == "fp32"
    assert res.gate.passed and res.gate.greedy_match and res.gate.failures == () and res.max_context == 128
    assert res.to_dict() == json.loads((res.artifact / "artifact.json").read_text())
    assert all((res.artifact / f).is_file() for f in res.files)


def test_bench_measures_with_the_real_runtime(exported, tmp_path):
    res = edgekit.bench(exported.artifact, prompt_tokens=[16, 32], new_tokens=8, repetitions=2, warmup=0,
                        seconds=0.1, out=tmp_path / "o", reference=exported.artifact / "reference.npz")
    assert isinstance(res, edgekit.BenchResult) and res.backend == "onnxruntime" and res.valid
    assert [(p.prompt_tokens, p.new_tokens) for p in res.points] == [(16, 8), (32, 8)]
    for p in res.points:
        assert p.runs >= 2 and p.decode_tokens_per_s > 0 and p.prefill_tokens_per_s > 0
        assert p.decode_tokens_per_s_sd >= 0 and 0 < p.decode_p50_ms <= p.decode_p99_ms
    assert res.peak_rss_mb > 10 and res.size_bytes > 0 and res.gate.passed
    assert res.decode_tokens_per_s == res.points[0].decode_tokens_per_s
    assert json.loads((tmp_path / "o" / "bench.json").read_text()) == res.to_dict()
    assert (tmp_path / "o" / "bench.csv").read_text() == res.to_csv()
    assert res.to_csv().splitlines()[0].startswith("model,backend,precision")


def test_bad_inputs_raise_edgekit_errors_and_write_nothing(tiny_models, tmp_path):
    m = tiny_models["llama"]
    with pytest.raises(EdgekitError, match="unknown target 'pdp-11'"):
        edgekit.build(m, target="pdp-11", out=tmp_path / "b")
    with pytest.raises(EdgekitError, match="q4_k_m"):
        edgekit.export(m, backend="onnxruntime", precision="q4_k_m", out=tmp_path / "e")
    with pytest.raises(EdgekitError, match="--ratio 1.5"):
        edgekit.prune(m, out=tmp_path / "p", ratio=1.5)
    with pytest.raises(EdgekitError, match="context 99999 exceeds"):
        edgekit.export(m, backend="onnxruntime", out=tmp_path / "e", context=99999)
    with pytest.raises(EdgekitError, match="not a comma list"):
        edgekit.bench(tmp_path, prompt_tokens="many")
    assert list(tmp_path.iterdir()) == []


def _fake(name, result):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    return fake, calls


@pytest.mark.parametrize("command", ["build", "prune", "export", "bench"])
def test_the_cli_runs_the_api_and_prints_its_result(command, monkeypatch, capsys, tmp_path):
    """Each command calls edgekit.api.VERB with its flags as keywords and prints the result's to_dict() as --json."""
    import edgekit.api
    from edgekit.api import results as r
    from edgekit.cli import main

    gate = {"passed": True, "overridden": False, "max_abs_logit_delta": 1e-6, "top1_agreement": 1.0, "mean_kl": 0.0,
            "greedy_match": True, "failures": []}
    point = {"prompt_tokens": 16, "new_tokens": 8, "runs": 3, "duration_s": 0.5, "valid": True, "invalid_reason": None,
             "prefill_tokens_per_s": 900.0, "prefill_tokens_per_s_sd": 5.0, "decode_tokens_per_s": 300.0,
             "decode_tokens_per_s_sd": 2.0, "ttft_ms": {"p50": 1.0}, "decode_latency_ms": {"p50": 3, "p90": 4,
                                                                                       "p99": 5}}
    result, argv, expect = {
        "build": (r.BuildResult.from_manifest(tmp_path / "b", {
            "resolved": {"backend": "onnxruntime", "precision": "fp32", "context_length": 128}, "artifact": "a",
            "stages": {"verify": {"status": "done", "result": gate}}}),
            ["build", "m", "-t", "x86-cpu", "-o", tmp_path / "b", "--prune-ratio", "0.3", "--no-bench", "--context",
             "128"], {"target": "x86-cpu", "prune_ratio": 0.3, "bench": False, "context": 128, "dry_run": False}),
        "prune": (r.PruneResult.from_report(tmp_path / "p", {
            "arch": "llama", "uniform": True, "params_before": 100, "params_after": 70, "removed_fraction": 0.3,
            "hidden_size": {"before": 64, "after": 56}, "layers": [{"intermediate": [128, 96], "heads": [4, 4],
                                                                    "kv_heads": [2, 2]}],
            "dense_search_loss": 5.0, "pruned_search_loss": 5.5}),
            ["prune", "m", "--ratio", "0.3", "--protect", "0", "--non-uniform", "-o", tmp_path / "p"],
            {"ratio": 0.3, "protect": "0", "non_uniform": True, "reconstruct": True}),
        "export": (r.ExportResult.from_meta(tmp_path / "e", {"backend": "gguf", "precision": "q8_0",
                                                              "max_context": 128, "files": {}, "gate": gate}),
                   ["export", "m", "-b", "gguf", "-p", "Q8_0", "-o", tmp_path / "e", "--no-calibrate"],
                   {"backend": "gguf", "precision": "Q8_0", "calibrate": False}),
        "bench": (r.BenchResult.from_report({"model": "a", "backend": "onnxruntime", "precision": "fp32",
                                              "valid": True, "load_s": 0.1, "peak_rss_mb": 50.0,
                                              "config": {"threads": None}, "results": [point]}),
                  ["bench", tmp_path / "a", "-p", "16", "-n", "8", "-r", "3"],
                  {"prompt_tokens": "16", "new_tokens": "8", "repetitions": 3}),
    }[command]
    fake, calls = _fake(command, result)
    monkeypatch.setattr(edgekit.api, command, fake)
    assert main([str(x) for x in argv] + ["--json"]) == 0
    [(args, kwargs)] = calls
    assert {k: kwargs[k] for k in expect} == expect and kwargs["verbose"] is True
    assert json.loads(capsys.readouterr().out) == result.to_dict()
