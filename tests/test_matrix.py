"""`edgekit bench --matrix` and `edgekit build --backend auto` (issue #15): rows, the winner rule, resume after a
rerun and after SIGKILL, a fleet of real agents with an unreachable one and a wrong token, and one-line row errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import cli_env


def _row(device="host", backend="gguf", precision="q8_0", tps=100.0, kl=0.01, passed=True, fits=True, size=10,
         status="ok"):
    return {"id": f"{device}:{backend}/{precision}", "device": device, "backend": backend, "precision": precision,
            "status": status, "decode_tps_p50": tps, "mean_kl": kl, "gate_passed": passed, "fits": fits,
            "size_bytes": size}


def test_winner_rule_fastest_passing_fitting_ties_to_quality():
    from edgekit.matrix import TIE, WINNER_RULE, pick_winners

    rows = [_row(precision="q4_k_m", tps=300, passed=False),  # fastest, but fails its gate
            _row(backend="onnxruntime", precision="int4", tps=250, fits=False),  # over the budget
            _row(precision="q8_0", tps=200, kl=0.02),
            _row(backend="onnxruntime", precision="int8", tps=200 * (1 - TIE / 2), kl=0.005),  # a tie, better KL
            _row(precision="fp32", tps=120, kl=0.0),
            _row(device="pi:8765", precision="q8_0", tps=20, kl=0.02),
            _row(device="pi:8765", precision="fp32", tps=9, kl=0.0),
            _row(device="dead:1", status="error", tps=None)]
    assert pick_winners(rows) == {"host": "host:onnxruntime/int8", "pi:8765": "pi:8765:gguf/q8_0", "dead:1": None}
    rows[3]["decode_tps_p50"] = 200 * (1 - 2 * TIE)  # no longer a tie: speed decides
    assert pick_winners(rows)["host"] == "host:gguf/q8_0"
    assert "fastest" in WINNER_RULE and "gate" in WINNER_RULE and "budget" in WINNER_RULE and "quality" in WINNER_RULE


def test_rows_are_every_backend_times_precision_the_target_runs():
    from edgekit.matrix import plan_rows
    from edgekit.target import get_target

    x86 = get_target("x86-cpu")
    assert x86.build.backend == "gguf" and x86.build.precision == "q8_0"  # the default decodes 2x ORT fp32
    rows = [(r.backend, r.precision) for r in plan_rows(x86)]
    assert rows == [("gguf", "q8_0"), ("gguf", "q4_k_m"), ("gguf", "fp32"), ("onnxruntime", "fp32"),
                    ("onnxruntime", "int8"), ("onnxruntime", "int4")]
    assert [(r.backend, r.precision) for r in plan_rows(get_target("android-arm64"))] == [
        ("executorch", "8da4w"), ("executorch", "fp32")]
    bad = plan_rows(x86, backends=["tensorrt", "nope", "gguf"], precisions=["Q8_0"])
    assert [(r.backend, r.precision) for r in bad] == [("tensorrt", None), ("nope", None), ("gguf", "q8_0")]
    assert "x86-cpu does not run tensorrt (its backends: gguf, onnxruntime" in bad[0].error
    assert "unknown backend 'nope'" in bad[1].error and bad[2].error is None


def test_a_profile_naming_an_unknown_matrix_backend_is_refused(tmp_path):
    from edgekit.errors import EdgekitError
    from edgekit.target import get_target

    text = get_target("x86-cpu").to_toml()
    assert 'backends = ["onnxruntime"]' in text  # the profile round-trips its matrix backends
    (tmp_path / "b.toml").write_text(text.replace('backends = ["onnxruntime"]', 'backends = ["onnxruntime", "tpu"]'))
    with pytest.raises(EdgekitError, match=r"build.backends \['tpu'\] are not among"):
        get_target(str(tmp_path / "b.toml"))


def test_a_backend_the_target_cannot_run_is_a_row_error(tiny_models, tmp_path):
    import edgekit

    res = edgekit.bench_matrix(tiny_models["llama"], target="x86-cpu", out=tmp_path / "m", backends="tensorrt")
    [row] = res.rows
    assert row.status == "error" and row.error.startswith("x86-cpu does not run tensorrt")
    assert res.winner is None and res.winners == {"host": None}
    data = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert data == res.to_dict() and "ERROR: x86-cpu does not run tensorrt" in (tmp_path / "m" / "matrix.md").read_text()
    assert not [p for p in (tmp_path / "m").iterdir() if p.is_dir()]  # nothing was built


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MATRIX = ("bench", "--matrix", "--target", "x86-cpu", "--context", "128", "--seconds", "0.3")


@pytest.mark.slow
def test_matrix_rows_json_rerun_and_tables(cli, tiny_models, tmp_path):
    out = tmp_path / "m"
    argv = (*MATRIX, tiny_models["llama"], "-o", out, "--backends", "gguf,onnxruntime,tensorrt", "--precisions",
            "q8_0,fp32")
    d = json.loads(cli(*argv, "--json", check=0).stdout)
    assert set(d) >= {"schema", "target", "model", "budget_mb", "bandwidth", "winner_rule", "winners", "winner",
                      "rows", "report"}
    ids = [r["id"] for r in d["rows"]]
    assert ids == ["host:gguf/q8_0", "host:gguf/fp32", "host:onnxruntime/fp32", "host:tensorrt/-"]
    for r in d["rows"][:3]:
        assert r["status"] == "ok" and r["gate_passed"] and r["fits"] and not r["skipped"], r
        assert r["decode_tps_p50"] > 0 and r["decode_tps_p99"] > 0 and r["ttft_ms"] > 0
        assert r["prefill_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["size_bytes"] > 0
        assert r["mean_kl"] >= 0 and 0 < r["top1_agreement"] <= 1 and r["perplexity_ratio"] > 0
        assert 0 < r["roofline_fraction"] and r["bytes_read_per_token"] > 0
        assert (out / f"{r['backend']}-{r['precision']}" / "manifest.json").is_file()
    assert d["rows"][3]["status"] == "error" and "does not run tensorrt" in d["rows"][3]["error"]
    assert d["winner"] == d["winners"]["host"] and d["winner"] in ids[:3]
    assert d["bandwidth"]["host_bytes_per_s"] > 1e8
    md = (out / "matrix.md").read_text()
    assert "| device | backend | precision |" in md and "WINNER" in md and "winner rule:" in md
    html = (out / "matrix.html").read_text()
    assert 'id=plot-quality_speed' in html and 'id=plot-memory_budget' in html
    p = cli(*argv, check=0)  # rerun: every finished row read back, nothing rebuilt
    assert p.stdout.count("skipped: done earlier") == 3 and "[gguf q8_0]" not in p.stderr
    assert "finished earlier, skipped" in p.stderr


@pytest.mark.slow
def test_killed_matrix_resumes_losing_nothing(tiny_models, tmp_path):
    out = tmp_path / "m"
    argv = [sys.executable, "-m", "edgekit", *MATRIX, str(tiny_models["llama"]), "-o", str(out), "--backends",
            "gguf", "--precisions", "fp32,q8_0"]
    p = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "gguf-q8_0"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:  # the first row is finished, the second mid-export
        if (out / "gguf-fp32" / "row.json").is_file() and any(second.glob(".04-export.tmp-*")):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the matrix ended before its second row could be interrupted"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    first = json.loads((out / "gguf-fp32" / "row.json").read_text())
    r = subprocess.run(argv + ["--json"], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    rows = {x["id"]: x for x in d["rows"]}
    assert rows["host:gguf/fp32"]["skipped"] and rows["host:gguf/fp32"]["decode_tps_p50"] == first["decode_tps_p50"]
    assert rows["host:gguf/q8_0"]["status"] == "ok" and not rows["host:gguf/q8_0"]["skipped"]
    m = json.loads((second / "manifest.json").read_text())  # the killed row resumed: plan was not redone
    assert m["stages"]["plan"]["skipped_last_run"] and not m["stages"]["export"].get("skipped_last_run")
    assert not list(second.glob(".*.tmp-*"))  # the interrupted stage's remains were removed


@pytest.mark.slow
def test_fleet_real_agent_unreachable_and_wrong_token(cli, tiny_models, tmp_path):
    from agent_helpers import Agent

    good = Agent(tmp_path / "a1", tmp_path / "token")
    other = Agent(tmp_path / "a2", tmp_path / "other-token")  # a real agent holding a different token
    dead = f"http://127.0.0.1:{_free_port()}"
    try:
        out = tmp_path / "m"
        p = cli(*MATRIX, tiny_models["llama"], "-o", out, "--backends", "gguf", "--precisions", "q8_0",
                "--device", good.url, "--device", dead, "--device", other.url, "--token-file", good.token_file,
                "--timeout", 300, "--json", check=0)
        d = json.loads(p.stdout)
    finally:
        good.stop()
        other.stop()
    rows = {r["device"]: r for r in d["rows"]}
    lab = lambda url: url.removeprefix("http://")  # noqa: E731
    assert set(rows) == {"host", lab(good.url), lab(dead), lab(other.url)}
    ok = rows[lab(good.url)]
    assert ok["status"] == "ok" and ok["decode_tps_p50"] > 0 and ok["gate_passed"] and ok["fits"], ok
    assert ok["hostname"] and ok["job"]
    assert list(out.glob("gguf-q8_0/device-report-*.json"))
    assert "cannot reach the agent" in rows[lab(dead)]["error"] and "\n" not in rows[lab(dead)]["error"]
    assert "refused" in rows[lab(other.url)]["error"] and "401" in rows[lab(other.url)]["error"]
    assert d["winners"][lab(good.url)] == ok["id"] and d["winner"] == ok["id"]  # the first device's winner
    assert d["winners"][lab(dead)] is None and rows["host"]["status"] == "ok"


@pytest.mark.slow
def test_build_backend_auto_builds_the_matrix_winner(cli, tiny_models, tmp_path):
    from edgekit.target import get_target

    # a profile with two rows keeps the matrix cheap: gguf q8_0 and onnxruntime int8
    text = get_target("x86-cpu").to_toml().replace('precisions = ["q8_0", "q4_k_m", "fp32", "int8", "int4"]',
                                                  'precisions = ["q8_0", "int8"]')
    (tmp_path / "two.toml").write_text(text)
    out = tmp_path / "b"
    m = json.loads(cli("build", "--target", tmp_path / "two.toml", tiny_models["llama"], "-o", out, "--backend",
                       "auto", "--context", "128", "--bench-seconds", "0.3", "--json", check=0).stdout)
    d = json.loads((out / "matrix" / "matrix.json").read_text())
    assert [r["id"] for r in d["rows"]] == ["host:gguf/q8_0", "host:onnxruntime/int8"]
    win = next(r for r in d["rows"] if r["id"] == d["winner"])
    assert (m["resolved"]["backend"], m["resolved"]["precision"]) == (win["backend"], win["precision"])
    assert all(s.get("skipped_last_run") for s in m["stages"].values())  # the winner's row was the build
    assert m["stages"]["verify"]["result"]["passed"] and (out / "report.html").is_file()
    p = cli("build", "--target", "x86-cpu", tiny_models["llama"], "-o", tmp_path / "c", "--backend", "auto",
            "--dry-run", check=2)
    assert "--backend auto builds and benchmarks every backend" in p.stderr
