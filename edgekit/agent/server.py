"""The agent's HTTP API (standard library http.server; JSON in and out; no pickle anywhere).

  GET  /health                 no auth: {"ok": true, "version": ...} (liveness only, says nothing about jobs)
  GET  /device                 CPU, RAM, swap, OS, runtime versions; L4T / JetPack / TensorRT / SM on a Jetson
  POST /jobs                   body: a bundle tar (Content-Length required, capped); optional X-Bundle-Sha256
  GET  /jobs                   every job, oldest first
  GET  /jobs/ID                one job's state (queued with its position, running with its phase, done, failed)
  GET  /jobs/ID/report         the device report, once the job finished

Every route but /health needs `Authorization: Bearer TOKEN`, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edgekit import __version__
from edgekit.agent.jobs import AgentConfig, JobStore
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_write_json

CHUNK = 1 << 20
READ_TIMEOUT_S = 60  # an upload that stalls this long is dropped
DRAIN_LIMIT = 64 << 20  # a refused body is read and dropped up to this much, so the client sees the answer


def read_token(path: Path, create: bool = False) -> str:
    path = Path(path)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise EdgekitError(f"cannot read the token file {path} ({e.strerror})",
                           "on the device, `edgekit agent serve ... --init-token` creates one; copy that file to "
                           "the host")
    if len(token) < 16 or any(c.isspace() for c in token):
        raise EdgekitError(f"the token in {path} is shorter than 16 characters or contains spaces",
                           "use a long random secret (e.g. secrets.token_urlsafe(32))")
    return token


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, cfg: AgentConfig, token: str, log=lambda m: print(m, file=sys.stderr, flush=True)):
        self.cfg = cfg
        self.token = token.encode()
        self.log = log
        super().__init__(addr, Handler)  # bind first: a busy port must not start a worker on the data dir
        self.jobs = JobStore(cfg, log=log)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self):
        if getattr(self, "jobs", None):  # absent when binding failed
            self.jobs.close()
        super().server_close()


class Handler(BaseHTTPRequestHandler):
    server: AgentServer
    server_version = f"edgekit-agent/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_S

    def log_message(self, fmt, *args):  # one line per request on the agent's stderr
        self.server.log(f"{self.address_string()} {fmt % args}")

    # -- helpers ----------------------------------------------------------------------------------------------
    def _send(self, status: int, obj) -> None:
        body = (json.dumps(obj, default=str) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, problem: str, fix: str | None = None) -> None:
        self._send(status, {"error": problem, "fix": fix})

    def _drain(self) -> None:
        """Read and drop a refused request body (up to DRAIN_LIMIT), then close: a client still sending would
        otherwise get a connection reset instead of our answer."""
        self.close_connection = True
        length = self.headers.get("Content-Length", "")
        left = min(int(length), DRAIN_LIMIT) if length.isdigit() else 0
        self.connection.settimeout(5)
        try:
            while left > 0 and (block := self.rfile.read(min(CHUNK, left))):
                left -= len(block)
        except (socket.timeout, ConnectionError):
            pass

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip().encode() if auth.startswith("Bearer ") else b""
        if given and hmac.compare_digest(given, self.server.token):
            return True
        self._drain()
        self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token",
                    "send `Authorization: Bearer TOKEN` with the agent's token (edgekit bench --token-file F)")
        return False

    def _route(self) -> list[str]:
        return [p for p in self.path.split("?", 1)[0].split("/") if p]

    # -- routes -----------------------------------------------------------------------------------------------
    def do_GET(self):
        parts = self._route()
        if parts == ["health"]:
            return self._send(200, {"ok": True, "version": __version__})
        if not self._authorized():
            return
        jobs = self.server.jobs
        if parts == ["device"]:
            from edgekit.agent.device import device_info

            return self._send(200, device_info() | {"agent": {
                "version": __version__, "max_upload_bytes": self.server.cfg.max_upload_bytes}})
        if parts == ["jobs"]:
            return self._send(200, {"jobs": jobs.list(), "running": jobs.current})
        if len(parts) in (2, 3) and parts[0] == "jobs":
            job = jobs.get(parts[1])
            if job is None:
                return self._error(404, f"no job {parts[1]!r}", "list jobs with GET /jobs")
            if len(parts) == 2:
                return self._send(200, job)
            if parts[2] == "report":
                report = jobs.report(parts[1])
                if report is None:
                    return self._error(409, f"job {parts[1]} is {job['status']}: no report yet", "poll GET /jobs/ID")
                return self._send(200, report)
        return self._error(404, f"no route GET {self.path}", "see GET /health, /device, /jobs")

    def do_POST(self):
        parts = self._route()
        if not self._authorized():
            return
        if parts != ["jobs"]:
            self._drain()
            return self._error(404, f"no route POST {self.path}", "POST /jobs with a bundle")
        self._receive_bundle()

    def _receive_bundle(self):
        jobs, cap = self.server.jobs, self.server.cfg.max_upload_bytes
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
            self.close_connection = True  # no length: nothing to drain safely
            return self._error(HTTPStatus.LENGTH_REQUIRED, "uploads need a Content-Length", "send the bundle as one body")
        length = int(length)
        if length > cap:
            self._drain()  # refused before a byte is stored
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the upload is {length} bytes, over this agent's cap of {cap}",
                               "start the agent with a larger --max-upload-mb")
        want = (self.headers.get("X-Bundle-Sha256") or "").strip().lower() or None
        path = jobs.new_upload_path()
        h, got = hashlib.sha256(), 0
        try:
            with open(path, "wb") as f:
                while got < length:
                    try:
                        block = self.rfile.read(min(CHUNK, length - got))
                    except (socket.timeout, ConnectionError):
                        block = b""
                    if not block:
                        break
                    h.update(block)
                    f.write(block)
                    got += len(block)
            if got < length:
                self.close_connection = True
                return self._error(400, f"truncated upload: received {got} of {length} bytes", "resend the bundle")
            digest = h.hexdigest()
            if want and not hmac.compare_digest(want, digest):
                return self._error(400, f"the upload's sha256 {digest[:16]}... does not match X-Bundle-Sha256 "
                                   f"{want[:16]}...", "resend the bundle")
            try:
                job = jobs.submit(path, digest, got)
            except EdgekitError as e:  # BundleError and bad job options: the client's fault
                return self._error(400, e.problem, e.fix)
            self._send(HTTPStatus.CREATED, job)
        finally:
            path.unlink(missing_ok=True)


def serve(host: str, port: int, cfg: AgentConfig, token: str, log=None) -> None:
    """Run until interrupted; writes DATA/agent.json with the URL and pid once listening."""
    kw = {"log": log} if log else {}
    srv = AgentServer((host, port), cfg, token, **kw)
    atomic_write_json(Path(cfg.data_dir) / "agent.json", {"url": srv.url, "pid": os.getpid(), "version": __version__})
    srv.log(f"edgekit agent {__version__} listening on {srv.url} (data {cfg.data_dir}, "
            f"upload cap {cfg.max_upload_bytes >> 20} MB)")
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.server_close()
