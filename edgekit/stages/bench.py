from __future__ import annotations

from pathlib import Path

from edgekit.fsutil import atomic_write_json
from edgekit.pipeline import BuildContext, StageResult


class BenchStage:
    name = "bench"

    def describe(self, ctx: BuildContext) -> str:
        if not ctx.options.bench:
            return "skipped (--no-bench)"
        return "host benchmark: load time, time to first token, prefill/decode tokens/s, latency percentiles, peak RSS"

    def config(self, ctx: BuildContext) -> dict:
        return {"bench": ctx.options.bench, "seconds": ctx.options.bench_seconds, "threads": ctx.options.threads}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        if not ctx.options.bench:
            return StageResult("passed-through", {"reason": "--no-bench"})
        from edgekit.runtime.bench import BenchConfig, bench_artifact

        report = bench_artifact(ctx.artifact, BenchConfig(min_seconds=ctx.options.bench_seconds,
                                                          threads=ctx.options.threads))
        atomic_write_json(out / "bench.json", report)
        return StageResult("done", {k: v for k, v in report.items()
                                    if k not in ("memory_timeline", "decode_latency_samples_ms")})
