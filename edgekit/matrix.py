"""`edgekit bench --matrix`: every backend x precision a target runs, each built through the resumable pipeline, gated
against PyTorch, benchmarked on the host and on any `--device` agents, in one table with the winner picked.

Layout of the output folder DIR:
  DIR/BACKEND-PRECISION/            one build directory per row (the pipeline's manifest and stage folders, so a
                                    killed row resumes at its unfinished stage and redoes no finished one)
  DIR/BACKEND-PRECISION/row.json    the row's finished host record; row-DEVICE.json per device. A rerun whose row
                                    key (model hash, target, backend, precision, options) matches skips the row
  DIR/matrix.json, matrix.md, matrix.html   the table (edgekit/report.py writes the Markdown and the HTML)

Rows are independent builds: each row's plan differs (it pins its precision), so the pipeline's fingerprints keep
them apart; a model that needs pruning is pruned once per row.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from edgekit.errors import EdgekitError, GateFailed
from edgekit.fsutil import atomic_write_json, sha256_json
from edgekit.target import Target

MATRIX_SCHEMA = 1
ROW_FILE = "row.json"
TIE = 0.03  # decode speeds within 3% of the fastest are a tie: run-to-run spread is larger than that (docs/bench.md)
WINNER_RULE = (f"the fastest decode (p50 tokens/s) among the rows of one device that passed their gate and fit the "
               f"target's memory budget; speeds within {TIE:.0%} of the fastest are a tie, which goes to quality "
               f"(lowest mean KL against fp32), then to the smaller file")
HOST = "host"


@dataclass(frozen=True)
class MatrixOptions:
    """What every row shares (the build's flags that apply to all of them)."""

    backends: tuple[str, ...] | None = None  # None: the target's matrix_backends
    precisions: tuple[str, ...] | None = None  # None: the target's precisions
    context_length: int | None = None
    prune_ratio: float | None = None
    distill_steps: int = 0
    bench_seconds: float = 2.0
    threads: int | None = None
    devices: tuple[str, ...] = ()
    token_file: str | None = None
    device_timeout: float = 3600.0


@dataclass(frozen=True)
class RowSpec:
    backend: str
    precision: str | None
    error: str | None = None  # the row cannot be built (a backend the target does not run)

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision or 'none'}"


def plan_rows(target: Target, backends=None, precisions=None) -> list[RowSpec]:
    """Every (backend, precision) the matrix builds: each backend the target runs, at each precision of the target's
    list (or `precisions`) the backend declares. A backend the target cannot run is a row holding its error."""
    from edgekit.exporters import REGISTRY
    from edgekit.precision import get_precision

    runs = target.build.matrix_backends
    asked = tuple(dict.fromkeys(backends)) if backends else runs
    wanted = [get_precision(p).name for p in precisions] if precisions else list(target.build.precisions)
    rows: list[RowSpec] = []
    for b in asked:
        if b not in REGISTRY:
            rows.append(RowSpec(b, None, f"unknown backend {b!r} (edgekit has {', '.join(sorted(REGISTRY))})"))
            continue
        if b not in runs:
            rows.append(RowSpec(b, None, f"{target.name} does not run {b} (its backends: {', '.join(runs)}; a "
                                         f"profile lists more under [build] backends)"))
            continue
        declared = REGISTRY[b].precisions
        ps = [p for p in dict.fromkeys(wanted) if p in declared]
        if not ps:
            rows.append(RowSpec(b, None, f"{b} builds none of the precisions asked ({', '.join(wanted)}; it builds "
                                         f"{', '.join(declared)})"))
        rows += [RowSpec(b, p) for p in ps]
    return rows


def device_label(url: str) -> str:
    u = urlsplit(url)
    return f"{u.hostname}:{u.port}" if u.port else (u.hostname or url)


def _file_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label)


def pick_winners(rows: list[dict]) -> dict[str, str | None]:
    """{device label: id of its winning row, or None} by WINNER_RULE."""
    out: dict[str, str | None] = {}
    for label in dict.fromkeys(r["device"] for r in rows):
        ok = [r for r in rows if r["device"] == label and r["status"] == "ok" and r.get("gate_passed")
              and r.get("fits") and r.get("decode_tps_p50")]
        if not ok:
            out[label] = None
            continue
        best = max(r["decode_tps_p50"] for r in ok)
        tied = [r for r in ok if r["decode_tps_p50"] >= best * (1 - TIE)]
        win = min(tied, key=lambda r: (r.get("mean_kl") if r.get("mean_kl") is not None else float("inf"),
                                       r.get("size_bytes") or 0))
        out[label] = win["id"]
    return out


