from __future__ import annotations

from pathlib import Path

from edgekit.fsutil import atomic_write_json
from edgekit.pipeline import BuildContext, StageResult


class BenchStage:
    name = "bench"

    def describe(self, ctx: BuildContext) -> str:
        if not ctx.options.bench:
            return "skipped (--no-bench)"
        where = f"; then on the device at {ctx.options.device}" if ctx.options.device else ""
        return ("host benchmark: load time, time to first token, prefill/decode tokens/s, latency percentiles, "
                f"peak RSS{where}")

    def config(self, ctx: BuildContext) -> dict:
        from edgekit.runtime.bench import BenchConfig

        d = BenchConfig()
        return {"bench": ctx.options.bench, "seconds": ctx.options.bench_seconds, "threads": ctx.options.threads,
                "device": ctx.options.device, "lengths": [d.prompt_tokens, d.new_tokens, d.min_runs]}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        if not ctx.options.bench:
            return StageResult("passed-through", {"reason": "--no-bench"})
        from edgekit.exporters import get
        from edgekit.runtime import read_artifact
        from edgekit.runtime.bench import BenchConfig, bench_artifact, fit_points

        d = BenchConfig()  # llama-bench's lengths, shortened (and noted) when the artifact's context is shorter
        [(p, n)], notes = fit_points([(d.prompt_tokens, d.new_tokens)],
                                     read_artifact(ctx.artifact).get("max_context"), fixed_prompt=False,
                                     fixed_new=False)
        cfg = BenchConfig(prompt_tokens=p, new_tokens=n, min_seconds=ctx.options.bench_seconds,
                          max_seconds=max(d.max_seconds, ctx.options.bench_seconds), threads=ctx.options.threads)
        if not get(ctx.backend).host_runtime:  # TensorRT: no engine on this machine
            if not ctx.options.device:
                return StageResult("passed-through", {"reason": f"{ctx.backend} engines are built and benchmarked "
                                                      "on the device: add --device URL --token-file F"})
            summary = {"host": "skipped: the engine builds on the device"}
        else:
            report = bench_artifact(ctx.artifact, cfg) | {"notes": notes}
            atomic_write_json(out / "bench.json", report)
            summary = {k: v for k, v in report.items() if k not in ("memory_timeline", "decode_latency_samples_ms",
                                                                    "results", "phases")}
        if ctx.options.device:
            summary["device"] = self._on_device(ctx, cfg, out)
        return StageResult("done", summary)

    def _on_device(self, ctx: BuildContext, cfg, out: Path) -> dict:
        """Push the artifact to the device's agent; its report lands beside bench.json."""
        from dataclasses import asdict

        from edgekit.agent.client import AgentClient, run_on_device
        from edgekit.agent.server import read_token
        from edgekit.errors import EdgekitError

        if not ctx.options.token_file:
            raise EdgekitError("--device needs --token-file", "pass the file holding the agent's token")
        client = AgentClient(ctx.options.device, read_token(Path(ctx.options.token_file)))
        extra = {"bench": asdict(cfg), "target": ctx.target.name,
                 "budget_mb": round(ctx.target.memory.usable_bytes / 2**20, 1)}
        job, report = run_on_device(ctx.artifact, client, extra, timeout=ctx.options.device_timeout, log=ctx.log)
        host = report.get("device", {}).get("hostname") or "device"
        atomic_write_json(out / f"device-report-{host}-{job['id']}.json", report)
        return {"url": ctx.options.device, "job": job["id"], "status": job["status"],
                "metrics": {k: v for k, v in (report.get("bench") or {}).items()
                            if not isinstance(v, (list, dict)) or k in ("decode_latency_ms", "ttft_ms")}}
