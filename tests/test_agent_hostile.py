"""The agent under hostile bundles and failing devices (issue #18): real agents on loopback, real artifacts.

Every request gets an HTTP answer and the log no traceback; a full disk fails a job, never the worker; a timeout
kills the job's whole process tree; bundle-declared sizes are bounded by the device; numbers on the command line are
finite and in range."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import cli_env
from agent_helpers import (FAST_BENCH, TRACEBACK, Agent, artifact_files, bundle_bytes, device_test_files,
                           fake_artifact_files, fuzz_request, processes_with, write_bundle)



@pytest.fixture(scope="module")
def ort_artifact(tiny_models, tmp_path_factory):
    from edgekit.export import ExportConfig, export_model

    art = tmp_path_factory.mktemp("hostile-art") / "artifact"
    export_model(tiny_models["llama"], art, ExportConfig(backend="onnxruntime", context_length=128), log=lambda m: None)
    return art


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-agent")
    a = Agent(root / "data", root / "token", args=["--min-free-mb", 1])
    yield a
    a.stop()


def no_tracebacks(agent: Agent) -> None:
    logs = agent.logs()
    assert TRACEBACK not in logs and "BrokenPipe" not in logs and "ConnectionReset" not in logs, logs[-3000:]


# -- every request gets an answer --------------------------------------------------------------------------------

def test_malformed_headers_get_4xx_not_a_dropped_connection(agent):
    t = agent.token
    cases = {  # raw request -> the status it must get
        "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n": 400,  # '²'.isdigit() is True
        "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n": 400,
        "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n": 400,
        "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd": 400,
        f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: \u0663\r\n\r\n": 400,
        f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n":
            411,
        f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 4\r\n"
        "X-Bundle-Sha256: \u00e9\u00e9\u00e9\r\n\r\nabcd": 400,
        f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 4\r\n"
        f"X-Bundle-Sha256: {'g' * 64}\r\n\r\nabcd": 400,
        "GET /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \u00ff\u00fe\r\n\r\n": 401,
        "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n": 400,
        "GARBAGE\r\n\r\n": 400,
        "GET /\r\n\r\n": 401,  # an HTTP/0.9-style line still gets a status line
        "BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n": 501,
        f"GET /{'a' * 70000} HTTP/1.1\r\n\r\n": 414,
        "GET /health HTTP/1.1\r\n" + "X-A: b\r\n" * 120 + "\r\n": 431,
        f"DELETE /jobs/nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n": 404,
    }
    for raw, want in cases.items():
        answer = agent.raw(raw.encode("utf-8"))
        assert answer.startswith(b"HTTP/1."), (raw[:80], answer[:200])
        status = int(answer.split(b" ", 2)[1])
        assert status == want, (raw[:80], answer[:300])
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"] and "\n" not in body["error"]
    assert agent.request("GET", "/health", token=None)[0] == 200
    no_tracebacks(agent)


def test_server_header_has_no_python_version(agent):
    answer = agent.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").decode()
    server = next(line for line in answer.split("\r\n") if line.lower().startswith("server:"))
    assert server == "Server: edgekit-agent", server
    assert "Python" not in answer and sys.version.split()[0] not in answer


@pytest.mark.parametrize("case", ["manifest-list", "manifest-nan", "job-list", "bench-list", "bench-nan",
                                  "bench-inf", "bench-negative-threads", "budget-nan", "long-name", "file-folder",
                                  "dot-alias", "double-slash", "self-listed", "backend-object", "members-list"])
def test_hostile_manifests_are_refused_with_400(agent, case):
    files = fake_artifact_files()
    job = None
    manifest = None
    members = None
    if case == "manifest-list":
        manifest = b"[1, 2, 3]"
    elif case == "manifest-nan":
        manifest = b'{"schema": 1, "backend": "onnxruntime", "precision": "fp32", "members": {}, "x": NaN}'
    elif case == "job-list":
        manifest = {"schema": 1, "backend": "onnxruntime", "precision": "fp32", "job": [1],
                    "members": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}}
    elif case == "bench-list":
        job = {"bench": [16]}
    elif case == "bench-nan":
        manifest = json.dumps({"schema": 1, "backend": "onnxruntime", "precision": "fp32",
                               "members": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                                           for n, d in files.items()},
                               "job": {"bench": {"min_seconds": float("nan")}}}).encode()  # json writes NaN
    elif case == "bench-inf":
        job = {"bench": {**FAST_BENCH, "max_seconds": 1e308 * 10}}
    elif case == "bench-negative-threads":
        job = {"bench": {**FAST_BENCH, "threads": -1}}
    elif case == "budget-nan":
        job = {"budget_mb": float("nan")}
    elif case == "long-name":
        files["artifact/" + "x" * 300] = b"a"
    elif case == "file-folder":
        files["artifact/dir"] = b"a"
        files["artifact/dir/file"] = b"b"
    elif case == "dot-alias":
        files["artifact/./artifact.json"] = files["artifact/artifact.json"]
    elif case == "double-slash":
        files["artifact//x"] = b"a"
    elif case == "self-listed":
        members = {"bundle.json": {"sha256": "0" * 64, "size": 1}}
    elif case == "backend-object":
        manifest = {"schema": 1, "backend": {"a": 1}, "precision": "fp32", "members": {}}
    elif case == "members-list":
        manifest = {"schema": 1, "backend": "onnxruntime", "precision": "fp32", "members": [1]}
    before = len(agent.request("GET", "/jobs")[1]["jobs"])
    body = write_bundle(files, manifest=manifest, job=job, members=members)
    status, res = agent.post_raw(body)
    assert status == 400, res
    assert res["error"] and "\n" not in res["error"] and str(agent.data_dir) not in res["error"], res
    assert len(agent.request("GET", "/jobs")[1]["jobs"]) == before
    no_tracebacks(agent)


def test_client_disconnects_are_quiet(agent, ort_artifact, tmp_path):
    import socket
    import struct

    body = bundle_bytes(ort_artifact, tmp_path)
    for i in range(30):
        s = socket.create_connection((agent.host, agent.port), timeout=10)
        if i % 3 == 0:  # ask for the job list and vanish with a reset before reading it
            s.sendall(f"GET /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n\r\n".encode())
        elif i % 3 == 1:  # half an upload
            s.sendall((f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:5000])
        else:  # half a request line
            s.sendall(b"GET /jo")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(1.0)
    assert agent.request("GET", "/health", token=None)[0] == 200
    no_tracebacks(agent)


def _fuzz(agent: Agent, bundle: bytes, n: int, seed: int) -> None:
    rng = random.Random(seed)
    dropped = []
    for i in range(n):
        req = fuzz_request(rng, agent.token, bundle)
        answer = agent.raw(req, timeout=30)
        if not answer.startswith(b"HTTP/1."):
            dropped.append((i, req[:120], answer[:120]))
    assert not dropped, f"{len(dropped)} of {n} requests got no HTTP answer, e.g. {dropped[:3]}"
    assert agent.request("GET", "/health", token=None)[0] == 200
    no_tracebacks(agent)


def test_fuzzed_requests_all_get_an_http_answer(agent):
    """2,000 random requests (headers, lengths, methods, bodies, mutated bundles): 0 dropped, 0 tracebacks.
    The slow test below runs 10,000. The bundle passes every tar check but declares a context no device holds, so
    no mutation of it becomes a job that would load the machine."""
    bundle = write_bundle(fake_artifact_files({"max_context": 10**12}))
    _fuzz(agent, bundle, 2000, seed=18)


@pytest.mark.slow
def test_fuzzed_requests_10000(agent):
    _fuzz(agent, write_bundle(fake_artifact_files({"max_context": 10**12})), 10_000, seed=1818)


# -- bounded upload processing -----------------------------------------------------------------------------------

def test_sparse_and_huge_pax_bundles_are_refused(agent):
    import psutil

    files = fake_artifact_files()
    # a GNU sparse member, declared as the 2 GiB it would expand to
    sparse = dict(files, **{"artifact/big.bin": b""})
    members = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in sparse.items()}
    members["artifact/big.bin"] = {"sha256": "0" * 64, "size": 2 << 30}

    def make_sparse(info):
        if info.name == "artifact/big.bin":
            info.type = tarfile.GNUTYPE_SPARSE

    body = write_bundle(sparse, members=members, tar_format=tarfile.GNU_FORMAT, edit=make_sparse)
    status, res = agent.post_raw(body)
    assert status == 400 and ("sparse" in res["error"] or "upload is only" in res["error"]), res
    members["artifact/big.bin"]["size"] = 0  # declared honestly small: the sparse header itself is refused
    status, res = agent.post_raw(write_bundle(sparse, members=members, tar_format=tarfile.GNU_FORMAT,
                                              edit=make_sparse))
    assert status == 400 and "sparse" in res["error"], res

    # a PAX header of 32 MB: refused before it is read into memory
    rss0 = psutil.Process(agent.proc.pid).memory_info().rss

    def huge_pax(info):
        if info.name == "artifact/artifact.json":
            info.pax_headers = {"comment": "x" * (32 << 20)}

    status, res = agent.post_raw(write_bundle(files, edit=huge_pax))
    assert status == 400 and "extended (PAX / long name) header" in res["error"], res
    growth = (psutil.Process(agent.proc.pid).memory_info().rss - rss0) / 2**20
    assert growth < 24, f"the agent grew {growth:.0f} MB on a 32 MB PAX header"
    # a manifest that declares more bytes than the upload carries
    members = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}
    members["artifact/artifact.json"]["size"] = 10 << 20
    status, res = agent.post_raw(write_bundle(files, members=members))
    assert status == 400 and "upload is only" in res["error"], res
    used = sum(p.stat().st_size for p in agent.data_dir.rglob("*") if p.is_file())
    assert used < 20 << 20, used  # nothing of the declared sizes was written
    no_tracebacks(agent)


# -- bundle-declared sizes are bounded by the device ------------------------------------------------------------

def _with_context(artifact: Path, tmp: Path, ctx) -> Path:
    art = tmp / f"ctx-{ctx}"
    shutil.copytree(artifact, art)
    meta = json.loads((art / "artifact.json").read_text())
    meta["max_context"] = ctx
    (art / "artifact.json").write_text(json.dumps(meta))
    return art


@pytest.mark.parametrize("backend", ["onnxruntime", "gguf"])
def test_huge_context_is_refused_before_anything_loads(backend, agent, ort_artifact, tiny_models, tmp_path):
    import psutil

    if backend == "gguf":
        try:
            import importlib.util

            if importlib.util.find_spec("edgekit.exporters.gguf") is None:
                raise ModuleNotFoundError
        except ModuleNotFoundError:
            pytest.skip("no GGUF exporter in this checkout")
        from edgekit.export import ExportConfig, export_model

        art = tmp_path / "gguf"
        export_model(tiny_models["llama"], art, ExportConfig(backend="gguf", context_length=128), log=lambda m: None)
    else:
        art = ort_artifact
    before = len(agent.request("GET", "/jobs")[1]["jobs"])
    for ctx, why in ((10**12, "not an integer in"), (1 << 23, "needs about"), ("1000", "not an integer"),
                     (0, "not an integer")):
        status, res = agent.request("POST", "/jobs", body=bundle_bytes(_with_context(art, tmp_path, ctx), tmp_path))
        assert status == 400 and why in res["error"] and "--context" in res["fix"], (ctx, res)
    # refused at upload: no job, nothing loaded, the agent itself small (other tests' load makes system-wide free
    # memory no measure here)
    jobs = agent.request("GET", "/jobs")[1]
    assert len(jobs["jobs"]) == before and jobs["running"] is None
    assert psutil.Process(agent.proc.pid).memory_info().rss < 300 << 20


JOB_ENV_CHECK = """
import os, re
from edgekit.agent.jobs import JOB_ENV_KEEP