class Matrix:
    """One run of the matrix: build and bench the host rows in order, then drive every device concurrently."""

    def __init__(self, model, target: Target, out: Path, options: MatrixOptions, log: Callable[[str], None]):
        self.model, self.target, self.out, self.opts, self.log = model, target, Path(out), options, log
        self.budget_mb = round(target.memory.usable_bytes / 2**20, 1)
        self.sha = ""
        self.bandwidth: float | None = None

    # ---------------------------------------------------------------- keys and records
    def _key(self, spec: RowSpec, device: str | None = None) -> str:
        o = self.opts
        return sha256_json({"model": self.sha, "target": self.target.to_dict(), "backend": spec.backend,
                            "precision": spec.precision, "context": o.context_length, "prune": o.prune_ratio,
                            "distill": o.distill_steps, "seconds": o.bench_seconds, "threads": o.threads,
                            "device": device})

    def _cached(self, path: Path, key: str) -> dict | None:
        import json

        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("key") == key else None

    def build_options(self, spec: RowSpec):
        from edgekit.pipeline import BuildOptions

        o = self.opts
        return BuildOptions(backend=spec.backend, precision=spec.precision, context_length=o.context_length,
                            prune_ratio=o.prune_ratio, distill_steps=o.distill_steps, bench=True,
                            bench_seconds=o.bench_seconds, threads=o.threads)

    # ---------------------------------------------------------------- host rows
    def host_row(self, spec: RowSpec) -> dict:
        base = {"id": f"{HOST}:{spec.backend}/{spec.precision or '-'}", "device": HOST, "backend": spec.backend,
                "precision": spec.precision, "status": "error", "error": spec.error, "skipped": False}
        if spec.error:
            return base
        folder = self.out / spec.name
        key = self._key(spec)
        rec = self._cached(folder / ROW_FILE, key)
        if rec:
            self.log(f"matrix: {spec.backend} {spec.precision}: finished earlier, skipped")
            return rec | {"skipped": True}
        t0 = time.perf_counter()
        try:
            rec = base | self._build(spec, folder)
        except GateFailed as e:
            rec = base | {"status": "gate-failed", "error": e.problem} | self._rejected(folder)
        except EdgekitError as e:
            rec = base | {"error": e.line()}
        except Exception as e:  # noqa: BLE001 a bug in one row must not lose the others; the log keeps the type
            rec = base | {"error": f"{type(e).__name__}: {e}"}
        rec |= {"key": key, "build_dir": str(folder), "seconds": round(time.perf_counter() - t0, 1)}
        if rec["status"] != "error":  # an error (a missing package, a crash) is retried on the next run
            atomic_write_json(folder / ROW_FILE, rec)
        if rec.get("error"):
            self.log(f"matrix: {spec.backend} {spec.precision}: {rec['status']}: {rec['error']}")
        return rec

    def _build(self, spec: RowSpec, folder: Path) -> dict:
        from edgekit.exporters import get
        from edgekit.extras import require
        from edgekit.fsutil import check_output
        from edgekit.models import resolve_model
        from edgekit.pipeline import MANIFEST, BuildContext, run_build
        from edgekit.stages.prune import PruneStage

        ref = resolve_model(None if self.model is None else str(self.model))
        require(get(spec.backend).requires, f"building for {spec.backend}")
        check_output(folder, [ref.path], MANIFEST, force=True)
        tag = f"[{spec.backend} {spec.precision}] "
        ctx = BuildContext(target=self.target, model=ref, options=self.build_options(spec), build_dir=folder,
                           model_sha256=self.sha, log=lambda m: self.log(tag + m))
        ctx.plan  # a precision that does not fit the target is this row's error, before anything is written
        PruneStage().check(ctx)
        manifest = run_build(ctx)
        return self._record(manifest, folder)

    def _record(self, manifest: dict, folder: Path) -> dict:
        st = manifest["stages"]
        ex = (st.get("export") or {}).get("result") or {}
        gate = ex.get("gate") or {}
        b = (st.get("bench") or {}).get("result") or {}
        plan = ((st.get("plan") or {}).get("result") or {}).get("chosen") or {}
        rec = {"status": "ok", "error": None, "artifact": manifest.get("artifact"), "size_bytes": ex.get("size_bytes"),
               "planned_mb": round(plan["total_bytes"] / 2**20, 1) if plan.get("total_bytes") else None,
               **_quality(gate)}
        if b.get("decode_tokens_per_s"):
            rec |= _speed(b)
        else:
            rec["note"] = b.get("reason") or "not benchmarked on this host"
        rec |= self._fit(rec)
        if rec["artifact"]:
            from edgekit.runtime.roofline import bytes_read_per_token

            kv_pos = (rec.get("prompt_tokens") or 0) + (rec.get("new_tokens") or 0) / 2
            rec["bytes_read_per_token"] = bytes_read_per_token(Path(rec["artifact"]), kv_pos)["bytes"]
        return rec

    def _rejected(self, folder: Path) -> dict:
        """A row that failed its gate: its figures from the artifact kept in rejected/ (not benchmarked)."""
        import json

        p = folder / "rejected" / "artifact" / "artifact.json"
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError):
            return {"gate_passed": False}
        size = sum(f.stat().st_size for f in p.parent.iterdir() if f.is_file())
        return _quality(meta.get("gate") or {}) | {"size_bytes": size, "artifact": str(p.parent)}

    def _fit(self, rec: dict) -> dict:
        if rec.get("peak_rss_mb") is not None:
            return {"budget_mb": self.budget_mb, "fits": rec["peak_rss_mb"] <= self.budget_mb, "fit_by": "peak RSS"}
        if rec.get("planned_mb") is not None:
            return {"budget_mb": self.budget_mb, "fits": rec["planned_mb"] <= self.budget_mb, "fit_by": "plan"}
        return {"budget_mb": self.budget_mb, "fits": None}

    # ---------------------------------------------------------------- device rows
    def device_rows(self, url: str, host_rows: list[dict], specs: dict[str, RowSpec]) -> list[dict]:
        """Every built row on one agent, in order; any failure is that row's one-line error."""
        from edgekit.agent.client import AgentClient
        from edgekit.agent.server import read_token

        label = device_label(url)
        rows = [r for r in host_rows if r["status"] == "ok" and r.get("artifact")]  # the others show their error
        out, reach_error = [], None
        try:
            if not self.opts.token_file:
                raise EdgekitError("--device needs --token-file", "pass the file holding the agent's token")
            client = AgentClient(url, read_token(Path(self.opts.token_file)))
            dev = client.device()  # unreachable, wrong token: one check, then every row says why
        except EdgekitError as e:
            reach_error, dev = e.line(), {}
        for r in rows:
            spec = specs[r["id"]]
            base = {"id": f"{label}:{spec.backend}/{spec.precision or '-'}", "device": label, "url": url,
                    "backend": spec.backend, "precision": spec.precision, "status": "error", "skipped": False,
                    "error": reach_error}
            if reach_error:
                out.append(base)
                continue
            path = self.out / spec.name / f"row-{_file_label(label)}.json"
            key = self._key(spec, url)
            cached = self._cached(path, key)
            if cached:
                self.log(f"matrix: {label} {spec.backend} {spec.precision}: finished earlier, skipped")
                out.append(cached | {"skipped": True})
                continue
            try:
                rec = base | self._on_device(client, dev, r, label)
            except EdgekitError as e:
                rec = base | {"error": e.line()}
            except Exception as e:  # noqa: BLE001 one device's bug must not lose the other rows
                rec = base | {"error": f"{type(e).__name__}: {e}"}
            rec["key"] = key
            if rec["status"] == "ok":
                atomic_write_json(path, rec)
            else:
                self.log(f"matrix: {label} {spec.backend} {spec.precision}: {rec['error']}")
            out.append(rec)
        return out

    def _on_device(self, client, dev: dict, host: dict, label: str) -> dict:
        from dataclasses import asdict

        from edgekit.agent.client import run_on_device
        from edgekit.runtime.bench import BenchConfig

        d = BenchConfig()
        cfg = BenchConfig(prompt_tokens=host.get("prompt_tokens") or d.prompt_tokens,
                          new_tokens=host.get("new_tokens") or d.new_tokens, min_seconds=self.opts.bench_seconds,
                          max_seconds=max(d.max_seconds, self.opts.bench_seconds), threads=self.opts.threads)
        extra = {"bench": asdict(cfg), "target": self.target.name, "budget_mb": self.budget_mb}
        tag = f"[{label} {host['backend']} {host['precision']}] "
        job, report = run_on_device(Path(host["artifact"]), client, extra, timeout=self.opts.device_timeout,
                                    log=lambda m: self.log(tag + m))
        atomic_write_json(self.out / f"{host['backend']}-{host['precision']}" /
                          f"device-report-{_file_label(label)}-{job['id']}.json", report)
        b = report.get("bench") or {}
        tests = report.get("device_tests") or {}
        rec = {k: host.get(k) for k in ("size_bytes", "mean_kl", "top1_agreement", "perplexity",
                                         "perplexity_ratio", "bytes_read_per_token", "artifact")}
        rec |= {"hostname": (report.get("device") or dev).get("hostname"), "job": job["id"],
                "gate_passed": bool(tests.get("passed_all")), "budget_mb": self.budget_mb,
                "fits": report.get("within_budget"), "fit_by": "peak RSS on the device"}
        if b.get("decode_tokens_per_s"):
            rec |= _speed(b)
        errors = report.get("errors") or []  # a failed device gate is a row that ran and failed it, not an error
        rec |= {"status": "ok" if b.get("decode_tokens_per_s") else "error",
                "error": "; ".join(errors) or (None if job["status"] == "done" else job.get("error"))}
        return rec

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        from edgekit.fsutil import sha256_tree
        from edgekit.models import resolve_model
        from edgekit.runtime.roofline import measure_bandwidth

        specs = plan_rows(self.target, self.opts.backends, self.opts.precisions)
        ref = resolve_model(None if self.model is None else str(self.model))
        self.out.mkdir(parents=True, exist_ok=True)
        self.sha = sha256_tree(ref.path)  # once: every row's key and pipeline share it
        self.log(f"matrix: {len(specs)} rows for {self.target.name} "
                 f"({', '.join(s.name if not s.error else s.backend + ' (error)' for s in specs)}) in {self.out}")
        host = [self.host_row(s) for s in specs]
        by_id = {r["id"]: s for r, s in zip(host, specs)}
        rows = list(host)
        if self.opts.devices:
            results: dict[str, list[dict]] = {}

            def drive(url):
                try:
                    results[url] = self.device_rows(url, host, by_id)
                except Exception as e:  # noqa: BLE001 never lose the other devices
                    results[url] = [{"id": f"{device_label(url)}:-", "device": device_label(url), "url": url,
                                     "backend": "-", "precision": None, "status": "error",
                                     "error": f"{type(e).__name__}: {e}", "skipped": False}]

            threads = [threading.Thread(target=drive, args=(u,), daemon=True) for u in self.opts.devices]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for u in self.opts.devices:
                rows += results.get(u, [])
        # measured only when a host row has a decode speed to hold against it (about a second)
        self.bandwidth = measure_bandwidth(self.opts.threads) if any(
            r["device"] == HOST and r.get("decode_tokens_per_s") for r in rows) else None
        nominal = self.target.memory.bandwidth_gbps * 1e9
        for r in rows:
            bw = self.bandwidth if r["device"] == HOST else nominal
            r["bandwidth_bytes_per_s"] = bw
            r["roofline_fraction"] = (r["decode_tokens_per_s"] * r["bytes_read_per_token"] / bw
                                      if bw and r.get("decode_tokens_per_s") and r.get("bytes_read_per_token")
                                      else None)
        winners = pick_winners(rows)
        first = next((winners[device_label(u)] for u in self.opts.devices if winners.get(device_label(u))), None)
        data = {"schema": MATRIX_SCHEMA, "target": self.target.name, "model": {"source": ref.source,
                "path": str(ref.path), "sha256": self.sha}, "out_dir": str(self.out), "budget_mb": self.budget_mb,
                "bandwidth": {"host_bytes_per_s": self.bandwidth, "method": "numpy copy of 256 MiB, read + write, "
                              "best of 5", "device_bytes_per_s": nominal, "device_method":
                              f"{self.target.name}'s nominal bandwidth_gbps (the device is not measured)"},
                "winner_rule": WINNER_RULE, "winners": winners, "winner": first or winners.get(HOST),
                "rows": [{k: v for k, v in r.items() if k != "key"} for r in rows], "created": _now()}
        from edgekit.report import write_matrix_report

        data["report"] = {k: str(v) for k, v in write_matrix_report(self.out, data).items()}
        atomic_write_json(self.out / "matrix.json", data)
        return data


