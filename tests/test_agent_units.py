"""Pieces of the agent without a server: tegrastats parsing and sampling, Jetson facts, the bundle round trip."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

AGX_ORIN = ("11-28-2026 10:00:00 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) "
            "CPU [14%@2188,0%@2188,3%@2188,off,1%@2188,0%@2188,0%@2188,0%@2188,off,off,off,off] EMC_FREQ 0% "
            "GR3D_FREQ 12%@[0,0] NVENC off NVDEC off VIC_FREQ 0%@115 APE 174 CV0@-256C CPU@47.031C Tboard@37C "
            "SOC2@43.687C Tdiode@38.75C SOC0@44.125C CV1@-256C GPU@41.281C tj@47.031C SOC1@42.75C CV2@-256C "
            "VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 402mW/402mW VIN_SYS_5V0 3325mW/3325mW VDDQ_VDD2_1V8AO 704mW/704mW")
ORIN_NANO = ("RAM 2247/7620MB (lfb 1x2MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,1%@729,0%@729,0%@729,0%@729,"
             "0%@729] GR3D_FREQ 0% cpu@47.5C soc2@46.906C soc0@47.218C gpu@46.906C tj@47.5C soc1@47.5C "
             "VDD_IN 4541mW/4541mW VDD_CPU_GPU_CV 480mW/480mW VDD_SOC 1403mW/1403mW")
NANO = ("RAM 1500/3964MB (lfb 200x4MB) SWAP 12/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [10%@1479,5%@1479,off,off] EMC_FREQ 3%@1600 GR3D_FREQ 99%@921 APE 25 PLL@34C CPU@37C PMIC@50C "
        "GPU@35.5C AO@43C thermal@36.25C POM_5V_IN 2004/2004 POM_5V_GPU 0/0 POM_5V_CPU 327/327")


def test_tegrastats_lines_of_three_boards():
    from edgekit.agent.tegrastats import input_power_mw, parse_line

    agx = parse_line(AGX_ORIN)
    assert (agx["ram_used_mb"], agx["ram_total_mb"], agx["swap_used_mb"], agx["swap_total_mb"]) == (18207, 62841, 86,
                                                                                                      31420)
    assert agx["gpu_load_pct"] == 12 and agx["emc_load_pct"] == 0
    assert agx["cpu_load"][:4] == [14, 0, 3, None] and len(agx["cpu_load"]) == 12
    assert agx["power_mw"] == {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 402, "VIN_SYS_5V0": 3325, "VDDQ_VDD2_1V8AO": 704}
    assert agx["temps_c"]["GPU"] == 41.281 and agx["temps_c"]["CV0"] == -256
    assert input_power_mw(agx) == 3325
    nano8 = parse_line(ORIN_NANO)
    assert nano8["ram_used_mb"] == 2247 and nano8["gpu_load_pct"] == 0 and "emc_load_pct" not in nano8
    assert nano8["power_mw"] == {"VDD_IN": 4541, "VDD_CPU_GPU_CV": 480, "VDD_SOC": 1403}
    assert input_power_mw(nano8) == 4541
    nano = parse_line(NANO)
    assert nano["gpu_load_pct"] == 99 and nano["swap_used_mb"] == 12 and nano["cpu_load"] == [10, 5, None, None]
    assert nano["power_mw"] == {"POM_5V_IN": 2004, "POM_5V_GPU": 0, "POM_5V_CPU": 327}  # no mW suffix, no IRAM
    assert parse_line("tegrastats: not a sample") is None and parse_line("") is None


def test_tegrastats_sampler_reads_the_tool_on_path(tmp_path, monkeypatch):
    """tegrastats can't exist here: a script on PATH prints real sample lines at the requested interval."""
    from edgekit.agent.tegrastats import TegrastatsSampler, available

    fake = tmp_path / "tegrastats"
    lines = [ORIN_NANO.replace("RAM 2247", f"RAM {2247 + 100 * i}").replace("SWAP 0/", f"SWAP {5 * i}/")
             .replace("GR3D_FREQ 0%", f"GR3D_FREQ {20 * i}%") for i in range(4)]
    fake.write_text("#!%s\nimport sys, time\nassert sys.argv[1:] == ['--interval', '50'], sys.argv\n"
                    "for line in %r:\n    print(line, flush=True)\n    time.sleep(0.05)\ntime.sleep(60)\n"
                    % (sys.executable, lines))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert available()
    t = time.monotonic()
    with TegrastatsSampler(interval_ms=50) as s:
        time.sleep(1.0)
    assert time.monotonic() - t < 10  # the sampler stopped the (still running) tool
    summary = s.summary()
    assert summary["samples"] == 4 and summary["peak_ram_used_mb"] == 2547 and summary["swap_growth_mb"] == 15
    assert summary["gpu_load_pct"] == {"max": 60, "mean": 30.0}
    assert summary["power_mw"]["VDD_IN"] == {"max": 4541, "mean": 4541.0}
    assert [row[1] for row in summary["timeline"]] == [2247, 2347, 2447, 2547]


