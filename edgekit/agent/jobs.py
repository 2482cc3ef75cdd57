"""The agent's persistent job queue: one folder per job under DATA/jobs, one worker thread, one job at a time.

A job's state lives in its job.json (written atomically), so an agent killed at any point restarts with every job
and report it had: queued jobs stay queued, a job that was running is queued again (its measurement was lost) once
the processes it left behind are killed. Each job runs the bundle's device_tests with pytest and the benchmark loop,
both in subprocesses in their own session (process group), under RLIMIT_AS, with a timeout that kills the whole
tree; a runtime that crashes fails its job, never the agent, and no exception (a full disk included) stops the
worker: the job fails with its reason and the next one runs.

Job processes are sandboxed as far as the system allows: another uid when the agent runs as root (`nobody` unless
configured), an environment of a few allowlisted variables (never the agent's own), a private TMPDIR and HOME in
the job folder, no new privileges (setuid binaries don't elevate), and no network where a namespace can be made.
"""

from __future__ import annotations

import errno
import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from pathlib import Path

from edgekit.agent.bundle import BundleError, extract_bundle
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_write_json, clean_stale

JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{8}$")
# Backends whose device benchmark is not the generic token loop (same command-line options, same JSON shape).
BENCH_MODULES = {"tensorrt": "edgekit.runtime.tensorrt"}
STATES = ("queued", "running", "done", "failed")
MARKER_ENV = "EDGEKIT_AGENT_JOB"  # every job process carries its job id, so escaped or orphaned ones can be found
# CUDA reserves far more address space than it uses: RLIMIT_AS would break it, so these run without it.
NO_RLIMIT_AS = {"tensorrt"}
# Of the agent's environment, job processes get only what runtimes need to find their tools and libraries (plus
# the names passed with --job-env): never the agent's own variables, whatever their names.
JOB_ENV_KEEP = re.compile(r"^(PATH|LANG|LANGUAGE|LC_[A-Z]+|TZ|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|CUDA_[A-Z_]+"
                          r"|NVIDIA_[A-Z_]+|OMP_[A-Z_]+|OPENBLAS_[A-Z_]+|MKL_[A-Z_]+)$")
# What a job's error output says when it ran out of memory (Python, C++ runtimes, glibc, llama.cpp, ORT).
OUT_OF_MEMORY = re.compile(r"MemoryError|std::bad_alloc|Cannot allocate memory|out of memory|failed to allocate"
                           r"|ENOMEM", re.I)
MAX_CONTEXT = 1 << 24  # no artifact addresses more tokens than this
# Upper bounds of the bench options a bundle may ask for (beyond them a job only burns the device's time).
BENCH_LIMITS = {"prompt_tokens": 1 << 20, "new_tokens": 1 << 20, "warmup": 1000, "min_runs": 100_000,
                "min_seconds": 86400.0, "max_seconds": 86400.0, "threads": 4096, "prefill_chunk": 1 << 20}
BENCH_MIN = {"threads": 1, "prefill_chunk": 1, "prompt_tokens": 1, "new_tokens": 1, "min_runs": 1}
TAIL_BYTES = 64 << 10
# A job process (argv: limit uid gid command...): the address-space limit, soft and hard (an unprivileged job
# cannot raise it back), no new privileges, the sandbox uid (after any `unshare`, which needs root), then the real
# command (no shell, no preexec_fn in threads).
LAUNCH = ("import ctypes, os, resource, sys\n"
          "n, uid, gid = map(int, sys.argv[1:4])\n"
          "if n > 0:\n"
          "    hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
          "    n = n if hard == resource.RLIM_INFINITY else min(n, hard)\n"
          "    resource.setrlimit(resource.RLIMIT_AS, (n, n))\n"
          "try:\n"
          "    ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS\n"
          "except (OSError, AttributeError):\n"
          "    pass\n"
          "if uid >= 0:\n"
          "    os.setgroups([])\n"
          "    os.setgid(gid)\n"
          "    os.setuid(uid)\n"
          "os.execv(sys.argv[4], sys.argv[4:])\n")
# Run as the sandbox user at start: the agent's Python and edgekit load, DATA/jobs is reachable, the token is not.
SANDBOX_PROBE = ("import os, sys\n"
                 "import edgekit.runtime.bench\n"
                 "os.stat(sys.argv[1])\n"
                 "if sys.argv[2]:\n"
                 "    try:\n"
                 "        open(sys.argv[2]).close()\n"
                 "    except OSError:\n"
                 "        pass\n"
                 "    else:\n"
                 "        sys.exit(3)\n")


