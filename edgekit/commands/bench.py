from __future__ import annotations

import argparse
from pathlib import Path

# the formats live with the result type (BenchResult.to_csv / to_markdown); the names stay importable from here
from edgekit.api.benchmarking import model_size, write_outputs  # noqa: F401
from edgekit.api.results import CSV_COLUMNS, point_records, to_csv, to_markdown  # noqa: F401

FORMATS = ("table", "md", "csv", "json")


def register(sub) -> None:
    from edgekit.runtime.bench import VALIDITY_RULE, BenchConfig

    d = BenchConfig()
    p = sub.add_parser("bench", help="benchmark an artifact or a plain .gguf/.onnx/.pte on this machine",
                       description="Load a model in a fresh process and measure load time, time to first token, "
                       "prefill and decode tokens/s (mean +- sd over repetitions), decode latency percentiles and "
                       f"peak RSS, for every (prompt, new) pair of -p x -n. Validity: {VALIDITY_RULE}.",
                       epilog="examples:\n  edgekit bench edgekit-build/x86-cpu/04-export/artifact\n"
                       "  edgekit bench model.gguf -p 128,512 -n 128 -r 5 --format md\n"
                       "  edgekit bench art --format csv -o results/      # also writes bench.json/.csv/.md there\n"
                       "  edgekit bench model.onnx --reference art/reference.npz --precision fp32   # gated first\n"
                       "  edgekit bench art --device http://jetson.local:8765 --token-file token --target jetson-orin\n"
                       "  edgekit bench --matrix --target x86-cpu            every backend x precision, one table\n"
                       "  edgekit bench --matrix -t rpi5 model -o m/ --device http://pi1:8765 --device http://pi2:8765 "
                       "--token-file token",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, metavar="MODEL", nargs="?",
                   help="an artifact folder (has artifact.json) or a plain .gguf, .onnx (with KV cache) or .pte file; "
                   "with --matrix: the model to build (default: embedded SmolLM2-135M)")
    p.add_argument("-p", "--prompt-tokens", metavar="N[,N...]",
                   help=f"prompt lengths to sweep (default {d.prompt_tokens}, shortened to fit a shorter context)")
    p.add_argument("-n", "--new-tokens", metavar="N[,N...]",
                   help=f"generated lengths to sweep (default {d.new_tokens}); every -p is paired with every -n")
    p.add_argument("-r", "--repetitions", "--min-runs", dest="repetitions", type=int, default=d.min_runs,
                   help=f"least number of measured runs per point (default {d.min_runs})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"unmeasured runs per point (default {d.warmup})")
    p.add_argument("--seconds", "--min-seconds", dest="seconds", type=float, default=d.min_seconds,
                   help=f"least measured duration per point (default {d.min_seconds:g})")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help=f"stop a point here even if unfinished; it is then marked invalid (default {d.max_seconds:g})")
    p.add_argument("--threads", type=int)
    p.add_argument("--format", choices=FORMATS, default="table", help="stdout: a table (default), llama-bench-style "
                   "Markdown, CSV (one row per point) or the full JSON report")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("-o", "--out", type=Path, metavar="DIR", help="output folder: bench.json, bench.csv and bench.md "
                   "(with --device: the device report; default there: the build directory holding the artifact)")
    g = p.add_argument_group("fidelity gate (plain files are benchmarked ungated unless given a reference)")
    g.add_argument("--reference", type=Path, metavar="NPZ", help="a reference.npz (from `edgekit export`): gate "
                   "against it first (exit 3 on failure) and use its text as the prompt")
    g.add_argument("--precision", help="whose gate thresholds to apply (default: the model's own precision)")
    dv = p.add_argument_group("on a device (through `edgekit agent serve` running there)")
    dv.add_argument("--device", metavar="URL", action="append", help="the agent's URL, e.g. "
                    "http://jetson.local:8765 (with --matrix: repeat it for a fleet, driven concurrently)")
    dv.add_argument("--token-file", type=Path, help="file holding the agent's token")
    dv.add_argument("--target", help="target profile whose memory budget the device_tests enforce")
    dv.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the device's report")
    mx = p.add_argument_group("matrix: which artifact to ship (edgekit/matrix.py; docs in README)")
    mx.add_argument("--matrix", action="store_true", help="build every backend x precision --target runs from MODEL "
                    "(resumably, one build folder per row under -o), gate and benchmark each, print one table and "
                    "the winner: the fastest that passes its gate and fits, ties to quality")
    mx.add_argument("--backends", metavar="B[,B...]", help="with --matrix: only these backends")
    mx.add_argument("--precisions", metavar="P[,P...]", help="with --matrix: only these precisions")
    mx.add_argument("--context", type=int, help="with --matrix: context length to build for (default: the target's)")
    p.set_defaults(func=run)