def test_jetson_facts_from_a_board_tree(tmp_path):
    from edgekit.agent.device import jetson_info, jetpack_for_l4t, parse_l4t

    assert parse_l4t("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64") == "36.4.3"
    assert jetpack_for_l4t("36.4.3") == "6.2" and jetpack_for_l4t("35.4.1") == "5.1.2"
    assert jetpack_for_l4t("32.7.4") == "4.6" and jetpack_for_l4t("99.1") is None
    assert jetson_info(tmp_path) is None  # not a Jetson
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit\0")
    lib = tmp_path / "usr/lib/aarch64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libnvinfer.so.10.3.0").write_text("")
    info = jetson_info(tmp_path)
    assert info["l4t"] == "36.4.3" and info["jetpack"] == "6.2" and info["gpu_sm"] == "8.7"
    assert info["tensorrt"] == "10.3.0" and info["model"].startswith("NVIDIA Jetson Orin Nano")


def test_bundle_round_trip_and_manifest(tmp_path):
    """make_bundle -> extract_bundle restores every file byte for byte, device_tests included."""
    from edgekit.agent.bundle import BundleError, device_tests_dir, extract_bundle, make_bundle
    from edgekit.fsutil import sha256_file

    art = tmp_path / "art"
    art.mkdir()
    (art / "artifact.json").write_text(json.dumps({"backend": "onnxruntime", "precision": "fp32", "files": {}}))
    (art / "model.onnx").write_bytes(os.urandom(3000))
    (art / ".hidden").write_text("not shipped")
    m = make_bundle(art, tmp_path / "b.tar", extra={"job": {"budget_mb": 100}})
    assert m["job"] == {"budget_mb": 100} and "artifact/.hidden" not in m["members"]
    assert {"artifact/model.onnx", "device_tests/test_artifact.py", "device_tests/conftest.py"} <= set(m["members"])
    got = extract_bundle(tmp_path / "b.tar", tmp_path / "x", max_bytes=10 << 20)
    assert got["members"] == m["members"]
    assert sha256_file(tmp_path / "x/artifact/model.onnx") == sha256_file(art / "model.onnx")
    assert ((tmp_path / "x/device_tests/test_artifact.py").read_bytes()
            == (device_tests_dir() / "test_artifact.py").read_bytes())
    with pytest.raises(BundleError, match="declares .* over this agent's cap"):
        extract_bundle(tmp_path / "b.tar", tmp_path / "y", max_bytes=1000)
    (tmp_path / "c.tar").write_bytes((tmp_path / "b.tar").read_bytes()[:5000])
    with pytest.raises(BundleError, match="truncated|lacks"):
        extract_bundle(tmp_path / "c.tar", tmp_path / "z", max_bytes=10 << 20)
    (tmp_path / "d.tar").write_bytes(b"\x1f\x8b" + os.urandom(2000))
    with pytest.raises(BundleError, match="not a readable tar|malformed"):
        extract_bundle(tmp_path / "d.tar", tmp_path / "w", max_bytes=10 << 20)


