"""The agent's HTTP API (standard library http.server; JSON in and out; no pickle anywhere).

  GET  /health                 no auth: {"ok": true, "version": ...} (liveness only, says nothing about jobs)
  GET  /device                 CPU, RAM, swap, OS, runtime versions; L4T / JetPack / TensorRT / SM on a Jetson
  POST /jobs                   body: a bundle tar (Content-Length required, capped); optional X-Bundle-Sha256
  GET  /jobs                   every job, oldest first
  GET  /jobs/ID                one job's state (queued with its position, running with its phase, done, failed)
  GET  /jobs/ID/report         the device report, once the job finished
  DELETE /jobs/ID              cancel: a queued job fails at once, a running one has its process tree killed

Every route but /health needs `Authorization: Bearer TOKEN`, compared in constant time. Every request gets an HTTP
answer (JSON, one-line errors), whatever its headers or body; a client that goes away is not an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edgekit import __version__
from edgekit.agent.jobs import AgentConfig, JobStore, NoSpace, quiet_log
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_write_json

CHUNK = 1 << 20
READ_TIMEOUT_S = 60  # an upload that stalls this long is dropped
DRAIN_LIMIT = 64 << 20  # a refused body is read and dropped up to this much, so the client sees the answer
DIGITS = re.compile(r"^[0-9]{1,19}$")  # ASCII only: str.isdigit() accepts '²', which int() refuses
SHA256 = re.compile(r"^[0-9a-f]{64}$")
QUIET = (ConnectionError, TimeoutError, socket.timeout)  # the client went away: not worth a line


def _printable(text: str, limit: int = 300) -> str:
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text)[:limit])
    return text


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
        self.log = quiet_log(log)
        super().__init__(addr, Handler)  # bind first: a busy port must not start a worker on the data dir
        self.jobs = JobStore(cfg, log=log)

    def handle_error(self, request, client_address):  # one line, never a traceback in the log
        e = sys.exc_info()[1]
        if not isinstance(e, QUIET):
            self.log(f"{client_address[0]} internal error: {type(e).__name__}: {_printable(e)}")

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
    server_version = "edgekit-agent"  # no version numbers for anyone who can reach the port
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_S
    default_request_version = "HTTP/1.0"  # answers to unparsable request lines still start with a status line

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt, *args):  # one line per request on the agent's stderr
        self.server.log(f"{self.address_string()} {_printable(fmt % args)}")

    def send_error(self, code, message=None, explain=None):
        """The parser's own refusals (bad request line, header too long, unknown method) in our JSON shape."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._error(code, _printable(message or phrase, 200), "send a well-formed HTTP/1.1 request to this API")

    def send_response_only(self, code, message=None):
        self._answered = True
        if self.request_version == "HTTP/0.9":  # no status line or headers in 0.9: answer as 1.0 instead
            self.request_version = "HTTP/1.0"
        super().send_response_only(code, message)

    def handle(self):
        try:
            super().handle()
        except QUIET:
            self.close_connection = True

    def handle_one_request(self):
        """Whatever goes wrong inside a request, the client gets an answer and the log one line."""
        self._answered = False
        try:
            super().handle_one_request()
        except QUIET:
            self.close_connection = True
        except Exception as e:
            self.close_connection = True
            self.server.log(f"{self.address_string()} internal error on {_printable(self.requestline)}: "
                            f"{type(e).__name__}: {_printable(e)}")
            if not self._answered:
                try:
                    self._error(500, "the agent failed on this request", "see the agent's log; retry")
                except (OSError, ValueError):
                    pass

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

    def _length(self) -> int | None:
        """The request's Content-Length: None when absent; ValueError when malformed, repeated or not ASCII."""
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return None
        if len(set(v.strip() for v in values)) != 1 or not DIGITS.match(values[0].strip()):
            raise ValueError("bad Content-Length")
        return int(values[0].strip())

    def _drain(self, left: int | None = None) -> None:
        """Read and drop a refused request body (up to DRAIN_LIMIT), then close: a client still sending would
        otherwise get a connection reset instead of our answer."""
        self.close_connection = True
        if left is None:
            try:
                left = self._length() or 0
            except ValueError:
                left = 0
        left = min(left, DRAIN_LIMIT)
        self.connection.settimeout(5)
        try:
            while left > 0 and (block := self.rfile.read(min(CHUNK, left))):
                left -= len(block)
        except (OSError, ValueError):
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
    def _bodyless(self) -> bool:
        """GET and DELETE take no body: one that comes is dropped and the connection closed after the answer (left
        in the stream it would be read as the next request)."""
        try:
            length = self._length()
        except ValueError:
            self.close_connection = True
            self._error(400, "the Content-Length header is not one plain decimal number",
                        "send Content-Length: N with N in ASCII digits, once")
            return False
        if length or self.headers.get("Transfer-Encoding"):
            self._drain(length or 0)
        return True

    def do_GET(self):
        if not self._bodyless():
            return
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
                return self._error(404, f"no job {_printable(parts[1], 40)!r}", "list jobs with GET /jobs")
            if len(parts) == 2:
                return self._send(200, job)
            if parts[2] == "report":
                report = jobs.report(parts[1])
                if report is None:
                    return self._error(409, f"job {parts[1]} is {job['status']}: no report yet", "poll GET /jobs/ID")
                return self._send(200, report)
        return self._error(404, f"no route GET {_printable(self.path, 100)}", "see GET /health, /device, /jobs")

    def do_DELETE(self):
        if not self._bodyless() or not self._authorized():
            return
        parts = self._route()
        if len(parts) != 2 or parts[0] != "jobs":
            return self._error(404, f"no route DELETE {_printable(self.path, 100)}", "DELETE /jobs/ID cancels a job")
        job = self.server.jobs.get(parts[1])
        if job is None:
            return self._error(404, f"no job {_printable(parts[1], 40)!r}", "list jobs with GET /jobs")
        if job["status"] in ("done", "failed"):
            return self._error(409, f"job {parts[1]} is already {job['status']}", "nothing to cancel")
        return self._send(200, self.server.jobs.cancel(parts[1]))

    def do_POST(self):
        parts = self._route()
        try:
            self._length()
        except ValueError:
            self.close_connection = True  # no length we can trust: nothing to drain safely
            return self._error(400, "the Content-Length header is not one plain decimal number",
                               "send Content-Length: N with N in ASCII digits, once")
        if not self._authorized():
            return
        if parts != ["jobs"]:
            self._drain()
            return self._error(404, f"no route POST {_printable(self.path, 100)}", "POST /jobs with a bundle")
        self._receive_bundle()

    def _receive_bundle(self):
        jobs, cap = self.server.jobs, self.server.cfg.max_upload_bytes
        length = self._length()
        if self.headers.get("Transfer-Encoding") or length is None:
            self.close_connection = True  # no length: nothing to drain safely
            return self._error(HTTPStatus.LENGTH_REQUIRED, "uploads need a Content-Length", "send the bundle as one body")
        if length > cap:
            self._drain()  # refused before a byte is stored
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the upload is {length} bytes, over this agent's cap of {cap}",
                               "start the agent with a larger --max-upload-mb")
        want = (self.headers.get("X-Bundle-Sha256") or "").strip().lower() or None
        if want is not None and not SHA256.match(want):
            self._drain()
            return self._error(400, "X-Bundle-Sha256 is not 64 hex digits", "send the body's sha256 in hex, or omit it")
        try:
            jobs.check_space(2 * length, "the upload and its extracted copy")  # before a byte is stored
        except NoSpace as e:
            self._drain()
            return self._error(HTTPStatus.INSUFFICIENT_STORAGE, e.problem, e.fix)
        path = jobs.new_upload_path()
        h, got = hashlib.sha256(), 0
        try:
            try:
                with open(path, "wb") as f:
                    while got < length:
                        try:
                            block = self.rfile.read(min(CHUNK, length - got))
                        except QUIET:
                            block = b""
                        if not block:
                            break
                        h.update(block)
                        got += len(block)
                        f.write(block)
            except OSError as e:  # the disk filled up under us (ENOSPC, EDQUOT) or the uploads folder went away
                path.unlink(missing_ok=True)  # before the answer: a client may look right after it
                self._drain(length - got)
                return self._error(HTTPStatus.INSUFFICIENT_STORAGE,
                                   f"the device could not store the upload ({e.strerror or type(e).__name__})",
                                   "free space on the device (old jobs are in DATA/jobs)")
            if got < length:
                path.unlink(missing_ok=True)
                self.close_connection = True
                return self._error(400, f"truncated upload: received {got} of {length} bytes", "resend the bundle")
            digest = h.hexdigest()
            if want and not hmac.compare_digest(want, digest):
                return self._error(400, f"the upload's sha256 {digest[:16]}... does not match X-Bundle-Sha256 "
                                   f"{want[:16]}...", "resend the bundle")
            try:
                job = jobs.submit(path, digest, got)
            except NoSpace as e:
                return self._error(HTTPStatus.INSUFFICIENT_STORAGE, e.problem, e.fix)
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
