"""SmolLM2-135M through the ExecuTorch exporter: size, XNNPACK coverage, fidelity gate and speed per precision.

    PYTHONPATH=$PWD python bench/executorch_smollm2.py [--precisions 8da4w fp32] [--context 1024] [--threads 2]
        [--out /tmp/et-smollm2] [--reuse]

Each precision is exported (lowering takes minutes on a small CPU), gated in ExecuTorch's runtime against PyTorch,
then benchmarked in a fresh process (prefill 64 tokens, decode 32, edgekit.runtime.bench). --reuse skips the export
of an artifact folder that already exists.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", nargs="+", default=["8da4w", "fp32"])
    p.add_argument("--context", type=int, default=1024, help="android-arm64 builds with 1024")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/et-smollm2"))
    p.add_argument("--reuse", action="store_true")
    a = p.parse_args()

    from edgekit.export import ExportConfig, export_model
    from edgekit.models import resolve_model
    from edgekit.runtime.bench import BenchConfig, bench_artifact

    model = resolve_model(None).path
    rows = []
    for prec in a.precisions:
        art = a.out / prec
        t = time.perf_counter()
        if a.reuse and (art / "artifact.json").is_file():
            meta = json.loads((art / "artifact.json").read_text())
        else:
            meta = export_model(model, art, ExportConfig(backend="executorch", precision=prec,
                                                         context_length=a.context, accept_gate_failure=True),
                                log=lambda m: print(m, file=sys.stderr))
        export_s = meta.get("timings_s", {}).get("total", time.perf_counter() - t)
        b = bench_artifact(art, BenchConfig(threads=a.threads))
        g = meta["gate"]
        rows.append((prec, meta["size_bytes"] / 2**20, meta["delegated_subgraphs"], meta["ops_outside_xnnpack"],
                     "pass" if g["passed"] else "FAIL", g["max_abs_logit_delta"], g["top1_agreement"], g["mean_kl"],
                     g["greedy_match"], b["prefill_tokens_per_s"], b["decode_tokens_per_s"], b["peak_rss_mb"],
                     export_s))
    head = ("precision", "size MB", "delegates", "ops outside", "gate", "max|dlogit|", "top-1", "KL", "greedy",
            "prefill tok/s", "decode tok/s", "peak RSS MB", "export s")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in r))
    print(f"\ncontext {a.context}, threads {a.threads}; reproduce: PYTHONPATH=$PWD python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