class NoSpace(EdgekitError):
    """The device's disk is (nearly) full: HTTP 507 for an upload, a failed job in the worker."""


class Cancelled(Exception):
    pass


class Stopping(Exception):
    """The agent is shutting down: the job stays `running` on disk and is requeued at the next start."""


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    max_upload_bytes: int = 4 << 30
    job_timeout_s: float = 3600.0
    tests_timeout_s: float = 1800.0
    min_free_mb: float = 512.0  # uploads and jobs are refused when the data dir has less free space than this
    job_memory_mb: float | None = None  # RLIMIT_AS of job processes; None: RAM + swap of the device, 0: none
    keep_jobs: int = 100  # retention of finished jobs (folder, bundle, report); 0: no limit
    keep_days: float = 0.0  # finished jobs older than this are removed; 0: no limit
    keep_gb: float = 20.0  # finished jobs beyond this total size are removed, oldest first; 0: no limit
    # on / off (job processes in a network namespace of their own: no network at all) / auto: off where it can be
    job_network: str = "auto"
    # the uid job processes run as: auto (nobody when the agent is root, else the agent's own), a user name, none
    sandbox_user: str = "auto"
    job_env: tuple[str, ...] = ()  # more variables of the agent's environment that jobs get
    token_file: Path | None = None  # checked unreadable by the sandbox user at start


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _edgekit_env() -> dict:
    """Subprocesses import the same edgekit as the agent, installed or from a checkout."""
    import edgekit

    root = str(Path(edgekit.__file__).resolve().parent.parent)
    return {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def device_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total + psutil.swap_memory().total)


def thread_reserve_bytes() -> int:
    """Address space runtimes reserve beyond what they use: each thread's glibc malloc arena (64 MB) and stack. A
    tiny Llama benchmark measured VmPeak 330 MB at 2 threads, 720 at 8, 1,310 at 16 against 60-80 MB of RSS, with
    ONNX Runtime and llama.cpp alike (~74 MB per thread), so the default RLIMIT_AS is RAM + swap plus this much for
    one thread per core and a few more, and a job that fits in RAM is not refused for its reservations."""
    return ((os.cpu_count() or 1) + 4) * (80 << 20)


def _finite_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def job_bench_config(raw: dict | None):
    """The bundle may ask for benchmark settings; only BenchConfig's own fields, with their types and in range."""
    from edgekit.runtime.bench import BenchConfig

    if raw is not None and not isinstance(raw, dict):
        raise EdgekitError("bundle bench options are not a JSON object", "rebuild the bundle")
    raw = raw or {}
    kw = {}
    for f in fields(BenchConfig):
        if f.name in raw and raw[f.name] is not None:
            v = raw[f.name]
            want = float if "float" in str(f.type) else int
            lo, hi = BENCH_MIN.get(f.name, 0), BENCH_LIMITS.get(f.name, 1 << 20)
            if (not _finite_number(v) or not lo <= v <= hi or (want is int and v != int(v))):
                kind = "an integer" if want is int else "a number"
                raise EdgekitError(f"bundle bench option {f.name}={v!r:.40} is not {kind} in {lo}..{hi}",
                                   "rebuild the bundle with in-range benchmark options")
            kw[f.name] = want(v)
    return BenchConfig(**kw)


