from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark an artifact on this machine",
                       description="Load an artifact in a fresh process and measure load time, time to first "
                       "token, prefill and decode tokens/s, decode latency percentiles and peak RSS.",
                       epilog="examples:\n  edgekit bench edgekit-build/x86-cpu/04-export/artifact\n"
                       "  edgekit bench art --seconds 10 --json > bench.json\n"
                       "  edgekit bench art --device http://jetson.local:8765 --token-file token --target jetson-orin",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="an artifact folder (has artifact.json)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-runs", type=int, default=3, help="least number of measured runs")
    p.add_argument("--seconds", type=float, default=2.0, help="least measured duration")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    d = p.add_argument_group("on a device (through `edgekit agent serve` running there)")
    d.add_argument("--device", metavar="URL", help="the agent's URL, e.g. http://jetson.local:8765")
    d.add_argument("--token-file", type=Path, help="file holding the agent's token")
    d.add_argument("--target", help="target profile whose memory budget the device_tests enforce")
    d.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the device's report")
    d.add_argument("-o", "--out", type=Path, help="where to write the device report (default: the build "
                   "directory holding the artifact, else beside it)")
    p.set_defaults(func=run)


def bench_rows(b: dict) -> list[tuple]:
    lat = b["decode_latency_ms"]
    return [("load", f"{b['load_s']:.3f} s"),
            ("time to first token (p50)", f"{b['ttft_ms']['p50']:.2f} ms for {b['prompt_tokens']} tokens"),
            ("prefill", f"{b['prefill_tokens_per_s']:.1f} tokens/s"),
            ("decode", f"{b['decode_tokens_per_s']:.1f} tokens/s"),
            ("decode latency p50/p90/p99", f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} ms"),
            ("peak RSS", f"{b['peak_rss_mb']:.0f} MB"),
            ("runs", f"{b['runs']} in {b['duration_s']:.1f} s ({'valid' if b['valid'] else 'INVALID'})")]


def run(a) -> int:
    from edgekit.commands import check_numbers
    from edgekit.runtime import read_artifact

    check_numbers(a, {"prompt_tokens": (1, None), "new_tokens": (1, None), "warmup": (0, None), "min_runs": (1, None),
                      "seconds": (0, 3600), "threads": (1, 1024), "timeout": (1, None)})
    from edgekit.runtime.bench import BenchConfig, bench_artifact
    from edgekit.ui import print_json, table

    read_artifact(a.artifact)  # a clear error before a subprocess is spent
    cfg = BenchConfig(prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, warmup=a.warmup,
                      min_runs=a.min_runs, min_seconds=a.seconds, threads=a.threads)
    if a.device:
        return run_device(a, cfg)
    report = bench_artifact(a.artifact, cfg)
    if a.json:
        print_json(report)
    else:
        table(f"bench {a.artifact} ({report['backend']} {report['precision']})", bench_rows(report),
              ("metric", "value"))
    return 0


def run_device(a, cfg) -> int:
    """Push the artifact to an agent, follow the job, write the device report into the build directory."""
    from dataclasses import asdict

    from edgekit.agent.client import AgentClient, find_build_dir, run_on_device
    from edgekit.agent.server import read_token
    from edgekit.errors import EdgekitError
    from edgekit.fsutil import atomic_write_json
    from edgekit.ui import log, print_json, progress, table

    if not a.token_file:
        raise EdgekitError("--device needs --token-file", "pass the file holding the agent's token")
    extra = {"bench": asdict(cfg)}
    if a.target:
        from edgekit.target import get_target

        t = get_target(a.target)
        extra |= {"target": t.name, "budget_mb": round(t.memory.usable_bytes / 2**20, 1)}
    client = AgentClient(a.device, read_token(a.token_file))
    with progress("upload", total=100, enabled=not a.json) as advance:
        done = [0]

        def on_bytes(sent, total):
            pct = int(100 * sent / max(total, 1))
            advance(pct - done[0])
            done[0] = pct

        job, report = run_on_device(a.artifact, client, extra, timeout=a.timeout, log=log, progress=on_bytes)
    out = a.out
    if out is None:
        build = find_build_dir(a.artifact)
        host = report["device"].get("hostname") or "device"
        out = (build / "device" if build else a.artifact.resolve().parent) / f"device-report-{host}-{job['id']}.json"
    atomic_write_json(out, report)
    if a.json:
        print_json(report)
    else:
        b = report.get("bench")
        tests = report["device_tests"]
        rows = bench_rows(b) if b else []
        if b and b.get("swap_growth_mb") is not None:
            rows.append(("swap growth", f"{b['swap_growth_mb']:.0f} MB"))
        rows.append(("device_tests", f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors"))
        if report.get("budget_mb"):
            rows.append(("memory budget", f"{report['budget_mb']:.0f} MB: "
                         f"{'within' if report.get('within_budget') else 'OVER'}"))
        table(f"device bench {a.artifact} on {report['device'].get('hostname')} (job {job['id']}, {job['status']})",
              rows, ("metric", "value"))
        log(f"device report written to {out}")
    if job["status"] != "done":
        raise EdgekitError(f"the device job {job['id']} failed: {job.get('error')}",
                           f"read the report at {out} and the agent's log")
    return 0