def test_retention_by_count_age_and_size(tmp_path):
    """keep N jobs / N days / N GB: finished jobs beyond any of the three go, oldest first; the newest stay."""
    from edgekit.agent.jobs import AgentConfig, JobStore

    root = tmp_path / "data" / "jobs"
    ids = [f"20260101-00000{i}-0000000{i}" for i in range(5)]
    for i, jid in enumerate(ids):
        (root / jid / "bundle").mkdir(parents=True)
        (root / jid / "bundle" / "blob").write_bytes(b"\0" * (1 << 20))
        (root / jid / "job.json").write_text(json.dumps({"id": jid, "status": "done" if i % 2 else "failed",
                                                         "submitted_ns": i}))
    old = time.time() - 40 * 86400
    for jid in ids[:2]:
        os.utime(root / jid / "job.json", (old, old))
    logs = []
    store = JobStore(AgentConfig(data_dir=tmp_path / "data", sandbox_user="none", keep_jobs=4, keep_days=30,
                                 keep_gb=2.5 / 1024), log=logs.append)
    try:
        # ids[0]: over 4 jobs and 40 days old; ids[1]: 40 days old; ids[2]: beyond 2.5 MB counting from the newest
        assert sorted(p.name for p in root.iterdir()) == ids[3:]
        assert [j["id"] for j in store.list()] == ids[3:] and "removed 3 finished job(s)" in logs[-1]
    finally:
        store.close()


def test_job_bench_options_are_finite_and_in_range():
    from edgekit.agent.jobs import job_bench_config
    from edgekit.errors import EdgekitError

    assert job_bench_config({"prompt_tokens": 16, "min_seconds": 0.5, "threads": 2}).threads == 2
    for bad in ({"min_seconds": float("nan")}, {"max_seconds": float("inf")}, {"threads": -1}, {"threads": 0},
                {"prompt_tokens": 2.5}, {"new_tokens": True}, {"min_runs": "3"}, {"prompt_tokens": 10**12}):
        with pytest.raises(EdgekitError, match="is not an? (integer|number) in"):
            job_bench_config(bad)
    with pytest.raises(EdgekitError, match="not a JSON object"):
        job_bench_config([1, 2])


def test_job_errors_are_scrubbed_of_absolute_paths(tmp_path):
    from edgekit.agent.jobs import scrub_paths

    folder = tmp_path / "jobs" / "20260101-000000-00000000"
    text = (f"onnxruntime cannot load {folder}/bundle/artifact/model.onnx: [ONNXRuntimeError] at "
            f"/usr/lib/python3/site-packages/onnxruntime/capi/session.py:42; see http://example.com/a/b")
    out = scrub_paths(text, folder)
    assert out == ("onnxruntime cannot load bundle/artifact/model.onnx: [ONNXRuntimeError] at session.py:42; "
                   "see http://example.com/a/b"), out


def test_bench_peak_rss_is_the_benchmark_process_own():
    """Linux keeps ru_maxrss across exec: a benchmark started by a 400 MB parent reported 400 MB as its own peak."""
    import subprocess

    from conftest import cli_env

    child = "from edgekit.runtime.bench import self_peak_rss_mb; print(self_peak_rss_mb())"
    parent = ("import resource, subprocess, sys\n"
              "b = bytearray(400 << 20)\n"
              "b[::4096] = b'x' * len(b[::4096])\n"  # touch every page
              f"out = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out.stdout.strip())\n")
    p = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    parent_mb, child_mb = map(float, p.stdout.split())
    assert parent_mb > 400 and 5 < child_mb < 150, (parent_mb, child_mb)
