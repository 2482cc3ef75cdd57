"""The agent's persistent job queue: one folder per job under DATA/jobs, one worker thread, one job at a time.

A job's state lives in its job.json (written atomically), so an agent killed at any point restarts with every job
and report it had: queued jobs stay queued, a job that was running is queued again (its measurement was lost).
Each job runs the bundle's device_tests with pytest and the benchmark loop, both in subprocesses with a timeout,
sampling memory (psutil) and, on a Jetson, tegrastats; a runtime that crashes fails its job, never the agent.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from pathlib import Path

from edgekit.agent.bundle import extract_bundle
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_write_json, clean_stale

JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{8}$")
# Backends whose device benchmark is not the generic token loop (same command-line options, same JSON shape).
BENCH_MODULES = {"tensorrt": "edgekit.runtime.tensorrt"}
STATES = ("queued", "running", "done", "failed")


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    max_upload_bytes: int = 4 << 30
    job_timeout_s: float = 3600.0
    tests_timeout_s: float = 1800.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _edgekit_env() -> dict:
    """Subprocesses import the same edgekit as the agent, installed or from a checkout."""
    import edgekit

    root = str(Path(edgekit.__file__).resolve().parent.parent)
    return {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def job_bench_config(raw: dict | None):
    """The bundle may ask for benchmark settings; only BenchConfig's own fields, with their types, are taken."""
    from edgekit.runtime.bench import BenchConfig

    raw = raw or {}
    kw = {}
    for f in fields(BenchConfig):
        if f.name in raw and raw[f.name] is not None:
            v = raw[f.name]
            want = float if "float" in str(f.type) else int
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise EdgekitError(f"bundle bench option {f.name}={v!r} is not a non-negative number",
                                   "rebuild the bundle")
            kw[f.name] = want(v)
    return BenchConfig(**kw)


