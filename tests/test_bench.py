import json

import pytest

from edgekit.export import ExportConfig, export_model
from edgekit.runtime.bench import BenchConfig, bench_artifact, percentiles


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "art"
    export_model(tiny_models["llama"], out, ExportConfig(precision="fp32"))
    return out


def test_percentiles_are_ordered():
    p = percentiles([float(x) for x in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p50"] <= p["p90"] <= p["p99"] and p["n"] == 100


def test_bench_reports_every_metric(artifact):
    r = bench_artifact(artifact, BenchConfig(prompt_tokens=32, new_tokens=8, min_runs=3, min_seconds=0.5))
    assert r["valid"] and r["runs"] >= 3 and r["duration_s"] >= 0.5
    assert r["load_s"] > 0 and r["ttft_ms"]["p50"] > 0
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    lat = r["decode_latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["n"] == 8 * r["runs"]
    assert 20 < r["peak_rss_mb"] < 4000 and r["memory_timeline"] and r["swap_growth_mb"] >= 0


def test_bench_flags_invalid_when_minimums_unmet(artifact):
    r = bench_artifact(artifact, BenchConfig(prompt_tokens=8, new_tokens=2, min_runs=10**6, min_seconds=0.2,
                                             max_seconds=0.5))
    assert r["valid"] is False and "max_seconds" in r["invalid_reason"]


def test_bench_cli_json(cli, artifact):
    r = json.loads(cli("bench", artifact, "--seconds", "0.3", "--new-tokens", "4", "--json", check=0).stdout)
    assert r["backend"] == "onnxruntime" and r["decode_tokens_per_s"] > 0


def test_bench_not_an_artifact(cli, tmp_path):
    p = cli("bench", tmp_path)
    assert p.returncode == 2 and "is not an edgekit artifact" in p.stderr
