"""TensorRT on the device, through trtexec: build the engine from the shipped ONNX (once, with a timing cache),
benchmark it at prefill and decode shapes, and check its logits against the host's PyTorch reference.

There is no per-token Python runner (TensorRT's Python bindings and a CUDA memory API are not in the agent's
dependencies): `load` says so, and `check_reference` / `main` do the device work with trtexec. An engine is tied to
the GPU's SM and the TensorRT version that built it: a mismatch with the artifact's stamp is refused.

`python -m edgekit.runtime.tensorrt ARTIFACT --json` takes runtime.bench's options and prints the same report keys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

PLAN_FILE = "trt.json"
ENGINE_STAMP = "model.engine.json"
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec",)  # JetPack installs it here, off PATH


# -- trtexec output ------------------------------------------------------------------------------------------------
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-\d.eE+]+)\s*ms")
_SUMMARY_LINES = {"Latency": "latency_ms", "GPU Compute Time": "gpu_compute_ms", "Enqueue Time": "enqueue_ms",
                  "H2D Latency": "h2d_ms", "D2H Latency": "d2h_ms"}


def _stats(text: str) -> dict:
    out = {}
    for name, pct, value in _STAT.findall(text):
        out[f"p{pct}" if pct else name] = float(value)
    return out


def parse_trtexec_output(text: str) -> dict:
    """The performance summary and build/load facts from trtexec's log (TensorRT 8.x and 10.x formats; the
    `[date] [I] ` prefix is optional). Missing lines mean missing keys."""
    out: dict = {}
    for line in text.splitlines():
        body = re.sub(r"^(\[[^\]]*\]\s*)*", "", line).strip()  # drop "[11/28/2026-10:00:00] [I] "
        if m := re.match(r"Throughput:\s*([\d.eE+-]+)\s*qps", body):
            out["throughput_qps"] = float(m.group(1))
        elif m := re.match(r"Total Host Walltime:\s*([\d.eE+-]+)\s*s", body):
            out["host_walltime_s"] = float(m.group(1))
        elif m := re.match(r"Total GPU Compute Time:\s*([\d.eE+-]+)\s*s", body):
            out["gpu_compute_total_s"] = float(m.group(1))
        elif m := re.match(r"Engine built in\s*([\d.eE+-]+)\s*sec", body):
            out["engine_build_s"] = float(m.group(1))
        elif m := re.match(r"Engine deserialized in\s*([\d.eE+-]+)\s*sec", body):
            out["engine_load_s"] = float(m.group(1))
        elif m := re.match(r"Timing trace has\s*(\d+)\s*queries over\s*([\d.eE+-]+)\s*s", body):
            out["queries"], out["trace_s"] = int(m.group(1)), float(m.group(2))
        elif m := re.match(r"Warmup completed\s*(\d+)\s*queries over\s*([\d.eE+-]+)\s*ms", body):
            out["warmup_queries"], out["warmup_ms"] = int(m.group(1)), float(m.group(2))
        else:
            for label, key in _SUMMARY_LINES.items():
                if body.startswith(label + ":"):
                    out[key] = _stats(body)
        if m := re.search(r"&&&& (RUNNING|PASSED|FAILED) TensorRT\.trtexec \[TensorRT v(\d+)\]", line):
            if m.group(1) != "RUNNING":
                out["status"] = m.group(1)
            out["tensorrt_version"] = _trt_number(int(m.group(2)))
    return out


def _trt_number(n: int) -> str:
    """trtexec's banner number: 100300 -> 10.3.0 (10.x: MMmmpp), 8601 -> 8.6.1 (8.x: Mmpp)."""
    major, rest = (n // 10000, n % 10000) if n >= 10000 else (n // 1000, n % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def parse_export_times(text: str) -> list[dict]:
    """--exportTimes JSON: one object per query (startInMs/endInMs..., latencyMs, computeMs, ...)."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise EdgekitError("trtexec's --exportTimes file is not a JSON list", "rerun with the same TensorRT version")
    return [d for d in data if isinstance(d, dict)]


def query_latencies_ms(times: list[dict]) -> list[float]:
    """Per-query host latency (latencyMs), else the compute time, else end - start of compute."""
    out = []
    for t in times:
        if "latencyMs" in t:
            out.append(float(t["latencyMs"]))
        elif "computeMs" in t:
            out.append(float(t["computeMs"]))
        elif "startComputeMs" in t and "endComputeMs" in t:
            out.append(float(t["endComputeMs"]) - float(t["startComputeMs"]))
    return out


def parse_export_output(text: str) -> dict[str, np.ndarray]:
    """--exportOutput JSON: [{"name": ..., "dimensions": "1x64x512", "values": [...]}, ...] -> {name: array}."""
    out = {}
    for item in json.loads(text):
        dims = [int(d) for d in str(item["dimensions"]).split("x") if d != ""]
        out[item["name"]] = np.asarray(item["values"], dtype=np.float32).reshape(dims)
    return out


# -- the device ----------------------------------------------------------------------------------------------------
def find_trtexec() -> str:
    exe = shutil.which("trtexec") or next((p for p in TRTEXEC_PATHS if os.access(p, os.X_OK)), None)
    if not exe:
        raise EdgekitError("trtexec is not installed here: TensorRT engines are built on the Jetson itself with "
                           "trtexec, which ships with TensorRT",
                           "run this on the device (JetPack puts it at /usr/src/tensorrt/bin/trtexec; add that "
                           "folder to PATH)")
    return exe


def trtexec_version() -> str | None:
    """TensorRT's version from trtexec's banner, for installs without the Python bindings or the dpkg records."""
    try:
        p = subprocess.run([find_trtexec(), "--help"], capture_output=True, text=True, timeout=60)
    except (EdgekitError, OSError, subprocess.TimeoutExpired):
        return None
    return parse_trtexec_output(p.stdout + p.stderr).get("tensorrt_version")


def device_facts() -> dict:
    """This machine's TensorRT version and GPU SM (Jetson device tree, else nvidia-smi)."""
    from edgekit.agent.device import jetson_info, tensorrt_version

    facts = {"tensorrt_version": tensorrt_version() or trtexec_version(),
             "gpu_sm": (jetson_info() or {}).get("gpu_sm")}
    if not facts["gpu_sm"] and shutil.which("nvidia-smi"):
        p = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        facts["gpu_sm"] = p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None
    return facts


def check_compatible(stamp: dict, device: dict, what: str = "this artifact") -> None:
    """Refuse an engine (or a plan) made for another GPU SM or TensorRT major.minor."""
    from edgekit.exporters.tensorrt import parse_version

    want_trt, have_trt = stamp.get("tensorrt_version"), device.get("tensorrt_version")
    if not have_trt:
        raise EdgekitError("TensorRT is not installed on this device", "install the JetPack release the target names")
    if parse_version(want_trt)[:2] != parse_version(have_trt)[:2]:
        raise EdgekitError(f"{what} is for TensorRT {want_trt}, this device has TensorRT {have_trt}; TensorRT "
                           "engines only run on the version that built them",
                           f"re-export with a --target whose runtime.tensorrt is {have_trt}")
    want_sm, have_sm = str(stamp.get("gpu_sm") or ""), str(device.get("gpu_sm") or "")
    if have_sm and want_sm != have_sm:
        raise EdgekitError(f"{what} is for GPU SM {want_sm}, this device's GPU is SM {have_sm}",
                           f"re-export with a --target whose accelerator.compute_capability is {have_sm}")


def read_plan(artifact: Path) -> dict:
    try:
        return json.loads((Path(artifact) / PLAN_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgekitError(f"{artifact} has no readable {PLAN_FILE} ({e})", "re-export with --backend tensorrt")


def run_trtexec(argv: list[str], cwd: Path, timeout: float = 3600) -> tuple[str, dict]:
    exe = find_trtexec()
    try:
        p = subprocess.run([exe, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgekitError(f"trtexec timed out after {timeout:.0f}s", "raise the job timeout")
    out = p.stdout + p.stderr
    if p.returncode != 0:
        tail = " | ".join(ln.strip() for ln in out.strip().splitlines()[-4:])
        raise EdgekitError(f"trtexec failed (exit {p.returncode}): {tail}", "see the full log; check the TensorRT "
                           "version and free memory")
    return out, parse_trtexec_output(out)


def ensure_engine(artifact: Path, device: dict | None = None, timeout: float = 3600) -> Path:
    """The engine, built here with the plan's trtexec command if absent; refused if stamped for another device."""
    from edgekit.exporters.tensorrt import build_command

    artifact = Path(artifact)
    plan = read_plan(artifact)
    find_trtexec()
    device = device or device_facts()
    check_compatible(plan, device)
    engine = artifact / plan.get("engine", "model.engine")
    stamp_path = artifact / ENGINE_STAMP
    if engine.is_file():
        if not stamp_path.is_file():
            raise EdgekitError(f"{engine} has no {ENGINE_STAMP}: which TensorRT and GPU built it is unknown",
                               f"delete {engine} so it is rebuilt here")
        check_compatible(json.loads(stamp_path.read_text()), device, what=f"the engine {engine.name}")
        return engine
    t = time.perf_counter()
    log, parsed = run_trtexec(build_command(plan), cwd=artifact, timeout=timeout)
    (artifact / "trtexec-build.log").write_text(log)
    from edgekit.fsutil import atomic_write_json

    atomic_write_json(stamp_path, {**device, "built_s": round(time.perf_counter() - t, 2),
                                   "trtexec_build_s": parsed.get("engine_build_s")})
    return engine


def load(path: Path, meta: dict, threads: int | None = None, all_logits: bool = True):
    raise EdgekitError("TensorRT artifacts have no per-token Python runner: the engine runs through trtexec on the "
                       "device", "benchmark with `edgekit bench ARTIFACT --device URL`; check fidelity with the "
                       "bundle's device_tests")


def host_check(artifact: Path, threads: int | None = None) -> dict:
    """Off the device: the gate on the engine's source graph (the shipped fp32 ONNX) through ONNX Runtime. The engine
    itself is checked on the device (`check_reference`, run by device_tests)."""
    from edgekit.runtime import read_artifact, verify_files
    from edgekit.runtime.base import REFERENCE_FILE
    from edgekit.runtime.onnxruntime import load as ort_load
    from edgekit.verify import compare, load_reference, thresholds_for

    artifact = Path(artifact)
    meta = read_artifact(artifact)
    verify_files(artifact, meta)
    res = compare(load_reference(artifact / REFERENCE_FILE), ort_load(artifact, meta, threads=threads),
                  thresholds_for(meta["precision"]))
    return res | {"runtime": "onnxruntime on the engine's source ONNX; the engine is checked on the device"}


def _write_inputs(folder: Path, shapes: dict, values: dict, int64: bool) -> str:
    """Raw little-endian input files for --loadInputs; returns the spec."""
    specs = []
    for name, shape in shapes.items():
        if name in values:
            a = np.asarray(values[name]).reshape(shape)
        elif name.startswith("past_key_values."):
            a = np.zeros(shape, dtype=np.float32)
        else:
            a = np.ones(shape, dtype=np.int64)
        if a.dtype.kind == "i":
            a = a.astype("<i8" if int64 else "<i4")  # TensorRT < 10 runs int64 graph inputs as int32
        f = folder / f"{name}.bin"
        f.write_bytes(a.tobytes())
        specs.append(f"{name}:{f}")
    return ",".join(specs)


def check_reference(artifact: Path) -> dict:
    """The engine's logits over the reference's text (one prefill) vs the PyTorch reference, scored with the gate's
    thresholds. The greedy continuation is not checked: it needs the per-token loop trtexec does not have."""
    from edgekit.exporters.tensorrt import input_shapes, parse_version, shape_spec
    from edgekit.runtime import read_artifact
    from edgekit.runtime.base import REFERENCE_FILE
    from edgekit.verify import load_reference, mean_kl, thresholds_for

    artifact = Path(artifact)
    meta, plan = read_artifact(artifact), read_plan(artifact)
    engine = ensure_engine(artifact)
    ref = load_reference(artifact / REFERENCE_FILE)
    ids = ref["input_ids"].astype(np.int64)
    shapes = input_shapes(plan["inputs"], meta["model"], len(ids), 0)
    int64 = parse_version(plan["tensorrt_version"]) >= (10,)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _write_inputs(Path(tmp), shapes, {"input_ids": ids, "position_ids": np.arange(len(ids))}, int64)
        out_json = Path(tmp) / "out.json"
        run_trtexec([f"--loadEngine={engine.name}", f"--shapes={shape_spec(shapes)}",
                     f"--loadInputs={spec}", f"--exportOutput={out_json}", "--iterations=1", "--warmUp=0",
                     "--duration=0"], cwd=artifact)
        logits = parse_export_output(out_json.read_text())["logits"].reshape(len(ids), -1)
    th = thresholds_for(meta["precision"])
    tail = logits[-len(ref["logits_tail"]):]
    top1 = float((logits.argmax(-1) == ref["top1"]).mean())
    res = {"positions": int(len(ids)), "top1_agreement": top1,
           "max_abs_logit_delta": float(np.abs(tail - ref["logits_tail"]).max()),
           "mean_kl": mean_kl(ref["logits_tail"], tail),
           "greedy_match": None, "note": "engine logits from one trtexec prefill; greedy decoding not checked"}
    from edgekit.verify import judge

    failures = judge(res, th)
    return res | {"failures": failures, "passed": not failures}


def _pcts(samples: list[float]) -> dict:
    from edgekit.runtime.bench import percentiles

    return percentiles(samples) if samples else {}


def benchmark(artifact: Path, cfg) -> dict:
    """Prefill (prompt_tokens, empty cache) and decode (one token after prompt_tokens) timed by trtexec; the same
    report keys as runtime.bench, with trtexec's own summaries under "trtexec"."""
    from dataclasses import asdict

    from edgekit.exporters.tensorrt import bench_command, input_shapes
    from edgekit.runtime import read_artifact

    artifact = Path(artifact)
    meta, plan = read_artifact(artifact), read_plan(artifact)
    t = time.perf_counter()
    engine = ensure_engine(artifact)
    build_s = time.perf_counter() - t
    prompt = max(1, min(cfg.prompt_tokens, plan["context_length"] - 1))
    phases = {"prefill": input_shapes(plan["inputs"], meta["model"], prompt, 0),
              "decode": input_shapes(plan["inputs"], meta["model"], 1, prompt)}
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase, shapes in phases.items():
            times_file = Path(tmp) / f"{phase}.json"
            _, parsed = run_trtexec(bench_command(plan, shapes, 200 * max(cfg.warmup, 0), cfg.min_seconds,
                                                  cfg.min_runs, str(times_file), engine.name), cwd=artifact,
                                    timeout=cfg.max_seconds * 4 + 600)
            lat = query_latencies_ms(parse_export_times(times_file.read_text())) if times_file.is_file() else []
            res[phase] = {"parsed": parsed, "latency_ms": lat}
    pre, dec = res["prefill"], res["decode"]
    runs = min(len(pre["latency_ms"]), len(dec["latency_ms"]))
    duration = min(pre["parsed"].get("host_walltime_s", 0.0), dec["parsed"].get("host_walltime_s", 0.0))
    valid = runs >= cfg.min_runs and duration >= cfg.min_seconds and runs > 0
    pre_med = float(np.median(pre["latency_ms"])) if pre["latency_ms"] else float("nan")
    dec_med = float(np.median(dec["latency_ms"])) if dec["latency_ms"] else float("nan")
    return {
        "backend": meta["backend"], "precision": meta["precision"], "config": asdict(cfg), "runs": runs,
        "duration_s": round(duration, 3), "valid": valid,
        "invalid_reason": None if valid else f"trtexec ran {runs} queries in {duration:.2f}s (asked for "
                                             f"{cfg.min_runs} and {cfg.min_seconds}s)",
        "load_s": dec["parsed"].get("engine_load_s"), "engine_build_s": round(build_s, 2),
        "ttft_ms": _pcts(pre["latency_ms"]),
        "prefill_tokens_per_s": round(prompt / pre_med * 1e3, 2) if pre["latency_ms"] else None,
        "decode_tokens_per_s": round(1e3 / dec_med, 2) if dec["latency_ms"] else None,
        "decode_latency_ms": _pcts(dec["latency_ms"]), "prompt_tokens": prompt,
        "trtexec": {phase: r["parsed"] for phase, r in res.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from edgekit.runtime.bench import bench_main

    # prefill is one-shot here: trtexec runs the engine on whole shapes
    return bench_main(argv, "python -m edgekit.runtime.tensorrt", "Build (if needed) and benchmark a TensorRT "
                      "artifact with trtexec; prints a JSON report.", benchmark)


if __name__ == "__main__":
    raise SystemExit(main())