def check_job_environment():
    for name in ("EDGEKIT_TEST_SECRET_TOKEN", "MY_API_KEY", "DATABASE_URL"):
        assert name not in os.environ, name
    own = {k for k in os.environ if not JOB_ENV_KEEP.match(k) and not k.startswith("PYTEST_")}
    assert own <= {"EDGEKIT_AGENT_JOB", "HOME", "TMPDIR", "TEMP", "TMP"}, own  # the agent's own variables: none
    assert os.environ["EDGEKIT_AGENT_JOB"] and os.environ["HOME"] == os.environ["TMPDIR"]
    import tempfile
    assert tempfile.gettempdir() == os.environ["TMPDIR"] and os.environ["TMPDIR"].endswith("/tmp")
"""
SECRETS = {"EDGEKIT_TEST_SECRET_TOKEN": "hunter2", "MY_API_KEY": "k", "DATABASE_URL": "postgres://u:pw@db/x"}


def test_a_job_past_its_memory_limit_fails_with_the_reason_and_the_next_runs(ort_artifact, tmp_path):
    """RLIMIT_AS is real: a device test that allocates 3 GB under --job-memory-mb 1536 fails its job with the reason;
    the job queued behind it (limits and an allowlisted environment checked from inside) runs and passes."""
    a = Agent(tmp_path / "data", tmp_path / "token", args=["--job-memory-mb", 1536, "--min-free-mb", 1], env=SECRETS)
    try:
        over = "def test_allocates_past_the_limit():\n    data = bytearray(3 * 2**30)\n    assert data\n"
        limits = (JOB_ENV_CHECK + "\nimport resource\n\ndef test_limits_and_environment():\n"
                  "    soft, hard = resource.getrlimit(resource.RLIMIT_AS)\n"
                  "    assert soft == hard == 1536 * 2**20, (soft, hard)\n"
                  "    check_job_environment()\n")
        status, first = a.post_raw(write_bundle(artifact_files(ort_artifact) | device_test_files({"test_over.py": over})))
        assert status == 201, first
        status, second = a.post_raw(write_bundle(artifact_files(ort_artifact) | device_test_files(
            {"test_limits.py": limits})))
        assert status == 201, second
        job = a.wait(first["id"], timeout=120)
        assert job["status"] == "failed" and "test_allocates_past_the_limit failed: MemoryError" in job["error"], job
        assert "out of memory under the job's address-space limit of 1536 MB: --job-memory-mb" in job["error"], job
        job = a.wait(second["id"], timeout=120)
        tests = a.request("GET", f"/jobs/{job['id']}/report")[1]["device_tests"]
        assert tests["passed"] == 1 and tests["passed_all"], tests
        assert job["status"] == "done", job  # the benchmark fits under the limit too
    finally:
        a.stop()
    no_tracebacks(a)


# -- the sandbox (root only: another uid) ---------------------------------------------------------------------

def _as_nobody() -> list[str]:
    """The agent's own way of becoming nobody (LAUNCH), then this Python."""
    import pwd

    from edgekit.agent.jobs import LAUNCH

    pw = pwd.getpwnam("nobody")
    return [sys.executable, "-c", LAUNCH, "0", str(pw.pw_uid), str(pw.pw_gid), sys.executable, "-c", "pass"]


