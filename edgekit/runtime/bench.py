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
    """One measured point, and what a bundle may ask the agent for (so every field stays a plain number).

    The defaults are llama-bench's (512 prompt tokens, 128 generated, 5 repetitions) with at least 10 s measured per
    point, so a figure covers a realistic context and several runs instead of 2 s of 64 + 32 tokens (docs/bench.md)."""

    prompt_tokens: int = 512
    new_tokens: int = 128
    warmup: int = 1
    min_runs: int = 5  # `-r/--repetitions`: measured runs per point, each a prefill and new_tokens decode steps
    min_seconds: float = 10.0
    max_seconds: float = 300.0
    threads: int | None = None
    prefill_chunk: int = 512  # long prompts are prefilled in chunks, as llama.cpp's n_batch does


# MLPerf-style: a result counts only when it ran long enough and often enough. The loop keeps running until both
# minimums hold, so a point is invalid only when max_seconds cut it short.
VALIDITY_RULE = ("a point is valid when it has at least min_runs measured runs (-r) and they took at least "
                 "min_seconds in total; runs continue until both hold, and stop at max_seconds, which marks the point "
                 "invalid")


def invalid_reason(runs: int, elapsed: float, cfg: BenchConfig) -> str | None:
    if runs >= cfg.min_runs and elapsed >= cfg.min_seconds:
        return None
    return (f"stopped at max_seconds={cfg.max_seconds:g} after {runs} run(s) in {elapsed:.2f} s (the rule asks for "
            f">= {cfg.min_runs} runs and >= {cfg.min_seconds:g} s)")


Point = tuple[int, int]  # (prompt tokens, new tokens)


def sweep(prompts: list[int], news: list[int]) -> list[Point]:
    """Every (prompt, new) pair, prompt-major: `-p 64,128 -n 32` -> (64, 32), (128, 32)."""
    return [(p, n) for p in prompts for n in news]


