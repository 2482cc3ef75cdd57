"""The benchmark loop, torch-free, shared by `edgekit bench` on the host and the agent on the device.

Run as `python -m edgekit.runtime.bench ARTIFACT --json` it measures itself in a fresh process (so peak RSS is the
artifact's, not the caller's); `measure_subprocess` runs it that way and samples RSS/swap/CPU from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 64
    new_tokens: int = 32
    warmup: int = 1
    min_runs: int = 3
    min_seconds: float = 2.0
    max_seconds: float = 60.0
    threads: int | None = None
    prefill_chunk: int = 512  # long prompts are prefilled in chunks, as llama.cpp's n_batch does


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (50, 90, 99)} | {
        "mean": round(float(a.mean()), 4), "n": int(a.size)}


class RssSampler:
    """Samples a process's RSS (and the system's swap use) every `interval` seconds in a thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.02):
        import psutil

        self.proc = psutil.Process(pid)
        self.psutil = psutil
        self.interval = interval
        self.t0 = time.perf_counter()
        self.swap0 = psutil.swap_memory().used
        self.timeline: list[tuple[float, float, float, float]] = []  # (t s, rss MB, swap MB delta, cpu %)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        ps = self.psutil
        try:
            self.proc.cpu_percent(None)
            while not self._stop.is_set():
                with self.proc.oneshot():
                    rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(True))
                    cpu = self.proc.cpu_percent(None)
                self.timeline.append((round(time.perf_counter() - self.t0, 3), round(rss / 2**20, 2),
                                      round((ps.swap_memory().used - self.swap0) / 2**20, 2), cpu))
                self._stop.wait(self.interval)
        except (ps.NoSuchProcess, ps.AccessDenied):
            pass

    def summary(self) -> dict:
        rss = [r for _, r, _, _ in self.timeline] or [0.0]
        swap = [s for _, _, s, _ in self.timeline] or [0.0]
        # Keep the timeline readable in a report: at most ~200 points.
        step = max(1, len(self.timeline) // 200)
        return {"peak_rss_mb": max(rss), "swap_growth_mb": max(0.0, max(swap)),
                "timeline": [list(x) for x in self.timeline[::step]]}


def _prompt(artifact: Path, n: int) -> np.ndarray:
    from edgekit.verify import load_reference
    from edgekit.runtime.base import REFERENCE_FILE

    ids = load_reference(artifact / REFERENCE_FILE)["input_ids"]
    return np.resize(ids, n).astype(np.int64)  # real text, repeated if the prompt is longer


def run_benchmark(artifact: Path, cfg: BenchConfig = BenchConfig()) -> dict:
    """Load once, then repeat prefill + decode runs until both min_runs and min_seconds are met."""
    from edgekit.runtime import open_artifact, read_artifact

    artifact = Path(artifact)
    meta = read_artifact(artifact)
    t = time.perf_counter()
    runner = open_artifact(artifact, threads=cfg.threads, all_logits=False)
    load_s = time.perf_counter() - t
    prompt_n = min(cfg.prompt_tokens, runner.max_context - cfg.new_tokens - 1)
    if prompt_n < 1:
        from edgekit.errors import EdgekitError
        raise EdgekitError(f"the artifact's context ({runner.max_context}) is too short for {cfg.new_tokens} new "
                           "tokens", "lower --new-tokens")
    prompt = _prompt(artifact, prompt_n)

    def one_run():
        runner.reset()
        t0 = time.perf_counter()
        for i in range(0, len(prompt), cfg.prefill_chunk):
            logits = runner.forward(prompt[i:i + cfg.prefill_chunk])
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(cfg.new_tokens):
            tok = np.array([int(np.argmax(logits[-1]))], dtype=np.int64)
            t1 = time.perf_counter()
            logits = runner.forward(tok)
            steps.append(time.perf_counter() - t1)
        return ttft, steps

    for _ in range(cfg.warmup):
        one_run()
    ttfts, steps, runs = [], [], 0
    start = time.perf_counter()
    while True:
        ttft, s = one_run()
        ttfts.append(ttft)
        steps.extend(s)
        runs += 1
        elapsed = time.perf_counter() - start
        if (runs >= cfg.min_runs and elapsed >= cfg.min_seconds) or elapsed >= cfg.max_seconds:
            break
    valid = runs >= cfg.min_runs and elapsed >= cfg.min_seconds
    decode_ms = [x * 1e3 for x in steps]
    return {
        "backend": meta["backend"],
        "precision": meta["precision"],
        "config": asdict(cfg),
        "runs": runs,
        "duration_s": round(elapsed, 3),
        "valid": valid,
        "invalid_reason": None if valid else f"stopped at max_seconds={cfg.max_seconds} after {runs} run(s)",
        "load_s": round(load_s, 4),
        "ttft_ms": percentiles([x * 1e3 for x in ttfts]),
        "prefill_tokens_per_s": round(prompt_n / float(np.median(ttfts)), 2),
        "decode_tokens_per_s": round(1e3 / float(np.median(decode_ms)), 2),
        "decode_latency_ms": percentiles(decode_ms),
        # A bounded, evenly spaced sample of raw latencies for the report's distribution plot.
        "decode_latency_samples_ms": [round(x, 4) for x in decode_ms[::max(1, len(decode_ms) // 1000)]],
        "prompt_tokens": prompt_n,
        "self_peak_rss_mb": self_peak_rss_mb(),
    }


def self_peak_rss_mb() -> float:
    """This process's own peak RSS. Linux keeps RUSAGE_SELF's ru_maxrss across exec, so a benchmark started by a
    big parent (fork, then exec: the agent, pytest) reported the parent's peak: VmHWM is the current image's alone."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 2)
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: kB, but bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 2)


def measure_subprocess(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a command that prints one JSON object last, sampling its memory from outside. Never raises on the
    child's failure: the result says what happened (the agent must keep serving when a runtime crashes)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    with RssSampler(proc.pid) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            timed_out = True
    mem = sampler.summary()
    result: dict = {"returncode": proc.returncode, "timed_out": timed_out, "memory": mem}
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        result["result"] = json.loads(lines[-1])
        result["ok"] = True
    else:
        tail = (err or out).strip().splitlines()[-5:]
        result["ok"] = False
        result["error"] = ("timed out after %ss" % timeout) if timed_out else (
            f"exit code {proc.returncode}: " + " | ".join(tail))
    return result


def bench_argv(artifact: Path, cfg: BenchConfig, module: str = "edgekit.runtime.bench") -> list[str]:
    """The command line that benchmarks `artifact` in a fresh process (`module` takes the same options)."""
    return [sys.executable, "-m", module, str(artifact), "--json",
            "--prompt-tokens", str(cfg.prompt_tokens), "--new-tokens", str(cfg.new_tokens),
            "--warmup", str(cfg.warmup), "--min-runs", str(cfg.min_runs), "--min-seconds", str(cfg.min_seconds),
            "--max-seconds", str(cfg.max_seconds), "--prefill-chunk", str(cfg.prefill_chunk)] + (
                ["--threads", str(cfg.threads)] if cfg.threads else [])


def bench_artifact(artifact: Path, cfg: BenchConfig = BenchConfig(), timeout: float = 600) -> dict:
    """The full host/device benchmark: a fresh process runs the loop, this one watches its memory."""
    r = measure_subprocess(bench_argv(artifact, cfg), timeout=timeout)
    if not r["ok"]:
        from edgekit.errors import EdgekitError
        raise EdgekitError(f"benchmark of {artifact} failed: {r['error']}", "check that the artifact loads "
                           "(`edgekit verify ARTIFACT`)")
    report = r["result"]
    report["peak_rss_mb"] = r["memory"]["peak_rss_mb"]
    report["swap_growth_mb"] = r["memory"]["swap_growth_mb"]
    report["memory_timeline"] = r["memory"]["timeline"]
    return report


def bench_main(argv: list[str] | None, prog: str, description: str, benchmark) -> int:
    """The command line shared by every benchmark module: options -> BenchConfig -> one JSON line on stdout."""
    from edgekit.errors import EdgekitError

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true", help="print the report as one JSON line (always on)")
    for name, typ, default in (("prompt-tokens", int, 64), ("new-tokens", int, 32), ("warmup", int, 1),
                               ("min-runs", int, 3), ("min-seconds", float, 2.0), ("max-seconds", float, 60.0),
                               ("threads", int, None), ("prefill-chunk", int, 512)):
        p.add_argument(f"--{name}", type=typ, default=default)
    a = p.parse_args(argv)
    cfg = BenchConfig(a.prompt_tokens, a.new_tokens, a.warmup, a.min_runs, a.min_seconds, a.max_seconds, a.threads,
                      a.prefill_chunk)
    try:
        print(json.dumps(benchmark(a.artifact, cfg)))
    except EdgekitError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "python -m edgekit.runtime.bench", "Benchmark one artifact in this process and print a "
                      "JSON report (used by `edgekit bench` and the agent).", run_benchmark)


if __name__ == "__main__":
    raise SystemExit(main())
