"""`edgekit build --device URL`: the bench stage also runs on a real agent (on loopback) and the device's report
lands in the build directory and in the build report."""

import json

from agent_helpers import Agent


def test_build_with_device_bench(cli, tiny_models, tmp_path):
    agent = Agent(tmp_path / "agent-data", tmp_path / "token")
    try:
        out = tmp_path / "b"
        m = json.loads(cli("build", "--target", "x86-cpu", tiny_models["mistral"], "-o", out, "--bench-seconds", "0.3",
                           "--device", agent.url, "--token-file", agent.token_file, "--json", check=0).stdout)
    finally:
        agent.stop()
    dev = m["stages"]["bench"]["result"]["device"]
    assert dev["status"] == "done" and dev["metrics"]["decode_tokens_per_s"] > 0
    reports = list((out / "06-bench").glob("device-report-*.json"))
    assert len(reports) == 1
    r = json.loads(reports[0].read_text())
    assert r["device_tests"]["passed_all"] and r["within_budget"] is True
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["device_reports"]) == 1
    assert "## Device report:" in (out / "report.md").read_text()
