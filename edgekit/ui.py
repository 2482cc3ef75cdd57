"""Console output: logs and progress on stderr (rich when installed), results on stdout."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager


# -1: -q (errors and the one-line result only), 0: normal, 1: -v (the libraries' logs and warnings too)
VERBOSITY = 0


def set_verbosity(level: int) -> None:
    global VERBOSITY
    VERBOSITY = level


def _console():
    try:
        from rich.console import Console
    except ModuleNotFoundError:  # the device side installs without rich
        return None
    return Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    if VERBOSITY < 0:
        return
    c = _console()
    c.print(msg, markup=False) if c else print(msg, file=sys.stderr)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """Yields advance(); a rich bar on a terminal, nothing otherwise."""
    c = _console()
    if c is None or not enabled or VERBOSITY < 0:
        yield lambda *a, **k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=c, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


@contextmanager
def status(message: str):
    """A spinner with elapsed time on a terminal while a long step runs (nothing when piped or with -q)."""
    c = _console()
    if c is None or VERBOSITY < 0 or not c.is_terminal:
        yield
        return
    import time

    t0 = time.monotonic()
    with c.status(message) as st:
        from threading import Event, Thread

        done = Event()

        def tick():
            while not done.wait(1.0):
                st.update(f"{message} ({time.monotonic() - t0:.0f} s)")

        Thread(target=tick, daemon=True).start()
        try:
            yield
        finally:
            done.set()


def table(title: str, rows: list[tuple], headers: tuple) -> None:
    """A table on stdout that never cuts a cell: rich on a terminal, wrapping what is too wide; aligned plain text
    when piped or when rich is missing, so `| grep` and `| cat` see every name whole."""
    if VERBOSITY < 0:  # -q: the command's one-line result says enough
        return
    cells = [tuple(str(x) for x in r) for r in rows]
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ModuleNotFoundError:
            pass
        else:
            t = Table(title=title, title_justify="left")
            for h in headers:
                t.add_column(h, overflow="fold")  # fold, not ellipsis: a narrow terminal wraps jetson-agx-orin-64gb
            for r in cells:
                t.add_row(*r)
            Console().print(t)
            return
    widths = [max(len(c) for c in col) for col in zip(headers, *cells)]
    print(title)
    for r in (headers, *cells):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def quiet_libraries() -> None:
    """Library chatter (torchao's optional CUDA kernels, tracer warnings, transformers notices) buries edgekit's own
    output; keep only their errors. EDGEKIT_VERBOSE=1 restores it."""
    import logging
    import os
    import warnings

    if os.environ.get("EDGEKIT_VERBOSE") or VERBOSITY > 0:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "transformers", "optimum", "torch.onnx", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@contextmanager
def library_log(path):
    """Third-party INFO logging (onnxruntime's quantizer logs one line per skipped node) goes to `path`, not the
    terminal; -v keeps it on the terminal as well. While our handler sits on root, a library's import-time
    logging.basicConfig() is a no-op, so it cannot re-attach stderr."""
    import logging

    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.handlers = [handler] + (saved_handlers if VERBOSITY > 0 else [])
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        # handlers a library added to root while we ran go too: they pointed at the terminal
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        handler.close()
