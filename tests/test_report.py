"""Build reports: report.json (schema + environment fingerprint), report.md, and a self-contained report.html with
its plots; opened in headless Chromium when it is installed."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from report_screenshot import _Count, chromium, screenshot  # noqa: E402


@pytest.fixture(scope="module")
def build(cli, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "b"
    cli("build", "--target", "x86-cpu", tiny_models["llama"], "-o", out, "--bench-seconds", "0.5", check=0)
    return out


def test_report_json(build):
    r = json.loads((build / "report.json").read_text())
    assert r["schema"] == 1 and len(r["environment_fingerprint"]) == 16
    assert r["environment"]["cores"] >= 1 and r["versions"]["onnxruntime"]
    assert r["status"] == "built" and r["target"] == "x86-cpu"
    assert r["bench"]["decode_tokens_per_s"] > 0 and len(r["latency_samples_ms"]) > 10 and r["memory_timeline"]
    assert {f["stage"] for f in r["fidelity"]} >= {"export", "verify"}
    assert len(r["layer_widths"]["before"]) == 2
    assert set(r["plots"]) == {"latency", "memory", "widths", "fidelity"}


def test_report_html_is_self_contained_with_plots(build):
    c = _Count()
    c.feed((build / "report.html").read_text())
    assert c.svgs >= 4 and set(c.figures) == {"plot-latency", "plot-memory", "plot-widths", "plot-fidelity"}
    assert c.external == []
    md = (build / "report.md").read_text()
    assert "## Host benchmark" in md and "| decode |" in md and "## Fidelity: export" in md


def test_widths_plot_compares_pruned_layers(build, tiny_models, tmp_path):
    """With a model-producing stage, the widths section shows original and built widths per layer."""
    from edgekit.report import collect, plots
    from edgekit.testing import make_tiny_model

    m = json.loads((build / "manifest.json").read_text())
    small = make_tiny_model("llama", tmp_path / "b" / "01-prune" / "model", tokenizer=False,
                            intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    shutil.copytree(build / "06-bench", tmp_path / "b" / "06-bench")
    m["stages"]["prune"].update(status="done", output="01-prune", model_dir="model")
    data = collect(tmp_path / "b", m)
    assert [w["intermediate_size"] for w in data["layer_widths"]["after"]] == [64, 64]
    assert [w["intermediate_size"] for w in data["layer_widths"]["before"]] == [128, 128]
    assert "widths" in plots(data) and small.exists()


@pytest.mark.skipif(chromium() is None, reason="Debian chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium(build, tmp_path):
    png = tmp_path / "shot.png"
    errors = screenshot(build / "report.html", png)
    assert errors == []
    assert png.stat().st_size > 10_000
