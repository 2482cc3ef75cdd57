"""A stand-in for trtexec, which cannot exist on this machine (no GPU, no TensorRT): it speaks trtexec's command line
and file formats (--saveEngine, --loadEngine, --shapes, --loadInputs raw files, --exportOutput / --exportTimes JSON,
the performance summary and the `&&&& PASSED` banner of TensorRT 10.3) and computes with ONNX Runtime on the
engine's source graph, so the device half of the TensorRT path can run end to end in tests. The numbers are ONNX
Runtime's on this CPU, not TensorRT's."""

import json
import sys
import time
from pathlib import Path

import numpy as np

import os

# The TensorRT version it claims, as trtexec's banner number (100300 = 10.3.0); a test may pretend another release.
BANNER = f"[TensorRT v{os.environ.get('FAKE_TRTEXEC_VERSION', '100300')}] # trtexec " + " ".join(sys.argv[1:])


def main() -> int:
    print("&&&& RUNNING TensorRT.trtexec " + BANNER)
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in sys.argv[1:] if a.startswith("--"))
    if "help" in args:
        print("=== Model Options ===\n  --onnx=<file>  ONNX model")
        return 0
    if "saveEngine" in args:
        t = time.perf_counter()
        Path(args["saveEngine"]).write_text("stand-in engine for " + args["onnx"])
        print(f"[11/28/2026-10:00:00] [I] Engine built in {time.perf_counter() - t + 0.5:.4f} sec.")
        print("&&&& PASSED TensorRT.trtexec " + BANNER)
        return 0
    import onnxruntime as ort

    t = time.perf_counter()
    sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    print(f"[11/28/2026-10:00:00] [I] Engine deserialized in {time.perf_counter() - t:.6f} sec.")
    shapes = {}
    for spec in args["shapes"].split(","):
        name, dims = spec.rsplit(":", 1)
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    files = dict(s.rsplit(":", 1) for s in args["loadInputs"].split(",")) if args.get("loadInputs") else {}
    feeds = {}
    for i in sess.get_inputs():
        dtype = np.float32 if "float" in i.type else np.int64  # TensorRT 10 keeps int64 inputs
        if i.name in files:
            feeds[i.name] = np.fromfile(files[i.name], dtype=dtype).reshape(shapes[i.name])
        else:
            feeds[i.name] = (np.zeros if dtype == np.float32 else np.ones)(shapes[i.name], dtype=dtype)
    names = [o.name for o in sess.get_outputs()]
    warm_end = time.perf_counter() + int(args.get("warmUp", 200)) / 1e3
    while time.perf_counter() < warm_end:
        sess.run(None, feeds)
    times, start = [], time.perf_counter()
    duration, iterations = float(args.get("duration", 3)), int(args.get("iterations", 10))
    while len(times) < iterations or time.perf_counter() - start < duration:
        t0 = (time.perf_counter() - start) * 1e3
        outs = sess.run(None, feeds)
        t1 = (time.perf_counter() - start) * 1e3
        times.append({"startComputeMs": t0, "endComputeMs": t1, "computeMs": t1 - t0, "latencyMs": t1 - t0})
    wall = time.perf_counter() - start
    if args.get("exportTimes"):
        Path(args["exportTimes"]).write_text(json.dumps(times))
    if args.get("exportOutput"):
        Path(args["exportOutput"]).write_text(json.dumps([
            {"name": n, "dimensions": "x".join(map(str, o.shape)), "values": o.ravel().tolist()}
            for n, o in zip(names, outs) if n == "logits"]))
    lat = np.array([t["latencyMs"] for t in times])
    stats = ", ".join([f"min = {lat.min():.5f} ms", f"max = {lat.max():.5f} ms", f"mean = {lat.mean():.5f} ms",
                       f"median = {np.median(lat):.5f} ms"] +
                      [f"percentile({q}%) = {np.percentile(lat, q):.5f} ms" for q in (90, 95, 99)])
    print("[11/28/2026-10:00:01] [I] === Performance summary ===")
    print(f"[11/28/2026-10:00:01] [I] Throughput: {len(times) / wall:.3f} qps")
    print(f"[11/28/2026-10:00:01] [I] Latency: {stats}")
    print(f"[11/28/2026-10:00:01] [I] GPU Compute Time: {stats}")
    print(f"[11/28/2026-10:00:01] [I] Total Host Walltime: {wall:.5f} s")
    print("&&&& PASSED TensorRT.trtexec " + BANNER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
