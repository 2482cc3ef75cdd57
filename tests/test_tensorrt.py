"""TensorRT around the engine: export (ONNX gated through ONNX Runtime, trtexec plan from the target), trtexec's
documented output formats, version/SM refusal, and a clear error without trtexec. TensorRT itself can't run here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import EdgekitError

# A TensorRT 10.3 trtexec benchmark log (Orin Nano), in the format trtexec prints.
TRT10_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # /usr/src/tensorrt/bin/trtexec --loadEngine=model.engine
[11/28/2026-10:00:00] [I] === Model Options ===
[11/28/2026-10:00:00] [I] Format: *
[11/28/2026-10:00:01] [I] Loaded engine size: 274 MiB
[11/28/2026-10:00:01] [I] Engine deserialized in 0.213548 sec.
[11/28/2026-10:00:01] [I] Setting persistentCacheLimit to 0 bytes.
[11/28/2026-10:00:02] [I] Warmup completed 21 queries over 200 ms
[11/28/2026-10:00:02] [I] Timing trace has 512 queries over 3.01566 s
[11/28/2026-10:00:02] [I]
[11/28/2026-10:00:02] [I] === Trace details ===
[11/28/2026-10:00:02] [I] Trace averages of 10 runs:
[11/28/2026-10:00:02] [I] Average on 10 runs - GPU latency: 5.83594 ms - Host latency: 5.87881 ms (enqueue 0.812128 ms)
[11/28/2026-10:00:02] [I]
[11/28/2026-10:00:02] [I] === Performance summary ===
[11/28/2026-10:00:02] [I] Throughput: 169.78 qps
[11/28/2026-10:00:02] [I] Latency: min = 5.80029 ms, max = 6.43164 ms, mean = 5.88115 ms, median = 5.87012 ms, percentile(90%) = 5.93945 ms, percentile(95%) = 5.97656 ms, percentile(99%) = 6.21289 ms
[11/28/2026-10:00:02] [I] Enqueue Time: min = 0.760254 ms, max = 1.16211 ms, mean = 0.812354 ms, median = 0.803711 ms, percentile(90%) = 0.858398 ms, percentile(95%) = 0.88623 ms, percentile(99%) = 1.03125 ms
[11/28/2026-10:00:02] [I] H2D Latency: min = 0.0214844 ms, max = 0.0537109 ms, mean = 0.0258789 ms, median = 0.0249023 ms, percentile(90%) = 0.0292969 ms, percentile(95%) = 0.0310059 ms, percentile(99%) = 0.0405273 ms
[11/28/2026-10:00:02] [I] GPU Compute Time: min = 5.77148 ms, max = 6.39844 ms, mean = 5.84062 ms, median = 5.83057 ms, percentile(90%) = 5.89941 ms, percentile(95%) = 5.93555 ms, percentile(99%) = 6.17383 ms
[11/28/2026-10:00:02] [I] D2H Latency: min = 0.0117188 ms, max = 0.0234375 ms, mean = 0.0146328 ms, median = 0.0141602 ms, percentile(90%) = 0.0166016 ms, percentile(95%) = 0.0175781 ms, percentile(99%) = 0.0205078 ms
[11/28/2026-10:00:02] [I] Total Host Walltime: 3.01566 s
[11/28/2026-10:00:02] [I] Total GPU Compute Time: 2.99040 s
[11/28/2026-10:00:02] [I] Explanations of the performance metrics are printed in the verbose logs.
&&&& PASSED TensorRT.trtexec [TensorRT v100300] # /usr/src/tensorrt/bin/trtexec --loadEngine=model.engine
"""

