from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# flag -> (attribute, smallest, largest, integer?, zero allowed?) for `agent serve`: finite and in range, or a one-line error
NUMBERS = {
    "--port": ("port", 0, 65535, True, True),
    "--max-upload-mb": ("max_upload_mb", 0.001, 1 << 20, False, False),
    "--job-timeout": ("job_timeout", 0.1, 7 * 86400, False, False),
    "--tests-timeout": ("tests_timeout", 0.1, 7 * 86400, False, False),
    "--min-free-mb": ("min_free_mb", 0, 1 << 24, False, True),
    "--job-memory-mb": ("job_memory_mb", 64, 1 << 24, False, True),
    "--keep-jobs": ("keep_jobs", 1, 1 << 30, True, True),
    "--keep-days": ("keep_days", 0.001, 36500, False, True),
    "--keep-gb": ("keep_gb", 0.001, 1 << 20, False, True),
}


def _number(text: str) -> float:
    """argparse type: any float text (nan and inf included); the range check in run_serve gives the one-line error."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def register(sub) -> None:
    p = sub.add_parser("agent", help="the on-device benchmark agent (runs on the device)",
                       description="A small HTTP service that receives artifact bundles from `edgekit bench "
                       "--device`, runs their device_tests and the benchmark one job at a time, and keeps the "
                       "reports. Needs only the standard library, psutil and the artifact's runtime.",
                       epilog="examples:\n"
                       "  edgekit agent serve --port 8765 --token-file ~/.edgekit/token --data-dir ~/edgekit-agent\n"
                       "  edgekit agent serve --host 0.0.0.0 --port 8765 --token-file t --data-dir d --init-token\n"
                       "then on the host:\n"
                       "  edgekit bench ARTIFACT --device http://jetson.local:8765 --token-file t",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = p.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    s = asub.add_parser("serve", help="serve the agent's HTTP API until interrupted")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for the LAN)")
    s.add_argument("--port", type=_number, required=True, help="port (0: any free port, written to DATA/agent.json)")
    s.add_argument("--token-file", type=Path, required=True, help="file holding the shared secret")
    s.add_argument("--init-token", action="store_true", help="create the token file with a random secret if missing")
    s.add_argument("--data-dir", type=Path, required=True, help="where jobs, bundles and reports are kept")
    s.add_argument("--max-upload-mb", type=_number, default=4096, help="largest bundle accepted (default 4096)")
    s.add_argument("--job-timeout", type=_number, default=3600,
                   help="seconds a job's benchmark may run; its whole process tree is killed then (default 3600)")
    s.add_argument("--tests-timeout", type=_number, help="seconds the device_tests may run (default: --job-timeout)")
    s.add_argument("--min-free-mb", type=_number, default=512,
                   help="free disk space kept on the data dir: uploads (507) and jobs are refused below it (default 512)")
    s.add_argument("--job-memory-mb", type=_number,
                   help="address-space limit (RLIMIT_AS) of job processes (default: the device's RAM + swap, none on a "
                   "Jetson, whose CUDA runtimes reserve more; 0: none; TensorRT jobs always run without it); "
                   "artifacts whose context needs more than this (default: RAM + swap) are refused at upload")
    s.add_argument("--job-network", choices=("auto", "on", "off"), default="auto",
                   help="off: job processes run in a network namespace of their own, with no network at all "
                   "(needs root or unprivileged user namespaces, and util-linux unshare); auto (default): off "
                   "where the system can make one, else on")
    s.add_argument("--sandbox-user", default="auto", metavar="USER",
                   help="the user job processes run as when the agent runs as root (default auto: nobody as root, "
                   "the agent's own user otherwise; none: jobs run as root)")
    s.add_argument("--job-env", action="append", default=[], metavar="NAME",
                   help="pass this variable of the agent's environment to jobs (repeatable; jobs get only PATH, "
                   "locale, library and thread variables otherwise)")
    s.add_argument("--keep-jobs", type=_number, default=100, help="finished jobs kept (default 100; 0: all)")
    s.add_argument("--keep-days", type=_number, default=0, help="remove finished jobs older than this (default 0: never)")
    s.add_argument("--keep-gb", type=_number, default=20,
                   help="remove the oldest finished jobs beyond this total size (default 20; 0: no limit)")
    s.set_defaults(func=run_serve)


def check_numbers(a) -> None:
    from edgekit.errors import EdgekitError

    for flag, (attr, lo, hi, integer, zero) in NUMBERS.items():
        v = getattr(a, attr, None)
        if v is None:
            continue
        ok = math.isfinite(v) and ((zero and v == 0) or lo <= v <= hi) and (not integer or v == int(v))
        if not ok:
            kind = "an integer" if integer else "a number"
            rng = f"{lo}..{hi}" + (" or 0" if zero and lo > 0 else "")
            raise EdgekitError(f"{flag} {v:g} is not {kind} in {rng}", f"pass {flag} with {kind} in {rng}")


def run_serve(a) -> int:
    from edgekit.agent.jobs import AgentConfig
    from edgekit.agent.server import read_token, serve
    from edgekit.errors import EdgekitError

    check_numbers(a)
    token = read_token(a.token_file, create=a.init_token)
    cfg = AgentConfig(data_dir=a.data_dir.resolve(), max_upload_bytes=int(a.max_upload_mb * 2**20),
                      job_timeout_s=a.job_timeout, tests_timeout_s=a.tests_timeout or a.job_timeout,
                      min_free_mb=a.min_free_mb, job_memory_mb=a.job_memory_mb, keep_jobs=int(a.keep_jobs),
                      keep_days=a.keep_days, keep_gb=a.keep_gb, job_network=a.job_network,
                      sandbox_user=a.sandbox_user, job_env=tuple(a.job_env), token_file=a.token_file.resolve())
    import signal

    def stop(signum, frame):  # SIGTERM (systemd, docker stop) shuts down like Ctrl-C; jobs persist on disk
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve(a.host, int(a.port), cfg, token)
    except OSError as e:
        raise EdgekitError(f"cannot listen on {a.host}:{int(a.port)} ({e.strerror})", "pick another --port or --host")
    except KeyboardInterrupt:
        print(f"edgekit agent: stopped; jobs and reports are kept in {cfg.data_dir}, and a job that was running is "
              "queued again at the next start", file=sys.stderr)
    return 0