def _quality(gate: dict) -> dict:
    ppl, ref = gate.get("perplexity"), gate.get("reference_perplexity")
    return {"gate_passed": gate.get("passed"), "gate_failures": gate.get("failures") or [],
            "mean_kl": gate.get("mean_kl"), "top1_agreement": gate.get("top1_agreement"), "perplexity": ppl,
            "reference_perplexity": ref, "perplexity_ratio": ppl / ref if ppl and ref else None}


def _speed(b: dict) -> dict:
    lat = b.get("decode_latency_ms") or {}
    return {"ttft_ms": (b.get("ttft_ms") or {}).get("p50"), "prefill_tokens_per_s": b.get("prefill_tokens_per_s"),
            "decode_tokens_per_s": b.get("decode_tokens_per_s"),
            "decode_tps_p50": 1000 / lat["p50"] if lat.get("p50") else None,
            "decode_tps_p99": 1000 / lat["p99"] if lat.get("p99") else None,  # the slow tail, as tokens/s
            "peak_rss_mb": b.get("peak_rss_mb"), "prompt_tokens": b.get("prompt_tokens"),
            "new_tokens": b.get("new_tokens"), "bench_valid": b.get("valid")}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_matrix(model, target: Target, out: Path, options: MatrixOptions, log=print) -> dict:
    return Matrix(model, target, out, options, log).run()