# TensorRT 8.2 (Jetson Nano, JetPack 4.6) prints only the 99th percentile and builds with --buildOnly.
TRT82_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v8201] # ./trtexec --onnx=model.onnx --saveEngine=model.engine
[11/28/2026-10:00:00] [I] Engine built in 312.58 sec.
[11/28/2026-10:00:00] [I] Throughput: 21.4 qps
[11/28/2026-10:00:00] [I] Latency: min = 45.1 ms, max = 52.9 ms, mean = 46.7 ms, median = 46.5 ms, percentile(99%) = 51.3 ms
[11/28/2026-10:00:00] [I] GPU Compute Time: min = 44.8 ms, max = 52.5 ms, mean = 46.3 ms, median = 46.1 ms, percentile(99%) = 50.9 ms
&&&& PASSED TensorRT.trtexec [TensorRT v8201] # ./trtexec --onnx=model.onnx --saveEngine=model.engine
"""

EXPORT_TIMES = """[
  { "startEnqMs" : 0.312, "endEnqMs" : 1.102, "startH2dMs" : 0.351, "endH2dMs" : 0.377, "startComputeMs" : 0.377,
    "endComputeMs" : 6.201, "startD2hMs" : 6.201, "endD2hMs" : 6.215, "h2dMs" : 0.026, "computeMs" : 5.824,
    "d2hMs" : 0.014, "endToEndMs" : 5.903, "latencyMs" : 5.864 },
  { "startEnqMs" : 6.250, "endEnqMs" : 7.011, "startH2dMs" : 6.281, "endH2dMs" : 6.305, "startComputeMs" : 6.305,
    "endComputeMs" : 12.171, "startD2hMs" : 12.171, "endD2hMs" : 12.186, "h2dMs" : 0.024, "computeMs" : 5.866,
    "d2hMs" : 0.015, "endToEndMs" : 5.936, "latencyMs" : 5.905 }
]"""


def test_parse_trtexec_summary_trt10_and_trt82():
    from edgekit.runtime.tensorrt import parse_trtexec_output

    r = parse_trtexec_output(TRT10_LOG)
    assert r["status"] == "PASSED" and r["tensorrt_version"] == "10.3.0"
    assert r["throughput_qps"] == pytest.approx(169.78)
    assert r["latency_ms"] == {"min": 5.80029, "max": 6.43164, "mean": 5.88115, "median": 5.87012,
                               "p90": 5.93945, "p95": 5.97656, "p99": 6.21289}
    assert r["gpu_compute_ms"]["median"] == pytest.approx(5.83057)
    assert r["h2d_ms"]["p99"] == pytest.approx(0.0405273) and r["enqueue_ms"]["mean"] == pytest.approx(0.812354)
    assert r["engine_load_s"] == pytest.approx(0.213548)
    assert r["queries"] == 512 and r["trace_s"] == pytest.approx(3.01566) and r["warmup_queries"] == 21
    assert r["host_walltime_s"] == pytest.approx(3.01566) and r["gpu_compute_total_s"] == pytest.approx(2.9904)
    old = parse_trtexec_output(TRT82_LOG)
    assert old["tensorrt_version"] == "8.2.1" and old["engine_build_s"] == pytest.approx(312.58)
    assert old["latency_ms"] == {"min": 45.1, "max": 52.9, "mean": 46.7, "median": 46.5, "p99": 51.3}
    assert parse_trtexec_output("garbage\n") == {}


def test_parse_export_times_and_output():
    from edgekit.runtime.tensorrt import parse_export_output, parse_export_times, query_latencies_ms

    times = parse_export_times(EXPORT_TIMES)
    assert query_latencies_ms(times) == [5.864, 5.905]
    assert query_latencies_ms([{"startComputeMs": 1.0, "endComputeMs": 3.5}]) == [2.5]
    with pytest.raises(EdgekitError, match="not a JSON list"):
        parse_export_times('{"a": 1}')
    vals = np.arange(2 * 3 * 4, dtype=np.float32) / 7
    text = ('[\n  { "name" : "logits"\n  , "dimensions" : "1x6x4"\n  , "values" : [ '
            + ", ".join(f"{v:.6g}" for v in vals) + ' ]\n  }\n]\n')
    out = parse_export_output(text)
    assert out["logits"].shape == (1, 6, 4) and np.allclose(out["logits"].ravel(), vals, atol=1e-6)


PLAN = {"tensorrt_version": "10.3", "precision": "fp16", "workspace_mb": 1024,
        "profile": {"min": {"input_ids": (1, 1)}, "opt": {"input_ids": (1, 1)}, "max": {"input_ids": (1, 256)}}}


def test_build_command_follows_the_tensorrt_version():
    from edgekit.exporters.tensorrt import bench_command, build_command

    argv = build_command(PLAN)
    assert argv[:3] == ["--onnx=model.onnx", "--saveEngine=model.engine", "--timingCacheFile=timing.cache"]
    assert "--minShapes=input_ids:1x1" in argv and "--maxShapes=input_ids:1x256" in argv
    assert "--fp16" in argv and "--memPoolSize=workspace:1024M" in argv and "--skipInference" in argv
    jp5 = build_command({**PLAN, "tensorrt_version": "8.5.2", "precision": "fp32"})
    assert "--memPoolSize=workspace:1024" in jp5 and "--buildOnly" in jp5 and "--fp16" not in jp5
    jp4 = build_command({**PLAN, "tensorrt_version": "8.2.1"})
    assert "--workspace=1024" in jp4 and not any(a.startswith("--memPoolSize") for a in jp4)
    b = bench_command(PLAN, {"input_ids": (1, 64)}, 200, 2.0, 10, "t.json")
    assert b == ["--loadEngine=model.engine", "--shapes=input_ids:1x64", "--warmUp=200", "--duration=2",
                 "--iterations=10", "--exportTimes=t.json"]


def test_compatibility_refuses_other_sm_or_tensorrt():
    from edgekit.runtime.tensorrt import check_compatible

    stamp = {"tensorrt_version": "10.3", "gpu_sm": "8.7"}
    check_compatible(stamp, {"tensorrt_version": "10.3.0.30", "gpu_sm": "8.7"})  # patch level may differ
    with pytest.raises(EdgekitError, match=r"TensorRT 10.3, this device has TensorRT 8.6.2"):
        check_compatible(stamp, {"tensorrt_version": "8.6.2", "gpu_sm": "8.7"})
    with pytest.raises(EdgekitError, match=r"SM 8.7, this device's GPU is SM 7.2"):
        check_compatible(stamp, {"tensorrt_version": "10.3.0", "gpu_sm": "7.2"})
    with pytest.raises(EdgekitError, match="TensorRT is not installed"):
        check_compatible(stamp, {"tensorrt_version": None, "gpu_sm": None})


@pytest.fixture(scope="module")
def trt_artifact(tiny_models, tmp_path_factory):
    from edgekit.export import ExportConfig, export_model
    from edgekit.target import get_target

    out = tmp_path_factory.mktemp("trt") / "art"
    export_model(tiny_models["qwen2"], out, ExportConfig(backend="tensorrt", precision="fp16", context_length=128,
                                                          target=get_target("jetson-orin")), log=lambda m: None)
    return out


def test_export_gates_through_onnxruntime_and_plans_the_engine(trt_artifact, tiny_models):
    meta = json.loads((trt_artifact / "artifact.json").read_text())
    assert meta["backend"] == "tensorrt" and meta["gate"]["passed"]
    assert meta["gate"]["runtime"] == "edgekit.runtime.onnxruntime"
    assert meta["tensorrt"] | {} == meta["tensorrt"] and meta["tensorrt"]["gpu_sm"] == "8.7"
    assert meta["tensorrt"]["tensorrt_version"] == "10.3" and meta["tensorrt"]["jetpack"] == "6.2"
    assert {"model.onnx", "trt.json"} <= set(meta["files"])
    plan = json.loads((trt_artifact / "trt.json").read_text())
    cfg = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    kv, hd = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    past = [n for n in plan["inputs"] if n.startswith("past_key_values.")]
    assert len(past) == 2 * cfg["num_hidden_layers"]
    assert plan["profile"]["min"][past[0]] == [1, kv, 0, hd]
    assert plan["profile"]["opt"][past[0]] == [1, kv, 64, hd] and plan["profile"]["opt"]["input_ids"] == [1, 1]
    assert plan["profile"]["max"]["input_ids"] == [1, 128] and plan["profile"]["max"][past[0]] == [1, kv, 127, hd]
    cmd = plan["build_command"]
    assert cmd[0] == "trtexec" and "--fp16" in cmd and any(c.startswith("--memPoolSize=workspace:") for c in cmd)
    assert "--optShapes=input_ids:1x1,attention_mask:1x65" in " ".join(cmd)
    # The engine's source graph really runs (ONNX Runtime) and matches the shipped reference.
    from edgekit.runtime.onnxruntime import load
    from edgekit.verify import compare, load_reference, thresholds_for

    res = compare(load_reference(trt_artifact / "reference.npz"), load(trt_artifact, meta), thresholds_for("fp32"))
    assert res["passed"], res["failures"]


def test_export_refusals(tiny_models, tmp_path):
    from edgekit.export import ExportConfig, export_model
    from edgekit.target import get_target

    with pytest.raises(EdgekitError, match="needs a target"):
        export_model(tiny_models["llama"], tmp_path / "a", ExportConfig(backend="tensorrt", precision="fp16"))
    with pytest.raises(EdgekitError, match="cannot produce precision 'int8': TensorRT int8 needs a calibrated"):
        export_model(tiny_models["llama"], tmp_path / "b", ExportConfig(backend="tensorrt", precision="int8",
                                                                        target=get_target("jetson-orin")))
    with pytest.raises(EdgekitError, match=r"TensorRT 8.2.1 parses ONNX opset <= 13"):
        export_model(tiny_models["llama"], tmp_path / "c", ExportConfig(backend="tensorrt", precision="fp16",
                                                                        target=get_target("jetson-nano")))
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_fp16_safe_clamps_out_of_range_constants(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.exporters.tensorrt import make_fp16_safe

    big = numpy_helper.from_array(np.array([-3.4e38, 1.0, -np.inf], dtype=np.float32), "mask")
    g = helper.make_graph([helper.make_node("Add", ["x", "mask"], ["y"]), helper.make_node("Softmax", ["y"], ["z"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])], [big])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([0.5, 0.25, 0.0], dtype=np.float32)
    before = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert make_fp16_safe(m) == {"tensors": 1, "values": 1}
    fixed = numpy_helper.to_array(m.graph.initializer[0])
    assert fixed[0] == -65504.0 and fixed[1] == 1.0 and np.isneginf(fixed[2])  # -inf is representable in fp16
    after = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(before, after)
    assert make_fp16_safe(m) == {"tensors": 0, "values": 0}


def test_missing_trtexec_is_a_clear_error(trt_artifact, monkeypatch, tmp_path):
    from edgekit.runtime import tensorrt as rt

    monkeypatch.setenv("PATH", str(tmp_path))  # no trtexec anywhere on PATH
    monkeypatch.setattr(rt, "TRTEXEC_PATHS", ())
    with pytest.raises(EdgekitError, match="trtexec is not installed") as e:
        rt.ensure_engine(trt_artifact)
    assert "/usr/src/tensorrt/bin" in e.value.fix
    with pytest.raises(EdgekitError, match="no per-token Python runner"):
        rt.load(trt_artifact, {})


FAKE_TRTEXEC = """#!/bin/sh
# Stands in for trtexec, which cannot exist on this machine: records its arguments and writes the engine file.
echo "$@" >> trtexec-calls.txt
for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done
echo "[11/28/2026-10:00:00] [I] Engine built in 1.5 sec."
echo "&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec"
"""


def test_engine_is_built_once_and_a_foreign_engine_is_refused(trt_artifact, monkeypatch, tmp_path):
    import shutil

    from edgekit.runtime import tensorrt as rt

    art = tmp_path / "art"
    shutil.copytree(trt_artifact, art)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "trtexec").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    orin = {"tensorrt_version": "10.3.0", "gpu_sm": "8.7"}
    with pytest.raises(EdgekitError, match="SM 8.7, this device's GPU is SM 7.2"):
        rt.ensure_engine(art, device={"tensorrt_version": "10.3.0", "gpu_sm": "7.2"})
    assert not (art / "model.engine").exists()
    engine = rt.ensure_engine(art, device=orin)
    calls = (art / "trtexec-calls.txt").read_text().splitlines()
    plan = json.loads((art / "trt.json").read_text())
    assert engine.is_file() and calls == [" ".join(plan["build_command"][1:])]
    assert json.loads((art / "model.engine.json").read_text())["gpu_sm"] == "8.7"
    assert rt.ensure_engine(art, device=orin) == engine and len((art / "trtexec-calls.txt").read_text().splitlines()) == 1
    # An engine stamped by another TensorRT (e.g. copied from a JetPack 5 board) is refused, not loaded.
    (art / "model.engine.json").write_text(json.dumps({"tensorrt_version": "8.5.2", "gpu_sm": "8.7"}))
    with pytest.raises(EdgekitError, match="the engine model.engine is for TensorRT 8.5.2"):
        rt.ensure_engine(art, device=orin)


def test_host_verify_checks_the_source_graph(trt_artifact, cli):
    """`edgekit verify` on the workstation can't run an engine: it gates the shipped ONNX and says so."""
    p = cli("verify", trt_artifact, "--json", check=0)
    res = json.loads(p.stdout)
    assert res["passed"] and res["top1_agreement"] == 1.0 and "source ONNX" in res["runtime"]