def parse_junit(path: Path) -> dict:
    """pytest's junit XML (written by our own pytest run, on this machine) -> counts and per-test outcomes."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for tc in suite.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "")[:500]
                break
        cases.append({"name": tc.get("name"), "outcome": outcome, "message": message,
                      "time_s": float(tc.get("time") or 0)})
    counts = {k + ("s" if k == "error" else ""): sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failed", "error", "skipped")}
    return {"tests": cases, **counts, "passed_all": counts["failed"] == counts["errors"] == 0 and counts["passed"] > 0}


class JobStore:
    def __init__(self, cfg: AgentConfig, log=lambda m: print(m, file=sys.stderr, flush=True)):
        self.cfg = cfg
        self.root = Path(cfg.data_dir) / "jobs"
        self.uploads = Path(cfg.data_dir) / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.current: str | None = None
        clean_stale(self.root)
        for p in self.uploads.iterdir():  # half-received uploads of a killed agent
            p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        pending = []
        for job in self.list():
            if job["status"] == "running":
                job.update(status="queued", phase=None, note="requeued: the agent restarted while it ran")
                self._save(job)
            if job["status"] == "queued":
                pending.append((job.get("submitted_ns", 0), job["id"]))
        for _, jid in sorted(pending):  # submission order
            self._queue.put(jid)
        self._worker = threading.Thread(target=self._work, name="edgekit-agent-worker", daemon=True)
        self._worker.start()

    # -- state ------------------------------------------------------------------------------------------------
    def folder(self, jid: str) -> Path:
        if not JOB_ID.match(jid):
            raise KeyError(jid)
        return self.root / jid

    def get(self, jid: str) -> dict | None:
        try:
            p = self.folder(jid) / "job.json"
        except KeyError:
            return None
        try:
            job = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if job["status"] == "queued":
            job["queue_position"] = self.position(jid)
        return job

    def position(self, jid: str) -> int | None:
        with self._queue.mutex:
            q = list(self._queue.queue)
        return q.index(jid) + 1 if jid in q else None

    def list(self) -> list[dict]:
        out = []
        for p in sorted(self.root.iterdir()):
            if JOB_ID.match(p.name) and (job := self.get(p.name)):
                out.append(job)
        return out

    def report(self, jid: str) -> dict | None:
        try:
            return json.loads((self.folder(jid) / "report.json").read_text())
        except (KeyError, OSError, json.JSONDecodeError):
            return None

    def _save(self, job: dict) -> None:
        job = {k: v for k, v in job.items() if k != "queue_position"}
        atomic_write_json(self.folder(job["id"]) / "job.json", job)

    # -- submission -------------------------------------------------------------------------------------------
    def new_upload_path(self) -> Path:
        return self.uploads / f"{secrets.token_hex(8)}.tar"

    def submit(self, tar_path: Path, sha256: str, size: int) -> dict:
        """Validate and extract an uploaded bundle into a new job folder, then queue it. BundleError on bad input."""
        jid = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        tmp = self.root / f".{jid}.tmp-upload"
        try:
            manifest = extract_bundle(tar_path, tmp / "bundle", self.cfg.max_upload_bytes)
            job_opts = manifest.get("job") or {}
            job_bench_config(job_opts.get("bench"))  # refuse bad options now, not in the worker
            budget = job_opts.get("budget_mb")
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
                raise EdgekitError(f"bundle budget_mb={budget!r} is not a positive number", "rebuild the bundle")
            job = {"id": jid, "status": "queued", "phase": None, "created": _now(), "submitted_ns": time.time_ns(),
                   "started": None,
                   "finished": None, "error": None, "bundle_sha256": sha256, "bundle_bytes": size,
                   "backend": manifest.get("backend"), "precision": manifest.get("precision"),
                   "target": job_opts.get("target"), "budget_mb": budget}
            atomic_write_json(tmp / "job.json", job)
            os.replace(tmp, self.root / jid)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            Path(tar_path).unlink(missing_ok=True)
        self._queue.put(jid)
        self.log(f"job {jid}: queued ({job['backend']} {job['precision']}, {size} bytes)")
        return self.get(jid)

    def close(self) -> None:
        self._queue.put(None)

    # -- the worker -------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (jid := self._queue.get()) is not None:
            job = self.get(jid)
            if not job or job["status"] != "queued":
                continue
            self.current = jid
            try:
                self._run(job)
            except Exception as e:  # a bug in the agent must fail this job, not the worker
                job.update(status="failed", phase=None, finished=_now(),
                           error=f"agent error: {type(e).__name__}: {e}")
                self._save(job)
                self.log(traceback.format_exc())
            finally:
                self.current = None

    def _phase(self, job: dict, phase: str) -> None:
        job["phase"] = phase
        self._save(job)
        self.log(f"job {job['id']}: {phase}")

    def _run(self, job: dict) -> None:
        from edgekit.agent.device import device_info
        from edgekit.agent.tegrastats import TegrastatsSampler
        from edgekit.runtime.bench import bench_argv, measure_subprocess

        folder = self.folder(job["id"])
        bundle = folder / "bundle"
        artifact = bundle / "artifact"
        manifest = json.loads((bundle / "bundle.json").read_text())
        opts = manifest.get("job") or {}
        job.update(status="running", started=_now(), error=None)
        self._phase(job, "device_tests")
        t0 = time.perf_counter()
        tests = self._device_tests(bundle, job.get("budget_mb"), folder)

        self._phase(job, "bench")
        cfg = job_bench_config(opts.get("bench"))
        module = BENCH_MODULES.get(job.get("backend"), "edgekit.runtime.bench")
        with TegrastatsSampler() as tegra:
            run = measure_subprocess(bench_argv(artifact, cfg, module), timeout=self.cfg.job_timeout_s,
                                     env=_edgekit_env())
        errors = []
        if not tests["passed_all"]:
            errors.append("device_tests: " + (tests.get("error") or "; ".join(
                f"{c['name']} {c['outcome']}: {c['message']}" for c in tests["tests"]
                if c["outcome"] in ("failed", "error"))))
        bench = None
        if run["ok"]:
            bench = run["result"] | {"peak_rss_mb": run["memory"]["peak_rss_mb"],
                                     "swap_growth_mb": run["memory"]["swap_growth_mb"],
                                     "memory_timeline": run["memory"]["timeline"],
                                     "memory_timeline_columns": ["t_s", "rss_mb", "swap_delta_mb", "cpu_pct"]}
        else:
            errors.append(f"bench: {run['error']}")
        budget = job.get("budget_mb")
        report = {
            "job": job["id"], "created": _now(), "device": device_info(),
            "artifact": {k: manifest.get(k) for k in ("backend", "precision")} | {
                "host_gate": _host_gate(artifact)},
            "target": job.get("target"), "budget_mb": budget,
            "device_tests": tests,
            "bench": bench,
            "within_budget": (bench["peak_rss_mb"] <= budget) if bench and budget else None,
            "tegrastats": tegra.summary(),
            "wall_s": round(time.perf_counter() - t0, 2),
            "errors": errors,
        }
        atomic_write_json(folder / "report.json", report)
        job.update(status="failed" if errors else "done", phase=None, finished=_now(),
                   error="; ".join(errors) or None)
        self._save(job)
        self.log(f"job {job['id']}: {job['status']}" + (f" ({job['error']})" if errors else ""))

    def _device_tests(self, bundle: Path, budget_mb, folder: Path) -> dict:
        xml = folder / "device_tests.xml"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(bundle),
                str(bundle / "device_tests"), f"--artifact={bundle / 'artifact'}", f"--junitxml={xml}"]
        if budget_mb:
            argv.append(f"--budget-mb={budget_mb}")
        t = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=bundle, capture_output=True, text=True, timeout=self.cfg.tests_timeout_s,
                               env={**os.environ, **_edgekit_env()})
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), None
        (folder / "device_tests.log").write_text(out)
        res: dict = {"returncode": rc, "duration_s": round(time.perf_counter() - t, 2)}
        if xml.is_file():
            res |= parse_junit(xml)
        else:
            res |= {"tests": [], "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "passed_all": False}
        if rc is None:
            res["error"] = f"timed out after {self.cfg.tests_timeout_s}s"
        elif not xml.is_file():
            res["error"] = f"pytest exit code {rc}: " + " | ".join(out.strip().splitlines()[-3:])
        return res


def _host_gate(artifact: Path) -> dict | None:
    try:
        gate = json.loads((artifact / "artifact.json").read_text()).get("gate")
    except (OSError, json.JSONDecodeError):
        return None
    return {k: gate.get(k) for k in ("passed", "max_abs_logit_delta", "top1_agreement", "mean_kl")} if gate else None
