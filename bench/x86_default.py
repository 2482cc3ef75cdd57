"""Does `edgekit build --target x86-cpu` (no other options) decode at least 2x faster than the ONNX Runtime fp32
artifact that was the x86-cpu default before issue #15?

    PYTHONPATH=. python bench/x86_default.py [--model DIR] [--work DIR] [--rounds 3] [--seconds 10] [--threads N]
                                             [--ort-build DIR]

Builds the embedded SmolLM2-135M (or --model) twice through the pipeline, gated: once with no options (today's
default: GGUF q8_0 through llama.cpp), once with `--backend onnxruntime --precision fp32` (the old default). Then
benchmarks both in the same run, alternating (default lengths: 512 prompt + 128 new tokens, llama-bench's), each
round a fresh process per artifact, and prints decode tokens/s per round, the best of each and their ratio.
Rerunning reuses the builds (the pipeline skips unchanged stages). --ort-build takes an ONNX Runtime fp32 build
folder already made, e.g. the matrix's DIR/onnxruntime-fp32 (bench/matrix.md), instead of building it again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-x86-default"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--ort-build", type=Path, help="an existing onnxruntime fp32 build folder (has manifest.json)")
    a = ap.parse_args()

    import edgekit

    default = edgekit.build(a.model, target="x86-cpu", out=a.work / "default", bench=False)
    if a.ort_build:
        import json

        from edgekit.api.results import BuildResult

        old = BuildResult.from_manifest(a.ort_build, json.loads((a.ort_build / "manifest.json").read_text()))
        assert (old.backend, old.precision) == ("onnxruntime", "fp32"), (old.backend, old.precision)
    else:
        old = edgekit.build(a.model, target="x86-cpu", backend="onnxruntime", precision="fp32",
                            out=a.work / "ort-fp32", bench=False)
    builds = {f"default ({default.backend} {default.precision})": default, "onnxruntime fp32": old}
    for name, b in builds.items():
        print(f"{name}: {b.artifact}, gate {'passed' if b.passed else 'FAILED'} (top-1 {b.gate.top1_agreement:.3f}, "
              f"KL {b.gate.mean_kl:.3g})")
    best = {name: 0.0 for name in builds}
    for r in range(a.rounds):
        for name, b in builds.items():
            res = edgekit.bench(b.artifact, seconds=a.seconds, threads=a.threads)
            tps = res.decode_tokens_per_s
            best[name] = max(best[name], tps)
            print(f"round {r + 1}: {name}: decode {tps:.1f} tokens/s, prefill {res.prefill_tokens_per_s:.0f} "
                  f"tokens/s, peak RSS {res.peak_rss_mb:.0f} MB")
    (d, dv), (o, ov) = best.items()
    print(f"best: {d} {dv:.1f} tokens/s, {o} {ov:.1f} tokens/s: ratio {dv / ov:.2f}x "
          f"({'meets' if dv >= 2 * ov else 'MISSES'} the 2x goal)")
    return 0 if default.passed and dv >= 2 * ov else 1


if __name__ == "__main__":
    sys.exit(main())
