"""The `edgekit` command. Each subcommand is one module in edgekit/commands/ with `register(subparsers)`; the parser
it registers sets `func(args) -> int`. Logs and progress go to stderr, results to stdout (JSON with --json)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from edgekit import __version__
from edgekit.errors import EdgekitError

COMMANDS = ("plan", "build", "prune", "distill", "export", "verify", "bench", "targets", "docker",
            "agent", "vlm", "vision")

EPILOG = """\
examples:
  edgekit build --target x86-cpu                      SmolLM2-135M (embedded) -> verified ONNX Runtime artifact
  edgekit build --target jetson-orin ./my-llama -o out --dry-run
  edgekit prune ./my-llama --ratio 0.25 -o my-llama-pruned
  edgekit export ./my-llama --backend onnxruntime --precision int8 -o art
  edgekit bench art --json
  edgekit targets show raspberry-pi-5-8gb

Every command takes --help. Errors print one line with the fix and exit non-zero (2: bad input, 3: gate failed).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit", description="Take a transformer from a workstation to an edge "
                                "device: plan, prune, distill, quantize, export, verify, bench.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"edgekit.commands.{name}").register(sub)
    for parser in _leaf_parsers(p):
        g = parser.add_mutually_exclusive_group()
        g.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity",
                       help="print only errors and the one-line result (no logs, progress or tables)")
        g.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity",
                       help="also show the libraries' own logs and warnings on the terminal")
    return p


def _leaf_parsers(p: argparse.ArgumentParser):
    """Every parser that runs a command (agent serve, not agent), so -q / -v sit after any subcommand."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for a in subs:
        for child in dict.fromkeys(a.choices.values()):  # aliases map to the same parser
            yield from _leaf_parsers(child)


def main(argv: list[str] | None = None) -> int:
    from edgekit import ui

    parser = build_parser()
    args = parser.parse_args(argv)
    ui.set_verbosity(getattr(args, "verbosity", None) or 0)
    ui.quiet_libraries()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return _run(args)
    except EdgekitError as e:
        print(f"edgekit: error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:  # an optional package: one line naming its extra
        from edgekit.extras import missing_dependency

        err = missing_dependency(e, f"`edgekit {args.command}`")
        if err is None:
            raise
        print(f"edgekit: error: {err.line()}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # `edgekit ... --json | head` closed the pipe: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        # build and distill keep finished stages / checkpoints; the others write all or nothing
        resumes = args.command in ("build", "distill")
        print("edgekit: interrupted; " + ("rerun the same command to resume" if resumes else
                                          "nothing was written (outputs appear only when complete)"), file=sys.stderr)
        return 130


def _run(args) -> int:
    """The command, with third-party logs in edgekit.log inside its output folder (when it has one)."""
    import tempfile
    from pathlib import Path

    from edgekit.ui import library_log

    fd, tmp = tempfile.mkstemp(prefix="edgekit-", suffix=".log")
    os.close(fd)
    try:
        with library_log(tmp):
            return int(args.func(args) or 0)
    finally:
        out = getattr(args, "out", None)
        if out and Path(out).is_dir() and os.path.getsize(tmp):
            import shutil

            shutil.move(tmp, Path(out) / "edgekit.log")
        else:
            os.unlink(tmp)


if __name__ == "__main__":
    raise SystemExit(main())
