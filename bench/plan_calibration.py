"""Does the planner's memory model predict what runtimes really use? Predicted total vs peak RSS measured by
`edgekit bench` (a fresh process, sampled from outside), per backend, family and context length.

    python bench/plan_calibration.py [--model DIR_OR_GGUF ...] [--cases onnxruntime:fp32 executorch:fp32 ...]
                                     [--contexts 512 2048] [--work DIR]

--model defaults to the embedded SmolLM2-135M (Llama); pass other families' checkpoints (a folder or a .gguf) to
check the model per family. Exports the artifacts it needs into DIR (default ~/.cache/edgekit/bench/calibration) on
first use. Goal: every prediction within 15% of the measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.exporters import REGISTRY
from edgekit.models import cache_dir, resolve_model
from edgekit.plan import PlanRequest, memory
from edgekit.runtime.bench import BenchConfig, bench_artifact

CASES = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("gguf", "f16"), ("gguf", "q8_0"), ("executorch", "fp32")]
# llama.cpp allocates (and clears) its KV cache and compute buffers for the artifact's whole context at load, so a
# deployment at context C is an artifact exported for C; ONNX Runtime grows its cache with the tokens instead.
PREALLOCATES = {"gguf", "executorch"}


def artifact(model_dir: Path, work: Path, backend: str, precision: str, context: int, accept: bool = False) -> Path:
    from edgekit.export import ExportConfig, export_model

    out = work / (f"{backend}-{precision}" + (f"-ctx{context}" if backend in PREALLOCATES else ""))
    if not (out / "artifact.json").is_file():
        export_model(model_dir, out, ExportConfig(backend=backend, precision=precision, context_length=context,
                                                  accept_gate_failure=accept))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench" / "calibration")
    ap.add_argument("--backends", nargs="+", default=None, help="subset of backends to measure")
    ap.add_argument("--model", nargs="+", default=[None], help="model folders or .gguf files (default: SmolLM2)")
    ap.add_argument("--cases", nargs="+", default=None, help="backend:precision pairs (default: all of CASES)")
    ap.add_argument("--accept-gate-failure", action="store_true",
                    help="measure memory of artifacts that fail their fidelity gate too (recorded per row)")
    a = ap.parse_args()
    cases = [tuple(c.split(":", 1)) for c in a.cases] if a.cases else CASES
    rows = []
    t0 = time.time()
    for spec in a.model:
        model = resolve_model(spec)
        rows += measure(model, cases, a)
    print()
    print(f"{'family':10} {'backend':12} {'prec':6} {'ctx':>5} {'predicted MB':>13} {'measured MB':>12} {'pred/meas':>10}")
    for r in rows:
        print(f"{r['family']:10} {r['backend']:12} {r['precision']:6} {r['context']:5d} {r['predicted_mb']:13.1f} "
              f"{r['measured_peak_rss_mb']:12.1f} {r['ratio']:10.3f}")
    worst = max((abs(r["ratio"] - 1) for r in rows), default=float("nan"))
    print(f"\nworst error {worst:.1%} (goal <= 15%); {time.time() - t0:.0f} s; command: python bench/plan_calibration.py "
          f"--model {' '.join(str(m) for m in a.model if m) or '(default)'} --cases "
          f"{' '.join(f'{b}:{p}' for b, p in cases)} --contexts {' '.join(map(str, a.contexts))}")
    return 0 if worst <= 0.15 else 1


def measure(model, cases, a) -> list[dict]:
    cfg = model.config
    work = a.work / model.path.name
    rows = []
    for backend, precision in cases:
        if backend not in REGISTRY or (a.backends and backend not in a.backends):
            continue
        try:
            REGISTRY[backend].load()
        except Exception as e:  # a backend whose libraries are missing is reported, not fatal
            print(f"skip {backend}: {e}")
            continue
        for ctx in a.contexts:
            try:
                art = artifact(model.path, work, backend, precision,
                               ctx if backend in PREALLOCATES else max(a.contexts), a.accept_gate_failure)
            except EdgekitError as e:  # e.g. a tokenizer a backend cannot embed: reported, the other rows go on
                print(f"skip {cfg['model_type']} {backend} {precision}: {e}", flush=True)
                continue
            new = 16
            b = bench_artifact(art, BenchConfig(prompt_tokens=ctx - new - 1, new_tokens=new, warmup=0, min_runs=1,
                                                min_seconds=0.0, max_seconds=600))
            pred = memory(cfg, backend, precision, PlanRequest(context=ctx))
            measured = b["peak_rss_mb"] * 2**20
            gate = json.loads((art / "artifact.json").read_text())["gate"]["passed"]
            rows.append({"family": cfg["model_type"], "backend": backend, "precision": precision, "context": ctx,
                         "gate_passed": gate,
                         "predicted_mb": round(pred["total_bytes"] / 2**20, 1),
                         "measured_peak_rss_mb": round(b["peak_rss_mb"], 1),
                         "ratio": round(pred["total_bytes"] / measured, 3),
                         "weights_mb": round(pred["weights_bytes"] / 2**20, 1),
                         "kv_mb": round(pred["kv_cache_bytes"] / 2**20, 1),
                         "activations_mb": round(pred["activations_bytes"] / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
