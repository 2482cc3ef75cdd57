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
    cli("build", "--target", "x86-cpu", "-b", "onnxruntime", tiny_models["llama"], "-o", out, "--bench-seconds", "0.5",
        check=0)
    return out


def test_report_json(build):
    r = json.loads((build / "report.json").read_text())
    assert r["schema"] == 1 and len(r["environment_fingerprint"]) == 16
    assert r["environment"]["cores"] >= 1 and r["versions"]["onnxruntime"]
    assert r["status"] == "built" and r["target"] == "x86-cpu"
    assert r["bench"]["decode_tokens_per_s"] > 0 and len(r["latency_samples_ms"]) > 10 and r["memory_timeline"]
    assert {f["stage"] for f in r["fidelity"]} >= {"export", "verify"}
    assert r["fidelity"][0]["thresholds"]["top1"] == 1.0  # fp32: the gate's own thresholds travel with the figures
    assert r["layer_widths"]["before"] == [] and r["layer_widths"]["after"] == []  # nothing was pruned
    assert set(r["plots"]) == {"latency", "memory", "fidelity"}
    art = build / "04-export" / "artifact"
    assert r["artifact_size_bytes"] == sum(f.stat().st_size for f in art.iterdir() if f.is_file())
    pv = r["plan_vs_measured"]
    assert pv["memory_planned_mb"] > 0 and pv["memory_budget_mb"] > pv["memory_planned_mb"]
    assert pv["memory_measured_mb"] == r["bench"]["peak_rss_mb"] and pv["decode_measured_tps"] > 0
    assert [p["name"] for p in r["phases"]][0] == "load" and r["phases"][-1]["name"].startswith("p")


def test_report_html_is_self_contained_with_plots(build):
    html = (build / "report.html").read_text()
    c = _Count()
    c.feed(html)
    assert c.svgs >= 3 and set(c.figures) == {"plot-latency", "plot-memory", "plot-fidelity"}
    assert c.external == []
    # matplotlib keeps each text of a figure as an SVG comment: the budget and plan lines, the phases, thresholds
    r = json.loads((build / "report.json").read_text())
    pv = r["plan_vs_measured"]
    assert f"<!-- budget {pv['memory_budget_mb']:.0f} MB (x86-cpu) -->" in html
    assert f"<!-- planned {pv['memory_planned_mb']:.0f} MB (x86-cpu) -->" in html
    assert all(f"<!-- {p['name']} -->" in html for p in r["phases"])
    assert "<!-- threshold (at least) -->" in html and "<!-- threshold (at most) -->" in html
    md = (build / "report.md").read_text()
    assert "## Host benchmark" in md and "## Fidelity: export" in md
    assert f"| artifact size | {r['artifact_size_bytes'] / 2**20:.1f} MiB" in md
    assert "| memory: planned / measured |" in md and "| decode: planned / measured |" in md
    assert "| top-1 agreement with PyTorch | 100.0% (needs >= 100%) |" in md
    assert "(needs <= 1e-05) |" in md and "| greedy continuation | identical (must be identical) |" in md
    assert "top1_agreement" not in md and "mean_kl" not in md and "top1_agreement" not in html.split("<svg")[0]
    assert " ± " in md and "Pruning cost" not in md  # decode mean ± sd over runs; a dense build has no pruning cost


def test_widths_plot_compares_pruned_layers(build, tiny_models, tmp_path):
    """With a model-producing stage, the widths section shows original and built widths per layer."""
    from edgekit.report import collect, markdown, plots
    from edgekit.testing import make_tiny_model

    m = json.loads((build / "manifest.json").read_text())
    small = make_tiny_model("llama", tmp_path / "b" / "01-prune" / "model", tokenizer=False,
                            intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    shutil.copytree(build / "06-bench", tmp_path / "b" / "06-bench")
    m["stages"]["prune"].update(status="done", output="01-prune", model_dir="model",
                                result={"params_before": 1000, "params_after": 700, "removed_fraction": 0.3,
                                        "uniform": True, "dense_search_loss": 2.5, "pruned_search_loss": 2.75})
    data = collect(tmp_path / "b", m)
    assert [w["intermediate_size"] for w in data["layer_widths"]["after"]] == [64, 64]
    assert [w["intermediate_size"] for w in data["layer_widths"]["before"]] == [128, 128]
    assert "widths" in plots(data) and small.exists()
    md = markdown(data)  # the pruning cost: parameters and the calibration loss before and after
    assert "## Pruning cost" in md and "| parameters | 1,000 -> 700 (30.0% removed, uniform widths) |" in md
    assert "| calibration loss before / after pruning | 2.5000 / 2.7500 nats (+0.2500) |" in md


@pytest.mark.skipif(chromium() is None, reason="Debian chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium(build, tmp_path):
    png = tmp_path / "shot.png"
    errors = screenshot(build / "report.html", png)
    assert errors == []
    assert png.stat().st_size > 10_000


def test_matrix_table_shows_a_gate_failed_row_without_inventing_a_budget():
    """A row that failed its gate was never benchmarked: its memory cell is '-', its quality and error are shown."""
    from edgekit.report import MATRIX_HEADERS, matrix_table

    row = {"id": "host:onnxruntime/int4", "device": "host", "backend": "onnxruntime", "precision": "int4",
           "status": "gate-failed", "error": "onnxruntime int4 artifact failed the fidelity gate: mean KL 0.303 > 0.1",
           "size_bytes": 211_600_000, "gate_passed": False, "mean_kl": 0.303, "top1": 0.734}
    cells = dict(zip(MATRIX_HEADERS, matrix_table({"rows": [row], "winners": {}})[0]))
    assert cells["peak RSS / budget MB"] == "-" and cells["gate"] == "FAILED"
    assert "mean KL 0.303 > 0.1" in cells["result"] and "WINNER" not in cells["result"]