def _pm(point: dict, key: str, unit: str = "tokens/s") -> str:
    sd = point.get(f"{key}_sd")
    return f"{point[key]:.1f}" + (f" ± {sd:.1f}" if sd is not None else "") + f" {unit}"


def bench_rows(b: dict) -> list[tuple]:
    """The headline figures (the first point) as (metric, value) rows; the build and device tables use these too."""
    lat = b["decode_latency_ms"]
    return [("load", f"{b['load_s']:.3f} s"),
            ("time to first token (p50)", f"{b['ttft_ms']['p50']:.2f} ms for {b['prompt_tokens']} tokens"),
            ("prefill", _pm(b, "prefill_tokens_per_s")),
            ("decode", _pm(b, "decode_tokens_per_s") + (f" ({b['new_tokens']} tokens)" if "new_tokens" in b else "")),
            ("decode latency p50/p90/p99", f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} ms"),
            ("peak RSS", f"{b['peak_rss_mb']:.0f} MB"),
            ("runs", f"{b['runs']} in {b['duration_s']:.1f} s ({'valid' if b['valid'] else 'INVALID'})")]


def run(a) -> int:
    import edgekit.api
    from edgekit.commands import check_numbers

    check_numbers(a, {"repetitions": (1, 100_000), "warmup": (0, 1000), "seconds": (0, 86400),
                      "max_seconds": (1e-3, 86400), "threads": (1, 1024), "timeout": (1, None)})
    fmt = "json" if a.json else a.format
    if a.matrix:
        return run_matrix(a, fmt)
    from edgekit.errors import EdgekitError

    for flag in ("backends", "precisions", "context"):
        if getattr(a, flag) is not None:
            raise EdgekitError(f"--{flag} applies to --matrix only", f"add --matrix, or drop --{flag}")
    if a.artifact is None:
        raise EdgekitError("bench needs a MODEL (an artifact folder or a .gguf/.onnx/.pte file)",
                           "pass the model to benchmark, or --matrix --target T to build and compare every backend")
    if a.device and len(a.device) > 1:
        raise EdgekitError("several --device URLs need --matrix", "pass one --device, or add --matrix")
    a.device = a.device[0] if a.device else None
    if a.device:
        return run_device(a, _device_config(a))
    res = edgekit.api.bench(a.artifact, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                            repetitions=a.repetitions, warmup=a.warmup, seconds=a.seconds, max_seconds=a.max_seconds,
                            threads=a.threads, out=a.out, reference=a.reference, precision=a.precision, verbose=True)
    print_report(res.to_dict(), fmt, a.artifact)
    return 0


def _device_config(a):
    """The one point a device job runs (the same refusals as the host bench, and the device's own)."""
    from edgekit.api.benchmarking import prepare
    from edgekit.errors import EdgekitError
    from edgekit.runtime import read_model

    points, _, cfg = prepare(a.artifact, a.prompt_tokens, a.new_tokens, a)
    if read_model(a.artifact).get("source") == "file":
        raise EdgekitError("--device needs an artifact folder (its reference and hashes travel with it)",
                           "export the model with `edgekit export`, or bench the plain file on this host")
    if len(points) > 1 or a.reference:
        raise EdgekitError("--device runs one ungated point per job" + (" (the device gates with the "
                           "artifact's own reference)" if a.reference else ""),
                           "pass one -p and one -n value and no --reference with --device")
    return cfg