@pytest.fixture
def sandbox_root(tmp_path):
    """As root: a folder `nobody` can enter (not list) for the agent's data and token, and, where this machine's
    Python lives under /root (0700), a mount namespace for the agent that shows /root as 0711 with only the Python
    installation in it (nothing changes outside that namespace)."""
    import pwd
    import secrets
    import tempfile

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the sandbox user needs an agent running as root (and util-linux unshare)")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this system")
    wrap = []
    real = os.path.realpath(sys.executable)
    runs = subprocess.run(_as_nobody(), capture_output=True).returncode == 0
    if not runs and real.startswith("/root/"):
        top = "/root/" + real.split("/")[2]  # e.g. /root/.pyenv
        old = tmp_path / "old-root"
        old.mkdir()
        wrap = ["unshare", "--mount", "--", "sh", "-c",
                f"mount --bind /root {old} && mount -t tmpfs -o mode=0711,size=1m tmpfs /root && mkdir {top} && "
                f"mount --bind {old}{top[5:]} {top} && umount -l {old} && exec \"$@\"", "sh"]
        probe = subprocess.run(wrap + _as_nobody(), capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot give nobody this Python: {probe.stderr.strip()[-200:]}")
    elif not runs:
        pytest.skip("nobody cannot run this Python")
    root = Path(tempfile.mkdtemp(prefix="edgekit-sandbox-", dir="/tmp"))
    root.chmod(0o711)
    token = root / "token"
    token.write_text(secrets.token_urlsafe(24) + "\n")
    token.chmod(0o600)  # reachable by path: only the uid keeps a job from reading it
    yield root, token, wrap
    shutil.rmtree(root, ignore_errors=True)


SANDBOXED = """
import errno, os, resource, socket, subprocess
import pytest

def test_sandboxed():
    assert os.getuid() == os.geteuid() == NOBODY and os.getgroups() == []
    with pytest.raises(PermissionError):  # the token file (mode 0600, root's) and the agent's environment
        open(TOKEN).read()
    with pytest.raises(PermissionError):
        open(f"/proc/{AGENT_PID}/environ").read()
    with pytest.raises(PermissionError):  # the other jobs: DATA/jobs can be entered, not listed
        os.listdir(JOBS)
    check_job_environment()
    assert open(os.path.join(os.environ["TMPDIR"], "x"), "w")  # the private TMPDIR is the job's own
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    assert soft == hard == 2048 * 2**20
    with pytest.raises((ValueError, OSError)):  # an unprivileged job cannot lift its limit
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert "NoNewPrivs:\t1" in open("/proc/self/status").read()
    try:  # network off by default where a namespace can be made
        socket.create_connection(("127.0.0.1", AGENT_PORT), timeout=5).close()
    except OSError as e:
        assert e.errno == errno.ENETUNREACH, e
    else:
        raise AssertionError("the job reached the agent over loopback")
"""


def test_device_tests_run_as_another_user_without_the_token_or_the_agent_environment(sandbox_root, ort_artifact,
                                                                                      tmp_path):
    """As root the agent runs jobs as nobody: a real job on loopback checks from inside that it cannot read the
    token file or the agent's environment, sees none of the agent's variables, has its own TMPDIR, a hard
    address-space limit, no new privileges and no network; the benchmark runs the same way. A token file nobody
    can read is refused at start."""
    import pwd

    root, token, wrap = sandbox_root
    a = Agent(root / "data", token, args=["--sandbox-user", "nobody", "--job-memory-mb", 2048, "--min-free-mb", 1],
              env=SECRETS, wrap=wrap)
    try:
        assert "jobs run as user nobody, network off" in a.logs()
        test = (JOB_ENV_CHECK + f"\nNOBODY, TOKEN, AGENT_PID = {pwd.getpwnam('nobody').pw_uid}, {str(token)!r}, "
                f"{a.proc.pid}\nJOBS, AGENT_PORT = {str(a.data_dir / 'jobs')!r}, {a.port}\n" + SANDBOXED)
        status, job = a.post_raw(write_bundle(artifact_files(ort_artifact) | device_test_files({"test_sb.py": test})))
        assert status == 201, job
        job = a.wait(job["id"], timeout=120)
        tests = a.request("GET", f"/jobs/{job['id']}/report")[1]["device_tests"]
        assert tests["passed"] == 1 and tests["passed_all"], tests
        assert job["status"] == "done", job
    finally:
        a.stop()
    no_tracebacks(a)
    token.chmod(0o644)
    p = subprocess.run(wrap + [sys.executable, "-m", "edgekit", "agent", "serve", "--port", "0", "--token-file",
                               str(token), "--data-dir", str(root / "data"), "--sandbox-user", "nobody"],
                       capture_output=True, text=True, env=cli_env(), timeout=60)
    assert p.returncode == 2 and "is readable by nobody, the user jobs run as" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("edgekit: error: "), p.stderr


def test_a_sandbox_user_who_cannot_run_the_agent_python_is_refused_at_start(tmp_path):
    """The default as root (nobody), where nobody cannot run this Python or reach the data dir (pytest's tmp is
    0700): one line at start, not every job failing later."""
    if os.geteuid() != 0:
        pytest.skip("only root switches users")
    p = subprocess.run([sys.executable, "-m", "edgekit", "agent", "serve", "--port", "0", "--token-file",
                        str(tmp_path / "t"), "--init-token", "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, env=cli_env(), timeout=60)
    assert p.returncode == 2 and "jobs run as user nobody (the agent runs as root), who cannot run" in p.stderr, p.stderr
    assert "--sandbox-user none" in p.stderr and p.stderr.count("\n") == 1


# -- process trees -------------------------------------------------------------------------------------------------

SPAWN_AND_HANG = """
import os, subprocess, sys, time
from pathlib import Path

def test_spawns_and_hangs():
    here = Path(__file__).parent
    a = subprocess.Popen(["sleep", "300"])
    b = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    (here / "pids.txt").write_text(f"{a.pid} {b.pid}")
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_timeout_kills_the_whole_process_tree(ort_artifact, tmp_path):
    a = Agent(tmp_path / "data", tmp_path / "token", args=["--tests-timeout", 6, "--min-free-mb", 1])
    try:
        files = artifact_files(ort_artifact) | device_test_files({"test_hang.py": SPAWN_AND_HANG})
        status, job = a.post_raw(write_bundle(files))
        assert status == 201, job
        jid = job["id"]
        pids_file = a.job_folder(jid) / "bundle" / "device_tests" / "pids.txt"
        a.wait_for(jid, lambda j: pids_file.is_file() and pids_file.read_text().strip(), timeout=60)
        pids = [int(x) for x in pids_file.read_text().split()]
        pgid = json.loads((a.job_folder(jid) / "job.json").read_text())["process"]["pgid"]
        assert all(_alive(p) for p in pids)
        job = a.wait(jid, timeout=60)
        assert "device_tests: timed out after 6.0s" in job["error"], job
        assert processes_with(pgid=pgid) == [] and processes_with(marker=jid) == []
        assert not any(_alive(p) for p in pids), "a child of the timed-out job survived"
    finally:
        a.stop()


def test_cancel_kills_a_running_job_and_restart_kills_orphans(ort_artifact, tmp_path):
    a = Agent(tmp_path / "data", tmp_path / "token", args=["--min-free-mb", 1])
    files = artifact_files(ort_artifact) | device_test_files({"test_hang.py": SPAWN_AND_HANG})
    try:
        _, first = a.post_raw(write_bundle(files))
        _, second = a.post_raw(write_bundle(files))
        pids_file = a.job_folder(first["id"]) / "bundle" / "device_tests" / "pids.txt"
        a.wait_for(first["id"], lambda j: pids_file.is_file() and pids_file.read_text().strip(), timeout=60)
        pids = [int(x) for x in pids_file.read_text().split()]
        status, res = a.request("DELETE", f"/jobs/{first['id']}")
        assert status == 200, res
        job = a.wait(first["id"], timeout=30)
        assert job["status"] == "failed" and job["error"] == "cancelled", job
        assert not any(_alive(p) for p in pids) and processes_with(marker=first["id"]) == []
        # the second job starts; the agent is then killed with no chance to clean up
        pids_file = a.job_folder(second["id"]) / "bundle" / "device_tests" / "pids.txt"
        a.wait_for(second["id"], lambda j: pids_file.is_file() and pids_file.read_text().strip(), timeout=60)
        pids = [int(x) for x in pids_file.read_text().split()]
    finally:
        a.stop(signal.SIGKILL)
    assert all(_alive(p) for p in pids)  # orphans, still running
    b = Agent(tmp_path / "data", tmp_path / "token", args=["--min-free-mb", 1])
    try:
        assert not any(_alive(p) for p in pids), "the restarted agent left the earlier run's processes"
        job = b.request("GET", f"/jobs/{second['id']}")[1]
        assert job["note"].startswith("requeued") and "leftover process(es) of the earlier run killed" in job["note"]
        b.request("DELETE", f"/jobs/{second['id']}")
        assert b.wait(second["id"], timeout=30)["error"] == "cancelled"
        assert processes_with(marker=second["id"]) == []
    finally:
        b.stop()
    assert "left by the earlier agent" in b.logs()


# -- a full disk -----------------------------------------------------------------------------------------------

FILL_THE_DISK = """
import os, time
from pathlib import Path

def test_fills_the_disk():
    here = Path(__file__).parent
    deadline = time.monotonic() + 60
    while not (here / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    fd = os.open(here / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\\0" * (1 << 20))
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"\\0" * 4096)
    except OSError:
        pass
    os.close(fd)
"""


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_fails_the_job_not_the_worker(small_disk, ort_artifact, tmp_path):
    """ENOSPC for real (a 48 MB tmpfs filled by the job itself): that job fails with the reason, a job queued behind
    it is refused by the free-space floor, an upload gets 507, and once space is freed the next job runs."""
    a = Agent(small_disk / "data", tmp_path / "token", args=["--min-free-mb", 4])
    try:
        filler = artifact_files(ort_artifact) | device_test_files({"test_fill.py": FILL_THE_DISK})
        status, first = a.post_raw(write_bundle(filler))
        assert status == 201, first
        status, second = a.post_raw(bundle := bundle_bytes(ort_artifact, tmp_path))
        assert status == 201, second
        tests = a.job_folder(first["id"]) / "bundle" / "device_tests"
        a.wait_for(first["id"], lambda j: j.get("phase") == "device_tests")
        (tests / "go").write_text("")
        job = a.wait(first["id"], timeout=60)
        assert job["status"] == "failed" and "disk is full" in job["error"], job
        job = a.wait(second["id"], timeout=60)
        assert job["status"] == "failed" and "keeps 4 MB free" in job["error"], job
        status, res = a.post_raw(bundle)
        assert status == 507 and "free" in res["error"], res
        (tests / "filler").unlink()
        status, third = a.post_raw(bundle)
        assert status == 201, third
        assert a.wait(third["id"], timeout=120)["status"] == "done"
        # the state the full disk refused reached the disk once it could
        on_disk = json.loads((a.job_folder(first["id"]) / "job.json").read_text())
        assert on_disk["status"] == "failed" and "disk is full" in on_disk["error"]
    finally:
        a.stop()
    no_tracebacks(a)


# -- retention -------------------------------------------------------------------------------------------------

def test_retention_keeps_the_newest_jobs(tmp_path):
    a = Agent(tmp_path / "data", tmp_path / "token", args=["--keep-jobs", 2, "--min-free-mb", 1])
    try:
        ids = []
        for _ in range(3):  # a fake artifact: each job fails in a second or two
            status, job = a.post_raw(write_bundle(fake_artifact_files() | device_test_files({})))
            assert status == 201, job
            ids.append(job["id"])
            a.wait(job["id"], timeout=60)
        left = {j["id"] for j in a.request("GET", "/jobs")[1]["jobs"]}
        assert left == set(ids[1:]), (left, ids)
        assert not a.job_folder(ids[0]).exists()
    finally:
        a.stop()


# -- strict numbers on the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--port", "--max-upload-mb", "--job-timeout", "--tests-timeout", "--min-free-mb",
                                  "--job-memory-mb", "--keep-jobs", "--keep-days", "--keep-gb"])
def test_agent_serve_refuses_nan_and_out_of_range_numbers(flag, tmp_path, capsys):
    from edgekit.cli import main

    for bad in ("nan", "inf", "-1", "-inf", "abc", "1e400"):
        argv = ["agent", "serve", "--port", "0", "--token-file", str(tmp_path / "t"), "--data-dir",
                str(tmp_path / "d"), "--init-token", f"{flag}={bad}"]
        assert main(argv) == 2, (flag, bad)
        err = capsys.readouterr().err
        assert err.startswith(f"edgekit: error: {flag} ") and err.count("\n") == 1, err
    assert not (tmp_path / "d").exists()


def test_sigterm_says_what_was_kept(tmp_path):
    a = Agent(tmp_path / "data", tmp_path / "token")
    a.stop()
    logs = a.logs()
    assert "nothing was written" not in logs and "jobs and reports are kept in" in logs, logs


def test_a_disk_that_fills_during_the_upload_gets_507(small_disk, monkeypatch):
    """The free-space check passes (patched out, as when another process fills the disk mid-upload), the write hits
    ENOSPC: the client gets 507 with the reason, the partial file is removed, the agent keeps serving."""
    import http.client
    import threading

    from edgekit.agent.jobs import AgentConfig, JobStore
    from edgekit.agent.server import AgentServer

    monkeypatch.setattr(JobStore, "check_space", lambda self, need=0, what="": None)
    logs: list[str] = []
    cfg = AgentConfig(data_dir=small_disk / "data", min_free_mb=0, sandbox_user="none")
    srv = AgentServer(("127.0.0.1", 0), cfg, "t" * 24, log=logs.append)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    filler = small_disk / "filler"
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * (1 << 20))
        except OSError:
            pass
        os.close(fd)

        def post(body: bytes):
            conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
            conn.request("POST", "/jobs", body=body, headers={"Authorization": "Bearer " + "t" * 24})
            r = conn.getresponse()
            out = r.status, json.loads(r.read())
            conn.close()
            return out

        status, res = post(os.urandom(4 << 20))
        assert status == 507 and "could not store the upload" in res["error"], res
        deadline = time.time() + 10  # the handler removes the partial file after answering; allow a loaded machine
        while list((small_disk / "data" / "uploads").iterdir()) and time.time() < deadline:
            time.sleep(0.1)
        assert list((small_disk / "data" / "uploads").iterdir()) == []
        filler.unlink()
        status, res = post(b"not a tar" * 100)
        assert status == 400 and "not a readable tar" in res["error"], res
    finally:
        srv.shutdown()
        srv.server_close()
    assert not any(TRACEBACK in line for line in logs), logs


def test_sigterm_kills_the_running_job_tree_and_the_job_is_requeued(ort_artifact, tmp_path):
    a = Agent(tmp_path / "data", tmp_path / "token", args=["--min-free-mb", 1])
    files = artifact_files(ort_artifact) | device_test_files({"test_hang.py": SPAWN_AND_HANG})
    try:
        _, job = a.post_raw(write_bundle(files))
        pids_file = a.job_folder(job["id"]) / "bundle" / "device_tests" / "pids.txt"
        a.wait_for(job["id"], lambda j: pids_file.is_file() and pids_file.read_text().strip(), timeout=60)
        pids = [int(x) for x in pids_file.read_text().split()]
    finally:
        a.stop()  # SIGTERM
    assert not any(_alive(p) for p in pids) and processes_with(marker=job["id"]) == []
    assert json.loads((a.job_folder(job["id"]) / "job.json").read_text())["status"] == "running"
    b = Agent(tmp_path / "data", tmp_path / "token", args=["--min-free-mb", 1])
    try:
        got = b.request("GET", f"/jobs/{job['id']}")[1]
        assert got["note"].startswith("requeued") and "leftover" not in got["note"], got
        b.request("DELETE", f"/jobs/{job['id']}")
        assert b.wait(job["id"], timeout=30)["error"] == "cancelled"
    finally:
        b.stop()


def test_job_network_off_runs_jobs_without_any_network(ort_artifact, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--net", "true"]).returncode != 0:
        pytest.skip("this system cannot create a network namespace")
    a = Agent(tmp_path / "data", tmp_path / "token", args=["--job-network", "off", "--min-free-mb", 1])
    try:
        test = ("import errno, socket\n\n"
                "def test_no_network():\n"
                "    try:\n"
                f"        socket.create_connection(('127.0.0.1', {a.port}), timeout=5).close()\n"
                "    except OSError as e:\n"
                "        assert e.errno == errno.ENETUNREACH, e\n"
                "    else:\n"
                "        raise AssertionError('the job reached the agent over loopback')\n")
        status, job = a.post_raw(write_bundle(artifact_files(ort_artifact) | device_test_files({"test_net.py": test})))
        assert status == 201, job
        job = a.wait(job["id"], timeout=120)
        tests = a.request("GET", f"/jobs/{job['id']}/report")[1]["device_tests"]
        assert tests["passed"] == 1 and tests["passed_all"], tests
        assert job["status"] == "done", job  # the benchmark needs no network either
    finally:
        a.stop()


@pytest.mark.parametrize("flag,value", [("--threads", "-1"), ("--seconds", "nan"), ("--prompt-tokens", "0")])
def test_bench_device_numbers_refused_before_upload(agent, ort_artifact, cli, flag, value):
    """The host refuses out-of-range benchmark numbers in one line before anything is sent (the agent's own refusal
    of the same numbers, for a client that skips the host check, is the bench-* cases of the hostile-bundle test)."""
    before = len(agent.request("GET", "/jobs")[1]["jobs"])
    p = cli("bench", ort_artifact, "--device", agent.url, "--token-file", agent.token_file, flag, value)
    assert p.returncode == 2 and f"{flag} " in p.stderr and "is not a usable value" in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("edgekit: error: ")
    assert len(agent.request("GET", "/jobs")[1]["jobs"]) == before
