"""Load test: N concurrent clients submit bundles to a loopback agent and poll it for a bounded time.

Reports every error (the goal is none), request latency percentiles per route, jobs finished, and the agent's own
RSS over the run (the agent process alone, not the jobs it runs).

    PYTHONPATH=. python bench/agent_load.py --clients 8 --seconds 30 [--submit-every 20] [--artifact DIR]
    PYTHONPATH=. python bench/agent_load.py --clients 8 --seconds 30 --fuzz 10000

--fuzz N then sends N random requests (tests/agent_helpers.fuzz_request: malformed lengths and headers, odd methods
and versions, random and mutated-bundle bodies) and counts those that got no HTTP answer and the tracebacks in the
agent's log (the goal: 0 and 0).

Without --artifact it exports a tiny random Llama to ONNX Runtime first (needs the host extras, ~20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # agent_helpers: the fuzz request generator the tests use


def tiny_artifact(tmp: Path) -> Path:
    from edgekit.export import ExportConfig, export_model
    from edgekit.testing import make_tiny_model

    model = make_tiny_model("llama", tmp / "tiny")
    export_model(model, tmp / "art", ExportConfig(backend="onnxruntime", context_length=128), log=lambda m: None)
    return tmp / "art"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--submit-every", type=int, default=20, help="each client submits a bundle every N requests")
    p.add_argument("--artifact", type=Path)
    p.add_argument("--fuzz", type=int, default=0, help="then send N random requests (0: none)")
    p.add_argument("--sandbox-user", default="none" if os.geteuid() == 0 else "auto",
                   help="the agent's --sandbox-user (default here: none as root, since the temporary data dir is "
                   "0700; the agent's own default is nobody as root)")
    a = p.parse_args()
    if not (a.clients >= 1 and 0 < a.seconds < 1e6 and a.submit_every >= 1 and a.fuzz >= 0):
        p.error("--clients, --submit-every: >= 1; --seconds: positive and finite; --fuzz: >= 0")

    import psutil

    from edgekit.agent.bundle import make_bundle
    from edgekit.agent.client import AgentClient
    from edgekit.errors import EdgekitError

    tmp = Path(tempfile.mkdtemp(prefix="edgekit-load-"))
    art = a.artifact or tiny_artifact(tmp)
    bundle = tmp / "bundle.tar"
    make_bundle(art, bundle, extra={"job": {"bench": {"prompt_tokens": 16, "new_tokens": 8, "min_runs": 3,
                                                      "min_seconds": 0.3}}})
    token = secrets.token_urlsafe(24)
    (tmp / "token").write_text(token)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    agent = subprocess.Popen([sys.executable, "-m", "edgekit", "agent", "serve", "--port", "0", "--token-file",
                              str(tmp / "token"), "--data-dir", str(tmp / "data"), "--sandbox-user", a.sandbox_user],
                             env=env,
                             stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "wb"))
    while not (tmp / "data" / "agent.json").is_file():
        if agent.poll() is not None:
            print((tmp / "agent.log").read_text())
            return 1
        time.sleep(0.05)
    url = json.loads((tmp / "data" / "agent.json").read_text())["url"]
    proc = psutil.Process(agent.pid)
    rss: list[tuple[float, float]] = []
    lat: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    submitted: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + a.seconds
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss.append((time.monotonic() - t0, proc.memory_info().rss / 2**20))
            stop.wait(0.1)

    def client(i: int):
        c = AgentClient(url, token, timeout=30)
        mine: list[str] = []
        n = 0
        while time.monotonic() < deadline:
            route = "submit" if n % a.submit_every == 0 else ("status" if mine and n % 2 else "list")
            t = time.perf_counter()
            try:
                if route == "submit":
                    mine.append(c.submit(bundle)["id"])
                    with lock:
                        submitted.append(mine[-1])
                elif route == "status":
                    c.job(mine[n % len(mine)])
                else:
                    c.jobs()
            except (EdgekitError, OSError) as e:
                with lock:
                    errors.append(f"client {i} {route}: {e}")
            lat[route].append((time.perf_counter() - t) * 1e3)
            n += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    jobs = AgentClient(url, token).jobs()
    fuzz_dropped: list = []
    if a.fuzz:
        import random
        import socket

        from agent_helpers import fake_artifact_files, fuzz_request, write_bundle

        host, port = url.removeprefix("http://").split(":")
        rng = random.Random(18)
        fuzz_bundle = write_bundle(fake_artifact_files({"max_context": 10**12}))  # parsed in full, never a job
        tf = time.monotonic()
        for i in range(a.fuzz):
            req = fuzz_request(rng, token, fuzz_bundle)
            answer = b""
            with socket.create_connection((host, int(port)), timeout=30) as s:
                try:
                    s.sendall(req)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                try:
                    while block := s.recv(65536):
                        answer += block
                except OSError:
                    pass
            if not answer.startswith(b"HTTP/1."):
                fuzz_dropped.append((i, req[:100]))
        fuzz_s = time.monotonic() - tf
    stop.set()
    sampler.join()
    agent.terminate()
    agent.wait(timeout=15)
    tracebacks = (tmp / "agent.log").read_text(errors="replace").count("Traceback (most recent call last)")

    import numpy as np

    done = sum(j["status"] == "done" for j in jobs)
    failed = [j for j in jobs if j["status"] == "failed"]
    print(f"\nagent load test: {a.clients} clients for {elapsed:.1f} s against {url} (loopback)\n")
    print(f"{'route':8} {'requests':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for route, xs in sorted(lat.items()):
        q = np.percentile(xs, [50, 90, 99])
        print(f"{route:8} {len(xs):9d} {q[0]:8.2f} {q[1]:8.2f} {q[2]:8.2f} {max(xs):8.2f}")
    total = sum(len(x) for x in lat.values())
    print(f"\nrequests {total} ({total / elapsed:.0f}/s), errors {len(errors)}")
    print(f"jobs submitted {len(submitted)}, done {done}, failed {len(failed)}, still queued/running "
          f"{len(jobs) - done - len(failed)} (one job at a time)")
    r = [x for _, x in rss]
    print(f"agent RSS: start {r[0]:.1f} MB, peak {max(r):.1f} MB, end {r[-1]:.1f} MB ({len(r)} samples)")
    if a.fuzz:
        print(f"fuzz: {a.fuzz} random requests in {fuzz_s:.1f} s, {len(fuzz_dropped)} without an HTTP answer"
              + "".join(f"\n  no answer: #{i} {r!r}" for i, r in fuzz_dropped[:5]))
    print(f"tracebacks in the agent's log: {tracebacks}")
    for e in errors[:10]:
        print("  error:", e)
    for j in failed[:5]:
        print("  failed job:", j["id"], j["error"])
    print(f"\nreproduce: PYTHONPATH=. python bench/agent_load.py --clients {a.clients} --seconds {a.seconds:g} "
          f"--submit-every {a.submit_every}" + (f" --fuzz {a.fuzz}" if a.fuzz else ""))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if errors or failed or fuzz_dropped or tracebacks else 0


if __name__ == "__main__":
    raise SystemExit(main())