def print_report(report: dict, fmt: str, model: Path) -> None:
    import sys

    from edgekit.ui import log, print_json, table

    if fmt == "json":
        print_json(report)
    elif fmt == "csv":
        sys.stdout.write(to_csv(report))
    elif fmt == "md":
        sys.stdout.write(to_markdown(report))
    else:
        title = f"bench {model} ({report['backend']} {report['precision']})"
        if len(report.get("results") or []) > 1:
            rows = [(r["prompt_tokens"], r["new_tokens"], _pm(r, "prefill_tokens_per_s", ""),
                     _pm(r, "decode_tokens_per_s", ""), f"{r['ttft_p50_ms']:.2f}", f"{r['decode_p50_ms']:.2f}",
                     r["runs"], "yes" if r["valid"] else "NO") for r in point_records(report)]
            table(title + f", peak RSS {report['peak_rss_mb']:.0f} MB", rows,
                  ("prompt", "new", "prefill t/s", "decode t/s", "ttft p50 ms", "decode p50 ms", "runs", "valid"))
        else:
            table(title, bench_rows(report), ("metric", "value"))
        for n in report.get("notes") or []:
            log(f"note: {n}")
        if not report["valid"]:
            log(f"INVALID: {report['invalid_reason']}")


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
    quiet = a.json or a.format == "json"
    extra = {"bench": asdict(cfg)}
    if a.target:
        from edgekit.target import get_target

        t = get_target(a.target)
        extra |= {"target": t.name, "budget_mb": round(t.memory.usable_bytes / 2**20, 1)}
    client = AgentClient(a.device, read_token(a.token_file))
    with progress("upload", total=100, enabled=not quiet) as advance:
        done = [0]

        def on_bytes(sent, total):
            pct = int(100 * sent / max(total, 1))
            advance(pct - done[0])
            done[0] = pct

        job, report = run_on_device(a.artifact, client, extra, timeout=a.timeout, log=log, progress=on_bytes)
    host = report["device"].get("hostname") or "device"
    folder = a.out
    if folder is None:
        build = find_build_dir(a.artifact)
        folder = build / "device" if build else a.artifact.resolve().parent
    out = folder / f"device-report-{host}-{job['id']}.json"
    atomic_write_json(out, report)
    if quiet:
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


def run_matrix(a, fmt: str) -> int:
    import edgekit.api
    from edgekit.errors import EdgekitError
    from edgekit.ui import log, print_json, table

    if not a.target:
        raise EdgekitError("--matrix needs --target", "pass --target NAME (see `edgekit targets list`)")
    if fmt not in ("table", "json", "md"):
        raise EdgekitError(f"--format {fmt} does not apply to --matrix", "pass --format table, md or json (--json)")
    res = edgekit.api.bench_matrix(a.artifact, target=a.target, out=a.out, backends=a.backends,
                                   precisions=a.precisions, context=a.context, bench_seconds=a.seconds,
                                   threads=a.threads, devices=a.device or (), token_file=a.token_file,
                                   timeout=a.timeout, verbose=fmt != "json")
    data = res.to_dict()
    if fmt == "json":
        print_json(data)
    elif fmt == "md":
        from edgekit.report import matrix_markdown

        print(matrix_markdown(data))
    else:
        from edgekit.report import MATRIX_HEADERS, _matrix_notes, matrix_table

        table(f"matrix {data['target']}: {data['model']['source']} ({res.out_dir})", matrix_table(data),
              MATRIX_HEADERS)
        for n in _matrix_notes(data):
            log(n)
        log(f"report: {data['report']['html']} (and matrix.md, matrix.json)")
    return 0 if any(r.status != "error" for r in res.rows) else 1