def estimate_memory_bytes(meta: dict, artifact: Path, context: int) -> int:
    """The planner's memory model (the backend's registry entry) for the artifact as shipped: its files (weights), the
    KV cache at `context` tokens, one prefill chunk's attention buffers, the runtime's fixed overhead."""
    from edgekit.exporters import REGISTRY, RuntimeMemory
    from edgekit.precision import KV_CACHES

    spec = REGISTRY.get(meta.get("backend"))
    rt = spec.memory if spec else RuntimeMemory(overhead_mb=100, kv_bytes=4)
    m = meta.get("model") if isinstance(meta.get("model"), dict) else {}

    def dim(key, default):
        v = m.get(key)
        return int(v) if _finite_number(v) and 0 < v < 1 << 24 else default

    heads = dim("num_heads", 1)
    layers, kv_heads = dim("num_layers", 1), dim("num_kv_heads", heads)
    head_dim = dim("head_dim", max(1, dim("hidden_size", 64) // heads))
    weights = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    kv_el = rt.kv_element_bytes(True, meta.get("kv_cache")) if meta.get("kv_cache") in KV_CACHES else rt.kv_bytes
    kv = layers * kv_heads * head_dim * context * 2 * kv_el * rt.kv_copies
    chunk = min(512, context)
    act = 4 * chunk * (rt.attn_buffers * heads * context + 4 * dim("hidden_size", 64))
    head = 0
    if rt.head_twice_at_load:  # the LM head's second copy while XNNPACK packs it (fp32: the worst case)
        head = 4 * dim("vocab_size", 0) * dim("hidden_size", 64)
    return int(weights + head + kv + act + rt.overhead_mb * 2**20)


def check_artifact_fits(artifact: Path, limit_bytes: int) -> dict:
    """Refuse, before anything loads it, an artifact.json whose max_context the device cannot hold."""
    try:
        raw = (artifact / "artifact.json").read_bytes()
    except OSError:
        raise BundleError("the bundle carries no readable artifact/artifact.json", "bundle an artifact folder")
    from edgekit.agent.bundle import _load_json

    meta = _load_json(raw, "artifact/artifact.json")
    ctx = meta.get("max_context")
    if ctx is not None and (type(ctx) is not int or not 1 <= ctx <= MAX_CONTEXT):
        raise BundleError(f"artifact.json max_context={ctx!r:.40} is not an integer in 1..{MAX_CONTEXT}",
                          "re-export the artifact with a sane --context")
    if ctx is None:
        m = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        ctx = m.get("max_position_embeddings")
        ctx = ctx if type(ctx) is int and 1 <= ctx <= MAX_CONTEXT else 2048
    need = estimate_memory_bytes(meta, artifact, ctx)
    if limit_bytes and need > limit_bytes:
        raise BundleError(f"the artifact's context of {ctx} tokens needs about {need >> 20} MB (weights, KV cache, "
                          f"buffers), over this device's {limit_bytes >> 20} MB", "export it with a smaller --context")
    return {"max_context": ctx, "estimated_mb": need >> 20}


_ABS_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s'\"():,\[\]]+/)+([^\s'\"():,\[\]/]+)")


def scrub_paths(text: str | None, folder: Path | None = None) -> str | None:
    """Job errors are read by token holders: paths relative to the job folder, other absolute paths as their name."""
    if not text:
        return text
    if folder is not None:
        text = text.replace(str(folder) + "/", "").replace(str(folder), ".")
    return _ABS_PATH.sub(lambda m: m.group(1), text)


def _tail(path: Path, n: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def job_processes(marker: str, pgid: int | None = None) -> list:
    """Processes of a job: its process group, and any that carry its marker (they left the group with setsid)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if (pgid and os.getpgid(p.pid) == pgid) or p.environ().get(MARKER_ENV) == marker:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def kill_job_tree(marker: str, pgid: int | None) -> int:
    """SIGKILL a job's whole tree (group and marked escapees); returns how many processes were killed."""
    import psutil

    if pgid and pgid != os.getpgid(0):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    victims = job_processes(marker, pgid)
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 5
    for p in victims:  # gone, or a zombie its new parent has yet to reap (not every container's init reaps)
        while time.monotonic() < deadline:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
    return len(victims)


def no_network_prefix() -> list[str]:
    """The command prefix that runs a job process without any network (a fresh network namespace: not even the
    agent's loopback port). EdgekitError when this system cannot make one."""
    unshare = shutil.which("unshare")
    prefix = [unshare, "--net"] if unshare else []
    if unshare and os.geteuid() != 0:
        prefix = [unshare, "--map-root-user", "--net"]  # an unprivileged user namespace, where the kernel allows
    try:
        ok = bool(prefix) and subprocess.run(prefix + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise EdgekitError("--job-network off needs `unshare --net` (util-linux) and a kernel that lets this user "
                           "create a network namespace", "run the agent as root, or leave the network on")
    return prefix + ["--"]


def quiet_log(log):
    """The agent's log must never stop it: a full disk under its stderr file drops the line, not the worker."""
    def write(message: str) -> None:
        try:
            log(message)
        except (OSError, ValueError):
            pass

    return write


def job_env(jid: str, tmp: Path, extra: tuple[str, ...] = ()) -> dict:
    """An allowlist of the agent's environment (JOB_ENV_KEEP and `extra`), the job marker, TMPDIR and HOME in `tmp`."""
    env = {k: v for k, v in os.environ.items() if JOB_ENV_KEEP.match(k) or k in extra}
    return {**env, **_edgekit_env(), MARKER_ENV: jid, "HOME": str(tmp), "TMPDIR": str(tmp), "TEMP": str(tmp),
            "TMP": str(tmp)}


@dataclass(frozen=True)
class Sandbox:
    user: str
    uid: int
    gid: int


def resolve_sandbox(name: str) -> Sandbox | None:
    """The user job processes run as (None: the agent's own). Only root can switch, so `auto` is `nobody` as root."""
    import pwd

    root = os.geteuid() == 0
    if name in ("none", "") or (name == "auto" and not root):
        return None
    name = "nobody" if name == "auto" else name
    if not root:
        raise EdgekitError(f"--sandbox-user {name} needs the agent to run as root (only root can switch users)",
                           "run the agent as root, or leave --sandbox-user at its default")
    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise EdgekitError(f"--sandbox-user {name} is not a user of this system",
                           "create one (useradd --system edgekit-job) or name an existing unprivileged user")
    if pw.pw_uid == 0:
        raise EdgekitError(f"--sandbox-user {name} is root", "name an unprivileged user, or pass --sandbox-user none")
    return Sandbox(pw.pw_name, pw.pw_uid, pw.pw_gid)


def hand_over(path: Path, sb: Sandbox) -> None:
    """Give a folder the agent wrote (a job's bundle or TMPDIR) to the sandbox user, links left alone."""
    os.lchown(path, sb.uid, sb.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), sb.uid, sb.gid)


def parse_junit(path: Path) -> dict:
    """pytest's junit XML (written by the job, so by the bundle's code: no links followed, at most 16 MB) -> counts
    and per-test outcomes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("junit XML is not a regular file")
        data = f.read((16 << 20) + 1)
    if len(data) > 16 << 20:
        raise ValueError("junit XML over 16 MB")
    root = ET.fromstring(data)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise ValueError("no testsuite")
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
        self.data_dir = Path(cfg.data_dir)
        self.root = self.data_dir / "jobs"
        self.uploads = self.data_dir / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.log = quiet_log(log)
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._unsaved: dict[str, dict] = {}  # states the disk refused (full): served from memory, saved when it can
        self._cancel: set[str] = set()
        self._closing = False
        self._proc: tuple[str, int] | None = None  # (job id, pgid) of the process running now
        self.current: str | None = None
        mem = cfg.job_memory_mb
        # What an artifact may need (checked at upload) and the RLIMIT_AS of job processes. On a Jetson the
        # runtimes may be CUDA builds, and CUDA reserves far more address space than it uses: no RLIMIT_AS there
        # unless --job-memory-mb asks for one.
        self.memory_budget = int(mem * 2**20) if mem else device_memory_bytes()
        if mem is None:
            from edgekit.agent.device import jetson_info

            self.memory_limit = 0 if jetson_info() else device_memory_bytes() + thread_reserve_bytes()
        else:
            self.memory_limit = int(mem * 2**20)
        if cfg.job_network not in ("on", "off", "auto"):
            raise EdgekitError(f"--job-network {cfg.job_network!r:.40} is not on, off or auto", "pass one of them")
        try:
            self.prefix = [] if cfg.job_network == "on" else no_network_prefix()
        except EdgekitError:
            if cfg.job_network == "off":
                raise
            self.prefix = []  # auto: the network stays on where this system cannot make a namespace
        self.sandbox = resolve_sandbox(cfg.sandbox_user)
        if self.sandbox:
            self.root.chmod(0o711)  # the sandbox user may reach its own job folder, not list the others
            self.uploads.chmod(0o700)
            self._probe_sandbox()
        who = f"user {self.sandbox.user}" if self.sandbox else "the agent's own user"
        space = f"{self.memory_limit >> 20} MB" if self.memory_limit else "unlimited"
        self.log(f"agent: jobs run as {who}, network {'off' if self.prefix else 'on'}, address space {space}")
        clean_stale(self.root)
        for p in self.uploads.iterdir():  # half-received uploads of a killed agent
            p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        pending = []
        for job in self.list():
            if job["status"] == "running":
                killed = self._kill_orphans(job)
                job.update(status="queued", phase=None, process=None,
                           note="requeued: the agent restarted while it ran" + (
                               f" ({killed} leftover process(es) of the earlier run killed)" if killed else ""))
                self._save(job)
            if job["status"] == "queued":
                pending.append((job.get("submitted_ns", 0), job["id"]))
        for _, jid in sorted(pending):  # submission order
            self._queue.put(jid)
        self._retain()
        self._worker = threading.Thread(target=self._work, name="edgekit-agent-worker", daemon=True)
        self._worker.start()

    def _probe_sandbox(self) -> None:
        """Refuse to start when the sandbox user cannot run the agent's Python, reach DATA/jobs, or can read the
        token: better one line now than every job failing (or a token holder reading the token) later."""
        sb, token = self.sandbox, self.cfg.token_file
        argv = [*self.prefix, sys.executable, "-c", LAUNCH, "0", str(sb.uid), str(sb.gid), sys.executable, "-c",
                SANDBOX_PROBE, str(self.root), str(Path(token).absolute()) if token else ""]
        try:
            p = subprocess.run(argv, cwd="/", env=job_env("probe", Path("/nonexistent"), self.cfg.job_env),
                               capture_output=True, text=True, timeout=60)
            rc, why = p.returncode, (p.stderr.strip().splitlines() or [""])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            rc, why = -1, str(e)
        if rc == 3:
            raise EdgekitError(f"the token file {token} is readable by {sb.user}, the user jobs run as",
                               f"chmod 600 {token} (or keep it in a folder only root can enter)")
        if rc != 0:
            raise EdgekitError(f"jobs run as user {sb.user} (the agent runs as root), who cannot run "
                               f"{sys.executable} with edgekit or reach {self.root} ({_printable(why, 160)})",
                               "install the agent and --data-dir where that user can read them (a venv in /opt, "
                               "/var/lib/edgekit-agent), name another --sandbox-user, or pass --sandbox-user none "
                               "to run jobs as root")

    def _kill_orphans(self, job: dict) -> int:
        """Processes of the run the last agent was doing: its recorded group (if the leader is still the process it
        recorded) and every process marked with the job's id."""
        import psutil

        rec = job.get("process") or {}
        pgid = None
        pid = rec.get("pid")
        if type(pid) is int and pid > 1:
            try:
                if abs(psutil.Process(pid).create_time() - float(rec.get("create_time") or 0)) < 0.05:
                    pgid = pid  # the leader is still ours: its group is ours
            except psutil.Error:
                pass
        killed = kill_job_tree(job["id"], pgid)
        if killed:
            self.log(f"job {job['id']}: killed {killed} process(es) left by the earlier agent")
        return killed

    # -- state ------------------------------------------------------------------------------------------------
    def folder(self, jid: str) -> Path:
        if not isinstance(jid, str) or not JOB_ID.match(jid):
            raise KeyError(jid)
        return self.root / jid

    def get(self, jid: str) -> dict | None:
        try:
            p = self.folder(jid) / "job.json"
        except KeyError:
            return None
        if jid in self._unsaved:
            job = dict(self._unsaved[jid])
            self._flush_unsaved()
        else:
            try:
                job = json.loads(p.read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(job, dict) or job.get("status") not in STATES:
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
        except (KeyError, OSError, ValueError):
            return None

    def _save(self, job: dict) -> None:
        job = {k: v for k, v in job.items() if k != "queue_position"}
        atomic_write_json(self.folder(job["id"]) / "job.json", job)
        self._unsaved.pop(job["id"], None)

    def _save_or_keep(self, job: dict) -> None:
        """Save a state the worker must not lose; a full disk keeps it in memory until a later save succeeds."""
        try:
            self._save(job)
        except OSError as e:
            self._unsaved[job["id"]] = {k: v for k, v in job.items() if k != "queue_position"}
            self.log(f"job {job['id']}: cannot save its state ({e.strerror}); kept in memory until the disk frees up")

    def _flush_unsaved(self) -> None:
        for jid, job in list(self._unsaved.items()):
            try:
                self._save(job)
            except OSError:
                return

    # -- disk -------------------------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.data_dir).free
        except OSError:
            return 0

    def check_space(self, need: int = 0, what: str = "the upload") -> None:
        floor = int(self.cfg.min_free_mb * 2**20)
        free = self.free_bytes()
        if free - need < floor:
            raise NoSpace(f"the device has {free >> 20} MB free on the agent's disk; {what} needs {need >> 20} MB "
                          f"and the agent keeps {floor >> 20} MB free",
                          "free space on the device (old jobs are in DATA/jobs; see --keep-jobs / --keep-gb)")

    def _retain(self) -> None:
        """Remove finished jobs beyond --keep-jobs, older than --keep-days, or beyond --keep-gb (oldest first)."""
        cfg = self.cfg
        try:
            jobs = [(j.get("submitted_ns") or 0, p.name, p) for p in self.root.iterdir() if JOB_ID.match(p.name)
                    and (j := self.get(p.name)) and j["status"] in ("done", "failed")]
        except OSError:
            return
        finished = [p for _, _, p in sorted(jobs)]  # oldest first
        drop = set()
        if cfg.keep_jobs and len(finished) > cfg.keep_jobs:
            drop |= set(finished[: len(finished) - cfg.keep_jobs])
        if cfg.keep_days:
            cutoff = time.time() - cfg.keep_days * 86400
            drop |= {p for p in finished if _mtime(p / "job.json") < cutoff}
        if cfg.keep_gb:
            left = int(cfg.keep_gb * 2**30)
            for p in reversed(finished):  # newest first keep their place
                if p in drop:
                    continue
                left -= _du(p)
                if left < 0:
                    drop.add(p)
        for p in sorted(drop):
            try:
                gone = p.with_name(f".{p.name}.tmp-retention")
                os.replace(p, gone)
                shutil.rmtree(gone, ignore_errors=True)
                self._unsaved.pop(p.name, None)
            except OSError:
                continue
        if drop:
            self.log(f"retention: removed {len(drop)} finished job(s)")

    # -- submission -------------------------------------------------------------------------------------------
    def new_upload_path(self) -> Path:
        return self.uploads / f"{secrets.token_hex(8)}.tar"

    def submit(self, tar_path: Path, sha256: str, size: int) -> dict:
        """Validate and extract an uploaded bundle into a new job folder, then queue it. BundleError on bad input,
        NoSpace when the disk cannot take it."""
        jid = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        tmp = self.root / f".{jid}.tmp-upload"
        try:
            self.check_space(size, "extracting the bundle")
            try:
                manifest = extract_bundle(tar_path, tmp / "bundle", self.cfg.max_upload_bytes)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace("the device's disk filled up while the bundle was extracted",
                                  "free space on the device (old jobs are in DATA/jobs)")
                raise BundleError(f"the bundle cannot be extracted here ({e.strerror})", "rebuild the bundle")
            job_opts = manifest.get("job") or {}
            job_bench_config(job_opts.get("bench"))  # refuse bad options now, not in the worker
            budget = job_opts.get("budget_mb")
            if budget is not None and (not _finite_number(budget) or not 0 < budget < 1 << 40):
                raise EdgekitError(f"bundle budget_mb={budget!r:.40} is not a positive number", "rebuild the bundle")
            target = job_opts.get("target")
            if target is not None and (not isinstance(target, str) or len(target) > 128):
                raise EdgekitError("bundle target is not a short string", "rebuild the bundle")
            fits = check_artifact_fits(tmp / "bundle" / "artifact", self.memory_budget)
            job = {"id": jid, "status": "queued", "phase": None, "created": _now(), "submitted_ns": time.time_ns(),
                   "started": None,
                   "finished": None, "error": None, "bundle_sha256": sha256, "bundle_bytes": size,
                   "backend": manifest.get("backend"), "precision": manifest.get("precision"),
                   "target": target, "budget_mb": budget, "max_context": fits["max_context"],
                   "estimated_memory_mb": fits["estimated_mb"]}
            try:
                atomic_write_json(tmp / "job.json", job)
                os.replace(tmp, self.root / jid)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace("the device's disk is full", "free space on the device (old jobs are in DATA/jobs)")
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            Path(tar_path).unlink(missing_ok=True)
        self._queue.put(jid)
        self.log(f"job {jid}: queued ({job['backend']} {job['precision']}, {size} bytes)")
        return self.get(jid)

    def cancel(self, jid: str) -> dict | None:
        """A queued job is failed at once; a running one has its process tree killed, then fails."""
        job = self.get(jid)
        if job is None or job["status"] in ("done", "failed"):
            return job
        self._cancel.add(jid)
        if job["status"] == "queued" and self.current != jid:
            job.update(status="failed", phase=None, finished=_now(), error="cancelled")
            self._save_or_keep(job)
        else:
            proc = self._proc
            if proc and proc[0] == jid:
                kill_job_tree(jid, proc[1])
        return self.get(jid)

    def close(self) -> None:
        """Stop the worker; the job running now has its tree killed and stays `running` on disk (requeued at the
        next start)."""
        self._closing = True
        self._queue.put(None)
        proc = self._proc
        if proc:
            kill_job_tree(*proc)

    # -- the worker -------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            jid = self._queue.get()
            if jid is None:
                return
            try:
                self._flush_unsaved()
                job = self.get(jid)
                if not job or job["status"] != "queued":
                    continue
                self.current = jid
                try:
                    if jid in self._cancel:
                        raise Cancelled()
                    self.check_space(0, "a job")
                    self._run(job)
                except Stopping:
                    return
                except Exception as e:  # a full disk, a bug in the agent: fail this job, never the worker
                    self._fail(job, e)
                self._retain()
            except Exception as e:  # even the failure path failed: say so in one line and take the next job
                self.log(f"agent worker: {type(e).__name__}: {scrub_paths(str(e))}")
            finally:
                self.current = None
                self._proc = None
                self._cancel.discard(jid)

    def _fail(self, job: dict, e: Exception) -> None:
        folder = self.folder(job["id"])
        phase = job.get("phase")
        if isinstance(e, Cancelled):
            reason = "cancelled"
        elif isinstance(e, EdgekitError):
            reason = e.line()
        elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = f"the device's disk is full (no space left on device){' during ' + phase if phase else ''}"
        else:
            reason = f"agent error{' during ' + phase if phase else ''}: {type(e).__name__}: {e}"
            try:  # the traceback goes to the job's folder (for whoever runs the device), not to the log
                (folder / "agent_error.log").write_text(traceback.format_exc())
            except OSError:
                pass
        job.update(status="failed", phase=None, finished=_now(), error=scrub_paths(reason, folder), process=None)
        self._save_or_keep(job)
        self.log(f"job {job['id']}: failed ({job['error']})")

    def _phase(self, job: dict, phase: str) -> None:
        if job["id"] in self._cancel:
            raise Cancelled()
        if self._closing:
            raise Stopping()
        job["phase"] = phase
        job["phases"] = [*job.get("phases", []), phase]  # a client polling slower than a phase still sees it
        self._save(job)
        self.log(f"job {job['id']}: {phase}")

    def _spawn(self, job: dict, argv: list[str], cwd: Path, stdout: Path, stderr: Path, timeout: float,
               sample_rss: bool = False) -> dict:
        """Run one job process in its own session under RLIMIT_AS; whatever is left of its tree when it exits or
        times out is killed. Output goes to files (a grandchild holding a pipe cannot hang the agent)."""
        from edgekit.runtime.bench import RssSampler
        import psutil

        jid, folder = job["id"], self.folder(job["id"])
        limit = 0 if job.get("backend") in NO_RLIMIT_AS else self.memory_limit
        env = job_env(jid, folder / "tmp", self.cfg.job_env)
        sb = self.sandbox
        who = [str(sb.uid), str(sb.gid)] if sb else ["-1", "-1"]
        with open(stdout, "wb") as out, open(stderr, "wb") if stderr != stdout else _Same(out) as err:
            proc = subprocess.Popen([*self.prefix, sys.executable, "-c", LAUNCH, str(limit), *who, *argv], cwd=cwd,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        self._proc = (jid, proc.pid)
        if jid in self._cancel or self._closing:  # a cancel or stop that came between the phase and the spawn
            kill_job_tree(jid, proc.pid)
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = None
        job["process"] = {"pid": proc.pid, "pgid": proc.pid, "create_time": created}
        self._save_or_keep(job)
        timed_out = False
        sampler = RssSampler(proc.pid) if sample_rss else None
        try:
            if sampler:
                sampler.__enter__()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            kill_job_tree(jid, proc.pid)  # on time, too: background children of a finished test die with it
            proc.wait()
            if sampler:
                sampler.__exit__(None, None, None)
            self._proc = None
        if self._closing:
            raise Stopping()
        if jid in self._cancel:
            raise Cancelled()
        return {"returncode": proc.returncode, "timed_out": timed_out,
                "memory": sampler.summary() if sampler else None}

    def _run(self, job: dict) -> None:
        from edgekit.agent.device import device_info
        from edgekit.agent.tegrastats import TegrastatsSampler
        from edgekit.runtime.bench import bench_argv

        folder = self.folder(job["id"])
        bundle = folder / "bundle"
        artifact = bundle / "artifact"
        manifest = json.loads((bundle / "bundle.json").read_text())
        opts = manifest.get("job") or {}
        job.update(status="running", started=_now(), error=None, phases=[])
        (folder / "tmp").mkdir(mode=0o700, exist_ok=True)
        if self.sandbox:  # the job's own files are the sandbox user's; the job folder (reports, logs) stays root's
            folder.chmod(0o711)
            hand_over(bundle, self.sandbox)
            hand_over(folder / "tmp", self.sandbox)
        self._phase(job, "device_tests")
        t0 = time.perf_counter()
        tests = self._device_tests(job, bundle, job.get("budget_mb"), folder)

        self._phase(job, "bench")
        cfg = job_bench_config(opts.get("bench"))
        module = BENCH_MODULES.get(job.get("backend"), "edgekit.runtime.bench")
        with TegrastatsSampler() as tegra:
            run = self._spawn(job, bench_argv(artifact, cfg, module), bundle, folder / "bench.out",
                              folder / "bench.err", self.cfg.job_timeout_s, sample_rss=True)
        out = _tail(folder / "bench.out", 1 << 20)
        lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
        result = None
        if run["returncode"] == 0 and lines:
            try:
                result = json.loads(lines[-1])
            except ValueError:
                result = None
        if run["timed_out"]:
            run["error"] = f"timed out after {self.cfg.job_timeout_s}s"
        elif not isinstance(result, dict):
            tail = (_tail(folder / "bench.err") or out).strip().splitlines()[-5:]
            run["error"] = f"{_exit(run['returncode'])}: " + " | ".join(tail) + self._memory_hint(" ".join(tail))
        errors = []
        if not tests["passed_all"]:
            why = tests.get("error") or "; ".join(f"{c['name']} {c['outcome']}: {c['message']}"
                                                  for c in tests["tests"] if c["outcome"] in ("failed", "error"))
            errors.append("device_tests: " + why + self._memory_hint(why))
        bench = None
        if run.get("error") is None:
            bench = result | {"peak_rss_mb": run["memory"]["peak_rss_mb"],
                              "swap_growth_mb": run["memory"]["swap_growth_mb"],
                              "memory_timeline": run["memory"]["timeline"],
                              "memory_timeline_columns": ["t_s", "rss_mb", "swap_delta_mb", "cpu_pct"]}
        else:
            errors.append(f"bench: {run['error']}")
        errors = [scrub_paths(e, folder) for e in errors]
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

    def _device_tests(self, job: dict, bundle: Path, budget_mb, folder: Path) -> dict:
        xml = folder / "tmp" / "device_tests.xml"  # written by the job, as the sandbox user
        log = folder / "device_tests.log"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(bundle),
                str(bundle / "device_tests"), f"--artifact={bundle / 'artifact'}", f"--junitxml={xml}"]
        if budget_mb:
            argv.append(f"--budget-mb={budget_mb}")
        t = time.perf_counter()
        run = self._spawn(job, argv, bundle, log, log, self.cfg.tests_timeout_s)
        rc = None if run["timed_out"] else run["returncode"]
        res: dict = {"returncode": rc, "duration_s": round(time.perf_counter() - t, 2)}
        parsed = None
        if xml.is_file():
            try:
                parsed = parse_junit(xml)
            except Exception as e:  # written by the bundle's own code: anything may be in it
                res["error"] = f"unreadable junit XML ({type(e).__name__})"
        if parsed:
            for c in parsed["tests"]:
                c["message"] = scrub_paths(c["message"], folder)
            res |= parsed
        else:
            res |= {"tests": [], "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "passed_all": False}
        if rc is None:
            res["error"] = f"timed out after {self.cfg.tests_timeout_s}s"
        elif not parsed and "error" not in res:
            res["error"] = f"pytest {_exit(rc)}: " + " | ".join(_tail(log).strip().splitlines()[-3:])
        if "error" in res:
            res["error"] = scrub_paths(res["error"], folder)
        return res


    def _memory_hint(self, text: str) -> str:
        """What an out-of-memory failure means here: the job hit its limit, not the device's RAM."""
        if self.memory_limit and OUT_OF_MEMORY.search(text or ""):
            return (f" (out of memory under the job's address-space limit of {self.memory_limit >> 20} MB: "
                    "--job-memory-mb)")
        return ""


def _exit(rc: int | None) -> str:
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            pass
    return f"exit code {rc}"


def _printable(text: str, limit: int) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


class _Same:
    """`with` for the stdout file reused as stderr."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        return False


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return time.time()


def _du(p: Path) -> int:
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total

def _host_gate(artifact: Path) -> dict | None:
    try:
        gate = json.loads((artifact / "artifact.json").read_text()).get("gate")
    except (OSError, json.JSONDecodeError):
        return None
    return {k: gate.get(k) for k in ("passed", "max_abs_logit_delta", "top1_agreement", "mean_kl")} if gate else None
