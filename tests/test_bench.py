import csv
import io
import json

import numpy as np
import pytest

from edgekit.export import ExportConfig, export_model
from edgekit.runtime.bench import BenchConfig, bench_artifact, fit_points, percentiles, sweep

# Short enough for a test: a few ms per run on the tiny models, the minimum duration set by flag.
FAST = ("-r", "3", "--seconds", "0.2", "--warmup", "0")


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "art"
    export_model(tiny_models["llama"], out, ExportConfig(precision="fp32"))
    return out


@pytest.fixture(scope="module")
def gguf_artifact(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gguf"
    export_model(tiny_models["qwen2"], out, ExportConfig(backend="gguf", precision="fp32", context_length=128))
    return out


def test_percentiles_are_ordered():
    p = percentiles([float(x) for x in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p50"] <= p["p90"] <= p["p99"] and p["n"] == 100


def test_sweep_and_context_fitting():
    assert sweep([64, 128], [32]) == [(64, 32), (128, 32)]
    assert fit_points([(64, 32)], 512) == ([(64, 32)], [])
    pts, notes = fit_points([(512, 128)], 128, fixed_prompt=False, fixed_new=False)  # defaults shrink, and say so
    assert pts == [(96, 32)] and "shortened to -p 96 -n 32" in notes[0]
    with pytest.raises(Exception, match="exceed the model's context"):  # asked-for lengths never shrink
        fit_points([(512, 128)], 128)


def test_bench_reports_every_metric(artifact):
    r = bench_artifact(artifact, BenchConfig(prompt_tokens=32, new_tokens=8, min_runs=3, min_seconds=0.5))
    assert r["valid"] and r["runs"] >= 3 and r["duration_s"] >= 0.5
    assert r["load_s"] > 0 and r["ttft_ms"]["p50"] > 0
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["decode_tokens_per_s_sd"] >= 0 and r["prefill_tokens_per_s_sd"] >= 0
    lat = r["decode_latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["n"] == 8 * r["runs"]
    assert 20 < r["peak_rss_mb"] < 4000 and r["memory_timeline"] and r["swap_growth_mb"] >= 0
    # phases on the memory timeline's clock, in order: load, warmup, the measured point
    names = [p["name"] for p in r["phases"]]
    assert names == ["load", "warmup p32 n8", "p32 n8"], names
    assert all(0 <= p["start_s"] <= p["end_s"] for p in r["phases"])
    assert r["phases"][-1]["end_s"] <= r["memory_timeline"][-1][0] + 0.5
    assert r["prompt_source"] == "reference text" and r["results"][0]["runs"] == r["runs"]


def test_bench_flags_invalid_when_minimums_unmet(artifact):
    r = bench_artifact(artifact, BenchConfig(prompt_tokens=8, new_tokens=2, min_runs=10**6, min_seconds=0.2,
                                             max_seconds=0.5))
    assert r["valid"] is False and "max_seconds" in r["invalid_reason"] and "min_runs" in r["validity_rule"]


def test_bench_cli_repetitions_sweep_and_csv(cli, artifact, tmp_path):
    """llama-bench's -p/-n sweep and -r repetitions: one CSV row per (prompt, new) point, mean and sd per point; -o
    writes the same results as files."""
    p = cli("bench", artifact, "-p", "8,16", "-n", "4", "-r", "4", "--seconds", "0.2", "--format", "csv",
            "-o", tmp_path / "out", check=0)
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert [(r["prompt_tokens"], r["new_tokens"]) for r in rows] == [("8", "4"), ("16", "4")]
    for r in rows:
        assert int(r["runs"]) >= 4 and float(r["duration_s"]) >= 0.2 and r["valid"] == "True"
        assert float(r["decode_tokens_per_s"]) > 0 and float(r["decode_tokens_per_s_sd"]) >= 0
        assert r["backend"] == "onnxruntime" and r["precision"] == "fp32" and int(r["size_bytes"]) > 10_000
    files = {f.name for f in (tmp_path / "out").iterdir()}
    assert files == {"bench.json", "bench.csv", "bench.md"}
    full = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(full["results"]) == 2 and full["valid"] and full["config"]["min_runs"] == 4
    assert [ph["name"] for ph in full["phases"]][-2:] == ["warmup p16 n4", "p16 n4"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.startswith("| model | size | backend |") and md.count(" ± ") == 4


def test_bench_cli_marks_invalid(cli, artifact):
    p = cli("bench", artifact, "-p", "8", "-n", "2", "-r", "100000", "--seconds", "0.1", "--max-seconds", "0.3",
            "--format", "md", check=0)
    assert "| NO |" in p.stdout and "INVALID: p8 n2: stopped at max_seconds=0.3" in p.stdout


def test_bench_cli_json(cli, artifact):
    r = json.loads(cli("bench", artifact, *FAST, "-p", "16", "--new-tokens", "4", "--json", check=0).stdout)
    assert r["backend"] == "onnxruntime" and r["decode_tokens_per_s"] > 0 and r["notes"] == []


def test_bench_default_lengths_fit_a_short_context(cli, gguf_artifact):
    """Defaults (512 + 128) on a 128-token artifact are shortened and the report says so; asked-for ones are not."""
    r = json.loads(cli("bench", gguf_artifact, *FAST, "--json", check=0).stdout)
    assert (r["prompt_tokens"], r["new_tokens"]) == (96, 32) and "shortened" in r["notes"][0]
    p = cli("bench", gguf_artifact, "-p", "120", "-n", "16", check=2)
    assert p.stderr.startswith("edgekit: error: 120 prompt + 16 new tokens exceed") and len(p.stderr.splitlines()) == 1


def test_bench_plain_gguf_file(cli, gguf_artifact, tmp_path):
    """Any .gguf, as llama-bench takes: family, context, vocabulary and file type from the header; ungated unless a
    reference is given; a reference that the file does not reproduce fails with exit 3."""
    f = gguf_artifact / "model.gguf"
    r = json.loads(cli("bench", f, *FAST, "-p", "16", "-n", "4", "--json", check=0).stdout)
    assert r["source"] == "file" and r["backend"] == "gguf" and r["precision"] == "fp32" and "gate" not in r
    assert r["context"] == 20 and r["prompt_source"] == "seeded random ids" and r["size_bytes"] == f.stat().st_size
    r = json.loads(cli("bench", f, *FAST, "-p", "16", "-n", "4", "--reference", gguf_artifact / "reference.npz",
                       "--json", check=0).stdout)
    assert r["gate"]["passed"] and r["gate"]["precision"] == "fp32" and r["prompt_source"] == "reference text"
    with np.load(gguf_artifact / "reference.npz") as z:
        bad = {k: z[k] for k in z.files}
    bad["top1"] = (bad["top1"] + 1) % 50
    np.savez(tmp_path / "bad.npz", **bad)
    p = cli("bench", f, *FAST, "--reference", tmp_path / "bad.npz", check=3)
    assert "fails the fp32 gate" in p.stderr and "top-1 agreement" in p.stderr and p.stdout == ""


def test_bench_plain_onnx_file(cli, artifact):
    r = json.loads(cli("bench", artifact / "model.onnx", *FAST, "-p", "8", "-n", "4", "--json", check=0).stdout)
    assert r["source"] == "file" and r["backend"] == "onnxruntime" and r["precision"] == "fp32" and r["valid"]


@pytest.mark.parametrize("args,message", [
    (("-p", "abc"), "--prompt-tokens 'abc' is not a comma list of integers"),
    (("-p", "0"), "--prompt-tokens 0 is not a usable value"),
    (("-n", "4.5"), "--new-tokens 4.5 is not a usable value"),
    (("-r", "0"), "--repetitions 0 is not a usable value"),
    (("--precision", "fp32"), "--precision chooses gate thresholds and needs --reference"),
])
def test_bench_bad_flags(cli, artifact, args, message):
    p = cli("bench", artifact, *args, check=2)
    assert p.stderr.strip() == p.stderr.strip().splitlines()[0] and message in p.stderr, p.stderr


def test_bench_not_a_model(cli, tmp_path):
    p = cli("bench", tmp_path)
    assert p.returncode == 2 and "is not an edgekit artifact" in p.stderr
    (tmp_path / "notes.txt").write_text("hi")
    p = cli("bench", tmp_path / "notes.txt", check=2)
    assert "neither an artifact folder nor a .gguf, .onnx or .pte file" in p.stderr
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    p = cli("bench", tmp_path / "junk.gguf", check=2)
    assert "is not a readable GGUF file" in p.stderr and len(p.stderr.splitlines()) == 1
