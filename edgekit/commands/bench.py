from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark an artifact on this machine",
                       description="Load an artifact in a fresh process and measure load time, time to first "
                       "token, prefill and decode tokens/s, decode latency percentiles and peak RSS.",
                       epilog="examples:\n  edgekit bench edgekit-build/x86-cpu/04-export/artifact\n"
                       "  edgekit bench art --seconds 10 --json > bench.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="an artifact folder (has artifact.json)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-runs", type=int, default=3, help="least number of measured runs")
    p.add_argument("--seconds", type=float, default=2.0, help="least measured duration")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
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
    from edgekit.runtime import read_artifact
    from edgekit.runtime.bench import BenchConfig, bench_artifact
    from edgekit.ui import print_json, table

    read_artifact(a.artifact)  # a clear error before a subprocess is spent
    cfg = BenchConfig(prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, warmup=a.warmup,
                      min_runs=a.min_runs, min_seconds=a.seconds, threads=a.threads)
    report = bench_artifact(a.artifact, cfg)
    if a.json:
        print_json(report)
    else:
        table(f"bench {a.artifact} ({report['backend']} {report['precision']})", bench_rows(report),
              ("metric", "value"))
    return 0
