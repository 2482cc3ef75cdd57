"""The host side of the agent: bundle an artifact, push it, follow the job, fetch the device report."""

from __future__ import annotations

import http.client
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgekit.errors import EdgekitError


@dataclass
class AgentClient:
    url: str
    token: str
    timeout: float = 60.0

    def __post_init__(self):
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise EdgekitError(f"device URL {self.url!r} is not http://HOST:PORT", "pass --device http://HOST:PORT")
        self._u = u

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._u.scheme == "https" else http.client.HTTPConnection
        return cls(self._u.hostname, self._u.port, timeout=self.timeout)

    def _answer(self, resp: http.client.HTTPResponse, what: str) -> dict:
        body = resp.read()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            obj = {"error": body[:200].decode(errors="replace")}
        if resp.status >= 400:
            fix = obj.get("fix") or "check the agent's log"
            raise EdgekitError(f"the agent at {self.url} refused {what}: {obj.get('error')} (HTTP {resp.status})", fix)
        return obj

    def request(self, method: str, path: str) -> dict:
        conn = self._conn()
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {self.token}"})
            return self._answer(conn.getresponse(), f"{method} {path}")
        except (ConnectionError, OSError) as e:
            raise EdgekitError(f"cannot reach the agent at {self.url} ({e})",
                               "start it on the device with `edgekit agent serve` and check the URL") from e
        finally:
            conn.close()

    def device(self) -> dict:
        return self.request("GET", "/device")

    def job(self, jid: str) -> dict:
        return self.request("GET", f"/jobs/{jid}")

    def jobs(self) -> list[dict]:
        return self.request("GET", "/jobs")["jobs"]

    def report(self, jid: str) -> dict:
        return self.request("GET", f"/jobs/{jid}/report")

    def submit(self, bundle: Path, progress=lambda sent, total: None) -> dict:
        from edgekit.fsutil import sha256_file

        bundle = Path(bundle)
        size = bundle.stat().st_size
        conn = self._conn()
        try:
            conn.putrequest("POST", "/jobs")
            for k, v in (("Authorization", f"Bearer {self.token}"), ("Content-Type", "application/x-tar"),
                         ("Content-Length", str(size)), ("X-Bundle-Sha256", sha256_file(bundle))):
                conn.putheader(k, v)
            conn.endheaders()
            sent = 0
            with open(bundle, "rb") as f:
                while block := f.read(1 << 20):
                    conn.send(block)
                    sent += len(block)
                    progress(sent, size)
            return self._answer(conn.getresponse(), "the bundle")
        except (ConnectionError, OSError) as e:
            raise EdgekitError(f"upload to {self.url} failed ({e})", "check the agent's log and resend") from e
        finally:
            conn.close()

    def wait(self, jid: str, timeout: float, poll: float = 1.0, on_change=lambda job: None) -> dict:
        deadline, last, shown = time.monotonic() + timeout, None, set()
        while True:
            job = self.job(jid)
            for phase in job.get("phases") or []:  # phases that began and ended between two polls
                if phase not in shown and phase != job.get("phase"):
                    on_change({**job, "status": "running", "phase": phase})
                shown.add(phase)
            state = (job["status"], job.get("phase"), job.get("queue_position"))
            if state != last:
                on_change(job)
                last = state
            if job["status"] in ("done", "failed"):
                return job
            if time.monotonic() > deadline:
                raise EdgekitError(f"job {jid} on {self.url} still {job['status']} after {timeout:.0f}s",
                                   "raise --timeout, or fetch it later: GET /jobs/ID/report")
            time.sleep(poll)


def find_build_dir(artifact: Path) -> Path | None:
    """The build directory an artifact sits in (the nearest parent with the pipeline's manifest.json)."""
    from edgekit.pipeline import MANIFEST

    for p in Path(artifact).resolve().parents:
        if (p / MANIFEST).is_file():
            return p
    return None


def run_on_device(artifact: Path, client: AgentClient, extra: dict, timeout: float, log=print,
                  progress=None) -> tuple[dict, dict]:
    """Bundle, push, wait, fetch: returns (final job state, device report)."""
    from edgekit.agent.bundle import make_bundle

    dev = client.device()
    cap = dev.get("agent", {}).get("max_upload_bytes")
    jet = dev.get("jetson") or {}
    log(f"device {dev.get('hostname')}: {dev.get('machine')}, {dev['cpu'].get('cores_logical')} cores, "
        f"{dev['memory']['ram_total_mb']:.0f} MB RAM, {dev['memory']['swap_total_mb']:.0f} MB swap, "
        f"{dev['os']['name']}" + (f", L4T {jet.get('l4t')} JetPack {jet.get('jetpack')} TensorRT "
                                  f"{jet.get('tensorrt')}" if jet else ""))
    with tempfile.TemporaryDirectory(prefix="edgekit-bundle-") as tmp:
        bundle = Path(tmp) / "bundle.tar"
        make_bundle(artifact, bundle, extra={"job": extra})
        size = bundle.stat().st_size
        if cap and size > cap:
            raise EdgekitError(f"the bundle is {size >> 20} MB, over the agent's upload cap of {cap >> 20} MB",
                               "restart the agent with a larger --max-upload-mb")
        log(f"pushing {size / 2**20:.1f} MB bundle to {client.url}")
        job = client.submit(bundle, progress or (lambda s, t: None))
    log(f"job {job['id']}: queued" + (f" (position {job.get('queue_position')})" if job.get("queue_position") else ""))

    def changed(j):
        where = j.get("phase") or (f"position {j.get('queue_position')}" if j["status"] == "queued" else "")
        log(f"job {j['id']}: {j['status']}" + (f" ({where})" if where else ""))

    final = client.wait(job["id"], timeout=timeout, on_change=changed)
    try:
        report = client.report(job["id"])
    except EdgekitError:
        if final["status"] == "failed":  # failed before it could write a report
            raise EdgekitError(f"the device job {final['id']} failed: {final.get('error')}", "read the agent's log")
        raise
    return final, report