def test_device_half_runs_through_the_agent_with_a_stand_in_trtexec(trt_artifact, tmp_path):
    """The whole device path of a TensorRT job: engine build, engine-level reference check (--loadInputs /
    --exportOutput), prefill and decode timing (--exportTimes), report; trtexec is tests/fake_trtexec.py, which
    speaks trtexec's formats and computes with ONNX Runtime (TensorRT can't run here)."""
    import sys

    from agent_helpers import Agent, bundle_bytes

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    fake.write_text(f"#!{sys.executable}\n" + (Path(__file__).parent / "fake_trtexec.py").read_text())
    fake.chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old_path}"
    try:
        agent = Agent(tmp_path / "data", tmp_path / "token")
    finally:
        os.environ["PATH"] = old_path
    try:
        status, job = agent.request("POST", "/jobs", body=bundle_bytes(trt_artifact, tmp_path))
        assert status == 201
        job = agent.wait(job["id"], timeout=180)
        report = agent.request("GET", f"/jobs/{job['id']}/report")[1]
        assert job["status"] == "done", (job, report.get("device_tests"))
        tests = {c["name"]: c["outcome"] for c in report["device_tests"]["tests"]}
        assert tests["test_loads_and_runs"] == tests["test_outputs_match_reference"] == "passed"
        b = report["bench"]
        assert b["backend"] == "tensorrt" and b["valid"] and b["prompt_tokens"] == 16
        assert b["decode_tokens_per_s"] > 0 and b["prefill_tokens_per_s"] > 0 and b["load_s"] >= 0
        assert b["decode_latency_ms"]["n"] >= b["runs"] >= 3 and b["duration_s"] >= 1.0  # --duration rounds up
        assert b["trtexec"]["decode"]["latency_ms"]["p99"] >= b["trtexec"]["decode"]["latency_ms"]["median"]
        assert b["trtexec"]["prefill"]["throughput_qps"] > 0 and b["peak_rss_mb"] > 0
        stamp = json.loads(next((agent.data_dir / "jobs").glob("*/bundle/artifact/model.engine.json")).read_text())
        assert stamp["tensorrt_version"] == "10.3.0"  # read from trtexec's banner
    finally:
        agent.stop()
    # A device on another TensorRT release (JetPack 6.0's 8.6.2): the job fails with the reason, nothing is built.
    os.environ.update(PATH=f"{bin_dir}{os.pathsep}{old_path}", FAKE_TRTEXEC_VERSION="8602")
    try:
        other = Agent(tmp_path / "data-jp60", tmp_path / "token")
    finally:
        os.environ["PATH"] = old_path
        del os.environ["FAKE_TRTEXEC_VERSION"]
    try:
        status, job = other.request("POST", "/jobs", body=bundle_bytes(trt_artifact, tmp_path))
        job = other.wait(job["id"], timeout=180)
        assert job["status"] == "failed"
        assert "is for TensorRT 10.3, this device has TensorRT 8.6.2" in job["error"], job["error"]
        assert not list((other.data_dir / "jobs").glob("*/bundle/artifact/model.engine"))
        assert other.request("GET", "/health", token=None)[0] == 200
    finally:
        other.stop()