def fit_points(points: list[Point], limit: int | None, fixed_prompt: bool = True,
               fixed_new: bool = True) -> tuple[list[Point], list[str]]:
    """Points that fit a context of `limit` tokens. A length the user asked for is never changed: a point that does
    not fit is refused. Default lengths are shortened to fit, and each change comes back as a note for the report."""
    from edgekit.errors import EdgekitError

    if limit is None:
        return points, []
    out, notes = [], []
    for p, n in points:
        if p + n > limit:
            n2 = n if fixed_new else min(n, max(1, limit // 4))
            p2 = p if fixed_prompt else limit - n2
            if p2 < 1 or p2 + n2 > limit:
                raise EdgekitError(f"{p} prompt + {n} new tokens exceed the model's context ({limit} tokens)",
                                   f"lower -p/-n so that prompt + new <= {limit}")
            notes.append(f"default -p {p} -n {n} shortened to -p {p2} -n {n2} to fit the model's context ({limit})")
            p, n = p2, n2
        out.append((p, n))
    return list(dict.fromkeys(out)), notes


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (as llama-bench reports avg +- stdev); sd 0 for a single run."""
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


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
        self.epoch0 = time.time()  # lets a child's wall-clock phase marks land on this timeline
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
                "timeline": [list(x) for x in self.timeline[::step]], "epoch0": self.epoch0}


def _prompt(artifact: Path, meta: dict, vocab: int, n: int, reference: Path | None) -> tuple[np.ndarray, str]:
    """Real text when a reference travels with the model (repeated to length), else seeded random ids (what
    llama-bench feeds): speed does not depend on which tokens they are."""
    from edgekit.runtime.base import REFERENCE_FILE
    from edgekit.verify import load_reference

    ref = reference or (Path(artifact) / REFERENCE_FILE if meta.get("source") != "file" else None)
    if ref is not None and Path(ref).is_file():
        return np.resize(load_reference(Path(ref))["input_ids"], n).astype(np.int64), "reference text"
    if vocab < 1:
        from edgekit.errors import EdgekitError
        raise EdgekitError(f"cannot tell the vocabulary size of {artifact}", "put the model's config.json beside it")
    return np.random.default_rng(0).integers(0, vocab, n, dtype=np.int64), "seeded random ids"


def bench_meta(artifact: Path, points: list[Point]) -> dict:
    """artifact.json, or a plain file's description with its context sized to the sweep (llama-bench sets n_ctx to
    prompt + new the same way, and llama.cpp allocates its KV cache for the whole context)."""
    from edgekit.errors import EdgekitError
    from edgekit.runtime import read_model

    meta = read_model(artifact)
    if meta.get("source") == "file":
        need = max(p + n for p, n in points)
        limit = meta.get("max_context")
        if limit and need > limit:
            raise EdgekitError(f"{need} tokens exceed {artifact}'s context ({limit})", f"lower -p/-n to {limit} in all")
        meta = {**meta, "max_context": need}
    return meta


def run_benchmark(artifact: Path, cfg: BenchConfig = BenchConfig(), points: list[Point] | None = None,
                  reference: Path | None = None) -> dict:
    """Load once, then per point repeat prefill + decode runs until both min_runs and min_seconds are met.

    The top level carries the first point's figures (the only point without a sweep); `results` holds every point."""
    from dataclasses import replace

    from edgekit.errors import EdgekitError
    from edgekit.runtime import open_artifact

    artifact = Path(artifact)
    points = points or [(cfg.prompt_tokens, cfg.new_tokens)]
    meta = bench_meta(artifact, points)
    phases = []  # (name, wall-clock start, end): the caller places them on its memory timeline
    w0, t = time.time(), time.perf_counter()
    runner = open_artifact(artifact, threads=cfg.threads, all_logits=False, meta=meta)
    load_s = time.perf_counter() - t
    phases.append(("load", w0, time.time()))
    for p, n in points:
        if p + n > runner.max_context:
            raise EdgekitError(f"{p} prompt + {n} new tokens exceed the model's context ({runner.max_context})",
                               f"lower -p/-n so that prompt + new <= {runner.max_context}")
    ids, prompt_source = _prompt(artifact, meta, int(getattr(runner, "vocab_size", 0) or 0),
                                 max(p for p, _ in points), reference)

    def one_run(prompt, n_new):
        runner.reset()
        t0 = time.perf_counter()
        for i in range(0, len(prompt), cfg.prefill_chunk):
            logits = runner.forward(prompt[i:i + cfg.prefill_chunk])
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(n_new):
            tok = np.array([int(np.argmax(logits[-1]))], dtype=np.int64)
            t1 = time.perf_counter()
            logits = runner.forward(tok)
            steps.append(time.perf_counter() - t1)
        return ttft, steps

    results = []
    for p, n in points:
        pc = replace(cfg, prompt_tokens=p, new_tokens=n)
        prompt = ids[:p]
        w = time.time()
        for _ in range(cfg.warmup):
            one_run(prompt, n)
        if cfg.warmup:
            phases.append((f"warmup p{p} n{n}", w, time.time()))
        ttfts, runs_steps, w = [], [], time.time()
        start = time.perf_counter()
        while True:
            ttft, steps = one_run(prompt, n)
            ttfts.append(ttft)
            runs_steps.append(steps)
            elapsed = time.perf_counter() - start
            if invalid_reason(len(ttfts), elapsed, pc) is None or elapsed >= cfg.max_seconds:
                break
        phases.append((f"p{p} n{n}", w, time.time()))
        reason = invalid_reason(len(ttfts), elapsed, pc)
        decode_ms = [x * 1e3 for s in runs_steps for x in s]
        pre_mean, pre_sd = mean_sd([p / x for x in ttfts])
        dec_mean, dec_sd = mean_sd([n / sum(s) for s in runs_steps])
        results.append({
            "prompt_tokens": p, "new_tokens": n, "runs": len(ttfts), "duration_s": round(elapsed, 3),
            "valid": reason is None, "invalid_reason": reason,
            "ttft_ms": percentiles([x * 1e3 for x in ttfts]),
            # per run: prompt / time to first token, and new tokens / their decode time; mean and sd over runs
            "prefill_tokens_per_s": round(pre_mean, 2), "prefill_tokens_per_s_sd": round(pre_sd, 2),
            "decode_tokens_per_s": round(dec_mean, 2), "decode_tokens_per_s_sd": round(dec_sd, 2),
            "decode_latency_ms": percentiles(decode_ms),
            # A bounded, evenly spaced sample of raw latencies for the report's distribution plot.
            "decode_latency_samples_ms": [round(x, 4) for x in decode_ms[::max(1, len(decode_ms) // 1000)]],
        })
    bad = [f"p{r['prompt_tokens']} n{r['new_tokens']}: {r['invalid_reason']}" for r in results if not r["valid"]]
    return {
        **results[0],
        "backend": meta["backend"],
        "precision": meta["precision"],
        "model": str(artifact),
        "source": meta.get("source", "artifact"),
        "context": runner.max_context,
        "prompt_source": prompt_source,
        "config": asdict(cfg),
        "valid": not bad,
        "invalid_reason": "; ".join(bad) if bad else None,
        "validity_rule": VALIDITY_RULE,
        "load_s": round(load_s, 4),
        "results": results,
        "phases_wall": [[name, a, b] for name, a, b in phases],
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
        result["stderr_tail"] = tail
        result["error"] = ("timed out after %ss" % timeout) if timed_out else (
            f"exit code {proc.returncode}: " + " | ".join(tail))
    return result


def bench_argv(artifact: Path, cfg: BenchConfig, module: str = "edgekit.runtime.bench",
               points: list[Point] | None = None, reference: Path | None = None) -> list[str]:
    """The command line that benchmarks `artifact` in a fresh process (`module` takes the same options)."""
    return [sys.executable, "-m", module, str(artifact), "--json",
            "--prompt-tokens", str(cfg.prompt_tokens), "--new-tokens", str(cfg.new_tokens),
            "--warmup", str(cfg.warmup), "--min-runs", str(cfg.min_runs), "--min-seconds", str(cfg.min_seconds),
            "--max-seconds", str(cfg.max_seconds), "--prefill-chunk", str(cfg.prefill_chunk)] + (
                ["--threads", str(cfg.threads)] if cfg.threads else []) + (
                ["--points", ",".join(f"{p}x{n}" for p, n in points)] if points else []) + (
                ["--reference", str(reference)] if reference else [])


def gate(artifact: Path, reference: Path, precision: str | None = None, threads: int | None = None) -> dict:
    """The fidelity gate of any model (a plain file too) against a shipped reference.npz, with the thresholds of
    `precision` (default: the model's own). Runs in this process: the benchmark's memory is measured apart."""
    from edgekit.errors import EdgekitError
    from edgekit.precision import PRECISIONS, lookup
    from edgekit.runtime import open_artifact, read_model
    from edgekit.verify import compare, load_reference

    meta = read_model(artifact)
    name = precision or meta.get("precision")
    prec = lookup(name) if name else None
    if prec is None:
        raise EdgekitError(f"no gate thresholds for precision {name!r} of {artifact}",
                           f"pass --precision with one of {', '.join(PRECISIONS)} to gate with its thresholds")
    try:
        ref = load_reference(Path(reference))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"cannot read the reference {reference} ({e})",
                           "pass the reference.npz that `edgekit export` wrote beside the model") from e
    if meta.get("source") == "file":  # size a plain file's context to what the gate feeds it
        need = max(len(ref["input_ids"]), len(ref["greedy_prompt"]) + len(ref["greedy_ids"]))
        meta = {**meta, "max_context": min(need, meta.get("max_context") or need)}
    res = compare(ref, open_artifact(artifact, threads=threads, meta=meta), prec.gate)
    return res | {"precision": prec.name, "reference": str(reference)}


def bench_artifact(artifact: Path, cfg: BenchConfig = BenchConfig(), timeout: float = 600,
                   points: list[Point] | None = None, reference: Path | None = None) -> dict:
    """The full host benchmark: a fresh process runs the loop, this one watches its memory. `points` sweeps (prompt,
    new) pairs in that one process; `reference` feeds its text as the prompt (gating is `gate`'s job)."""
    r = measure_subprocess(bench_argv(artifact, cfg, points=points, reference=reference), timeout=timeout)
    if not r["ok"]:
        from edgekit.errors import EdgekitError
        own = [ln[len("error: "):] for ln in r.get("stderr_tail", []) if ln.startswith("error: ")]
        if own and own[-1].endswith(")") and " (fix: " in own[-1]:  # the child's one-line refusal: pass it on
            problem, fix = own[-1][:-1].rsplit(" (fix: ", 1)
            raise EdgekitError(problem, fix)
        raise EdgekitError(f"benchmark of {artifact} failed: {r['error']}", "check that the model loads "
                           "(`edgekit verify ARTIFACT`)")
    report = r["result"]
    mem = r["memory"]
    report["peak_rss_mb"] = mem["peak_rss_mb"]
    report["swap_growth_mb"] = mem["swap_growth_mb"]
    report["memory_timeline"] = mem["timeline"]
    report["memory_timeline_columns"] = ["t_s", "rss_mb", "swap_delta_mb", "cpu_pct"]
    # the child's wall-clock phase marks, on this timeline's clock (seconds since sampling began)
    report["phases"] = [{"name": name, "start_s": round(a - mem["epoch0"], 3), "end_s": round(b - mem["epoch0"], 3)}
                        for name, a, b in report.pop("phases_wall", [])]
    return report


def _points(text: str) -> list[Point]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def bench_main(argv: list[str] | None, prog: str, description: str, benchmark) -> int:
    """The command line shared by every benchmark module: options -> BenchConfig -> one JSON line on stdout.
    `--points`/`--reference` reach `benchmark` only when given (the TensorRT module takes neither)."""
    from edgekit.errors import EdgekitError

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true", help="print the report as one JSON line (always on)")
    d = BenchConfig()
    for name, typ in (("prompt-tokens", int), ("new-tokens", int), ("warmup", int), ("min-runs", int),
                      ("min-seconds", float), ("max-seconds", float), ("threads", int), ("prefill-chunk", int)):
        p.add_argument(f"--{name}", type=typ, default=getattr(d, name.replace("-", "_")))
    p.add_argument("--points", type=_points, help="a sweep: PROMPTxNEW,... (overrides the single point)")
    p.add_argument("--reference", type=Path, help="reference.npz whose text is the prompt")
    a = p.parse_args(argv)
    cfg = BenchConfig(a.prompt_tokens, a.new_tokens, a.warmup, a.min_runs, a.min_seconds, a.max_seconds, a.threads,
                      a.prefill_chunk)
    extra = {k: v for k, v in (("points", a.points), ("reference", a.reference)) if v}
    try:
        print(json.dumps(benchmark(a.artifact, cfg, **extra)))
    except EdgekitError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "python -m edgekit.runtime.bench", "Benchmark one artifact in this process and print a "
                      "JSON report (used by `edgekit bench` and the agent).", run_benchmark)


if __name__ == "__main__":
    raise SystemExit(main())
