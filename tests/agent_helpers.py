"""Start real agents on loopback for the tests and talk to them at the HTTP level."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from conftest import cli_env

TRACEBACK = "Traceback (most recent call last)"
FAST_BENCH = {"prompt_tokens": 16, "new_tokens": 8, "warmup": 1, "min_runs": 3, "min_seconds": 0.3,
              "max_seconds": 20.0}


class Agent:
    def __init__(self, data_dir: Path, token_file: Path, max_upload_mb: float | None = None, port: int = 0,
                 job_timeout: float | None = None, args: list | None = None, env: dict | None = None,
                 wrap: list | None = None):
        """`wrap`: a command prefix for the agent (e.g. a mount namespace). As root, jobs run as root here unless
        `args` name a --sandbox-user: this machine's Python lives where `nobody` cannot reach it."""
        self.data_dir, self.token_file = Path(data_dir), Path(token_file)
        if not self.token_file.exists():
            self.token_file.write_text(secrets.token_urlsafe(24) + "\n")
        self.token = self.token_file.read_text().strip()
        (self.data_dir / "agent.json").unlink(missing_ok=True)
        argv = [sys.executable, "-m", "edgekit", "agent", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--token-file", str(self.token_file), "--data-dir", str(self.data_dir)]
        if max_upload_mb:
            argv += ["--max-upload-mb", str(max_upload_mb)]
        if job_timeout:
            argv += ["--job-timeout", str(job_timeout)]
        argv += [str(x) for x in args or []]
        if os.geteuid() == 0 and "--sandbox-user" not in argv:
            argv += ["--sandbox-user", "none"]
        argv += ["--job-env", "FAKE_TRTEXEC_VERSION"]  # the trtexec stand-in's knob (tests/fake_trtexec.py)
        argv = [str(x) for x in wrap or []] + argv
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}-agent.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log, env=cli_env(**(env or {})))
        deadline = time.monotonic() + 30
        while not (self.data_dir / "agent.json").is_file():
            assert self.proc.poll() is None, f"agent exited: {self.logs()}"
            assert time.monotonic() < deadline, "agent did not start in 30 s"
            time.sleep(0.05)
        self.url = json.loads((self.data_dir / "agent.json").read_text())["url"]
        self.host, self.port = self.url.removeprefix("http://").split(":")
        self.port = int(self.port)

    def logs(self) -> str:
        return (self.data_dir.parent / f"{self.data_dir.name}-agent.log").read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = "default",
                headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, json.loads(data)

    def raw(self, data: bytes, timeout: float = 20) -> bytes:
        """Send raw bytes, half-close, read the whole answer (b'' if the agent dropped the connection)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the agent answered and closed before taking everything: read what it said
                pass
            chunks = []
            try:
                while block := s.recv(65536):
                    chunks.append(block)
            except ConnectionResetError:
                pass
        return b"".join(chunks)

    def post_raw(self, body: bytes, headers: dict | None = None, token: bool = True) -> tuple[int, dict]:
        h = {"Content-Length": str(len(body)), **(headers or {})}
        if token:
            h["Authorization"] = f"Bearer {self.token}"
        head = "POST /jobs HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        answer = self.raw(head.encode("utf-8") + body)
        status = int(answer.split(b" ", 2)[1])
        return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])

    def job_folder(self, jid: str) -> Path:
        return self.data_dir / "jobs" / jid

    def wait_for(self, jid: str, pred, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.request("GET", f"/jobs/{jid}")[1]
            if pred(job):
                return job
            assert time.monotonic() < deadline, f"job {jid} never reached the state: {job}"
            time.sleep(0.1)

    def wait(self, jid: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, job = self.request("GET", f"/jobs/{jid}")
            assert status == 200, job
            if job["status"] in ("done", "failed"):
                return job
            assert time.monotonic() < deadline, f"job {jid} still {job['status']} after {timeout}s"
            time.sleep(0.2)


def bundle_bytes(artifact: Path, tmp: Path, job: dict | None = None) -> bytes:
    from edgekit.agent.bundle import make_bundle

    out = tmp / f"b-{secrets.token_hex(4)}.tar"
    make_bundle(artifact, out, extra={"job": {"bench": FAST_BENCH, **(job or {})}})
    return out.read_bytes()


def artifact_files(artifact: Path) -> dict[str, bytes]:
    return {f"artifact/{p.relative_to(artifact).as_posix()}": p.read_bytes()
            for p in sorted(Path(artifact).rglob("*")) if p.is_file() and not p.name.startswith(".")}


def device_test_files(tests: dict[str, str]) -> dict[str, bytes]:
    """The shipped conftest (it defines --artifact) with these test files instead of the shipped tests."""
    from edgekit.agent.bundle import device_tests_dir

    files = {"device_tests/conftest.py": (device_tests_dir() / "conftest.py").read_bytes()}
    files |= {f"device_tests/{name}": text.encode() for name, text in tests.items()}
    return files


def write_bundle(files: dict[str, bytes], manifest: dict | None = None, job: dict | None = None,
                 members: dict | None = None, tar_format=tarfile.PAX_FORMAT, edit=None) -> bytes:
    """A bundle tar from name -> bytes, with a correct manifest unless one is given. `edit(info)` may change a
    member's TarInfo before it is written."""
    m = manifest if manifest is not None else {
        "schema": 1, "backend": "onnxruntime", "precision": "fp32",
        "members": members if members is not None else {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()},
        "job": {"bench": FAST_BENCH, **(job or {})}}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as tar:
        data = m if isinstance(m, bytes) else json.dumps(m).encode()
        info = tarfile.TarInfo("bundle.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, d in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(d)
            if edit:
                edit(info)
            tar.addfile(info, io.BytesIO(d))
    return out.getvalue()


def processes_with(pgid: int | None = None, marker: str | None = None, argv_part: str | None = None) -> list:
    """Live (non-zombie) processes in a process group, carrying an agent job marker, or with a word in their argv."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if ((pgid and os.getpgid(p.pid) == pgid)
                    or (marker and p.environ().get("EDGEKIT_AGENT_JOB") == marker)
                    or (argv_part and any(argv_part in a for a in (p.info["cmdline"] or [])))):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def fake_artifact_files(extra_meta: dict | None = None) -> dict[str, bytes]:
    """artifact.json alone: enough for a bundle to pass every tar check (jobs of it fail in a second)."""
    meta = {"schema": 1, "backend": "onnxruntime", "precision": "fp32", "files": {}, "max_context": 64,
            "model": {"num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 8, "hidden_size": 8}}
    return {"artifact/artifact.json": json.dumps({**meta, **(extra_meta or {})}).encode()}


def fuzz_request(rng: random.Random, token: str, bundle: bytes) -> bytes:
    """One random request: methods, paths, versions, tokens, lengths (malformed, repeated, wrong), headers and
    bodies (random bytes, JSON that is not an object, `bundle` mutated or cut)."""
    methods = ["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS", "get", "P\u00d6ST", "", "GET GET"]
    paths = ["/health", "/device", "/jobs", "/jobs/", "/jobs/20260101-000000-00000000", "/jobs/x/report",
             "/jobs/../../etc/passwd", "/%00", "/jobs?x=1", "*", "http://h/jobs", "/" + "a" * rng.randint(0, 3000),
             "/jobs/\u00e9\u00e9", "/jobs/20260101-000000-00000000/report/x"]
    versions = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 extra", "", "HTTP/x", "HTTP/0.9"]
    method, path, version = rng.choice(methods), rng.choice(paths), rng.choice(versions)
    if rng.random() < 0.4:  # uploads get the most parsing
        method, path, version = "POST", "/jobs", "HTTP/1.1"
    headers = []
    if rng.random() < 0.6:
        headers.append(f"Authorization: Bearer {token if rng.random() < 0.7 else token[:-1] + chr(rng.randint(32, 0x2ff))}")
    body = b""
    kind = rng.random()
    if kind < 0.25:
        body = os.urandom(rng.randint(0, 4000))
    elif kind < 0.45:  # a real bundle with a few bytes flipped, cut, or its manifest broken
        b = bytearray(bundle)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        body = bytes(b[: rng.randint(0, len(b))] if rng.random() < 0.3 else b)
    elif kind < 0.55:
        body = json.dumps(rng.choice([[1], "x", None, {"schema": 1}, 1e308])).encode() + b"NaN" * rng.randint(0, 2)
    length_choice = rng.random()
    if length_choice < 0.6:
        headers.append(f"Content-Length: {len(body)}")
    elif length_choice < 0.75:
        headers.append("Content-Length: " + rng.choice(["\u00b2", "-5", "1e3", " 12 ", "0x10", "", "99999999999999999999",
                                                        str(len(body) + rng.randint(1, 100)), "\u0663"]))
    elif length_choice < 0.8:
        headers += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
    elif length_choice < 0.85:
        headers.append("Transfer-Encoding: chunked")
    for _ in range(rng.randint(0, 6)):
        name = rng.choice(["X-Bundle-Sha256", "Host", "Expect", "Connection", "X-" + "h" * rng.randint(1, 40),
                           "Content-Type", "\u00e9", "Bad Header", ":"])
        value = rng.choice(["\u00e9" * 70, hashlib.sha256(body).hexdigest(), "0" * 64, "100-continue", "close",
                            "keep-alive", "", "x" * rng.randint(0, 9000), "\x01\x02", "\u2028"])
        headers.append(f"{name}: {value}")
    head = f"{method} {path} {version}".rstrip() + "\r\n" + "".join(h + "\r\n" for h in headers)
    terminator = "\r\n" if rng.random() < 0.95 else ""
    return head.encode("utf-8", errors="surrogateescape") + terminator.encode() + body