def test_jetson_build_completes_on_the_workstation(tiny_models, cli, tmp_path):
    """`edgekit build --target jetson-orin`: export plans the engine, verify gates its source ONNX, bench defers to
    the device."""
    out = tmp_path / "jb"
    cli("build", tiny_models["llama"], "--target", "jetson-orin", "-o", out, "--context", 128, check=0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["export"]["status"] == "done" and m["stages"]["verify"]["result"]["passed"]
    assert "source ONNX" in m["stages"]["verify"]["result"]["runtime"]
    assert m["stages"]["bench"]["status"] == "passed-through"
    assert "--device" in m["stages"]["bench"]["result"]["reason"]
    assert json.loads((out / "04-export/artifact/trt.json").read_text())["gpu_sm"] == "8.7"


def test_graph_past_the_protobuf_limit_ships_external_data(tiny_models, monkeypatch, tmp_path):
    """With the limit pretended tiny, the engine's source graph keeps its weights in model.onnx.data (no ByteSize,
    which raises past 2 GB): artifact.json hashes it, the gate reads it, a bundle carries it, and trtexec (the
    stand-in, which reads the graph with ONNX Runtime from the artifact folder as the real one does) finds it next
    to model.onnx on the device."""
    import sys

    import onnx

    from edgekit.agent.bundle import extract_bundle, make_bundle
    from edgekit.export import ExportConfig, export_model
    from edgekit.exporters import onnxruntime as ox
    from edgekit.runtime import tensorrt as rt
    from edgekit.target import get_target

    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", ox.MARGIN + 1024)
    out = tmp_path / "art"
    meta = export_model(tiny_models["qwen2"], out, ExportConfig(backend="tensorrt", precision="fp16",
                                                                context_length=64, target=get_target("jetson-orin")),
                        log=lambda m: None)
    assert meta["gate"]["passed"] and meta["gate"]["top1_agreement"] == 1.0, meta["gate"]
    assert meta["external_data"] == "model.onnx.data"
    assert {"model.onnx", "model.onnx.data", "trt.json"} <= set(meta["files"])
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"}
    assert "--onnx=model.onnx" in json.loads((out / "trt.json").read_text())["build_command"]

    manifest = make_bundle(out, tmp_path / "b.tar")
    assert "artifact/model.onnx.data" in manifest["members"]
    job = tmp_path / "job"
    extract_bundle(tmp_path / "b.tar", job, max_bytes=1 << 30)
    device_art = job / "artifact"
    assert rt.host_check(device_art)["passed"]  # hashes include the data file; ONNX Runtime reads it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    fake.write_text(f"#!{sys.executable}\n" + (Path(__file__).parent / "fake_trtexec.py").read_text())
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    res = rt.check_reference(device_art)  # builds the engine in the artifact folder, then runs it
    assert res["passed"], res["failures"]
