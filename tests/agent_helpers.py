"""Start real agents on loopback for the tests and talk to them at the HTTP level."""

from __future__ import annotations

import http.client
import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli_env

FAST_BENCH = {"prompt_tokens": 16, "new_tokens": 8, "warmup": 1, "min_runs": 3, "min_seconds": 0.3,
              "max_seconds": 20.0}


class Agent:
    def __init__(self, data_dir: Path, token_file: Path, max_upload_mb: float | None = None, port: int = 0,
                 job_timeout: float | None = None):
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}-agent.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log, env=cli_env())
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
