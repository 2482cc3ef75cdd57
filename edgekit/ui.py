"""Console output: logs and progress on stderr (rich when installed), results on stdout."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager


def _console():
    try:
        from rich.console import Console
    except ModuleNotFoundError:  # the device side installs without rich
        return None
    return Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    c = _console()
    c.print(msg, markup=False) if c else print(msg, file=sys.stderr)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """Yields advance(); a rich bar on a terminal, nothing otherwise."""
    c = _console()
    if c is None or not enabled:
        yield lambda *a, **k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=c, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def table(title: str, rows: list[tuple], headers: tuple) -> None:
    """A table on stdout that never cuts a cell: rich on a terminal, wrapping what is too wide; aligned plain text
    when piped or when rich is missing, so `| grep` and `| cat` see every name whole."""
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

    if os.environ.get("EDGEKIT_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "transformers", "optimum", "torch.onnx", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
