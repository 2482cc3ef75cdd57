from __future__ import annotations

import argparse
from pathlib import Path


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
    s.add_argument("--port", type=int, required=True, help="port (0: any free port, written to DATA/agent.json)")
    s.add_argument("--token-file", type=Path, required=True, help="file holding the shared secret")
    s.add_argument("--init-token", action="store_true", help="create the token file with a random secret if missing")
    s.add_argument("--data-dir", type=Path, required=True, help="where jobs, bundles and reports are kept")
    s.add_argument("--max-upload-mb", type=float, default=4096, help="largest bundle accepted (default 4096)")
    s.add_argument("--job-timeout", type=float, default=3600, help="seconds a benchmark may run (default 3600)")
    s.set_defaults(func=run_serve)


def run_serve(a) -> int:
    from edgekit.agent.jobs import AgentConfig
    from edgekit.agent.server import read_token, serve
    from edgekit.errors import EdgekitError

    if not 0 <= a.port < 65536:
        raise EdgekitError(f"--port {a.port} is not a TCP port", "pass 0-65535")
    if a.max_upload_mb <= 0 or a.job_timeout <= 0:
        raise EdgekitError("--max-upload-mb and --job-timeout must be positive", "pass positive numbers")
    token = read_token(a.token_file, create=a.init_token)
    cfg = AgentConfig(data_dir=a.data_dir.resolve(), max_upload_bytes=int(a.max_upload_mb * 2**20),
                      job_timeout_s=a.job_timeout, tests_timeout_s=a.job_timeout)
    import signal

    def stop(signum, frame):  # SIGTERM (systemd, docker stop) shuts down like Ctrl-C; jobs persist on disk
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve(a.host, a.port, cfg, token)
    except OSError as e:
        raise EdgekitError(f"cannot listen on {a.host}:{a.port} ({e.strerror})", "pick another --port or --host")
    return 0
