"""What the API functions share: quiet-by-default console output, paths, and missing extras as EdgekitError."""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from pathlib import Path


def as_path(p) -> Path | None:
    return None if p is None else Path(p).expanduser()


# the libraries that log notices to the terminal while a stage runs (transformers' deprecations, tracer notes)
LIBRARY_LOGGERS = ("transformers", "optimum", "torch.onnx", "torch.utils._pytree", "torchao", "onnxruntime")


def _silent(*_args, **_kwargs) -> None:
    pass


@contextmanager
def console(verbose: bool):
    """Yields the log function for the stage code. verbose=False (the API's default): nothing on the terminal, no
    progress, no spinners, no warnings; True: edgekit's log lines and progress on stderr, as the CLI prints them
    (edgekit.ui's -q/-v level still applies). Not thread-safe: it sets edgekit.ui's level and the libraries' logger
    levels for the call, and restores them."""
    from edgekit import ui

    if verbose:
        yield ui.log
        return
    import logging
    import os

    loggers = [logging.getLogger(n) for n in LIBRARY_LOGGERS]
    saved, levels = ui.VERBOSITY, [lg.level for lg in loggers]
    # transformers and optimum set their loggers' level from this variable when first imported (maybe in this call)
    env = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ui.set_verbosity(-1)
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        # a library's logging.basicConfig() during the call (ONNX Runtime's quantizer) would add a terminal handler
        # to root for good: with a handler of ours there it is a no-op, and root's handlers come back afterwards
        with warnings.catch_warnings(), ui.library_log(os.devnull):
            warnings.simplefilter("ignore")
            yield _silent
    finally:
        ui.set_verbosity(saved)
        if env is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        for lg, level in zip(loggers, levels):
            # a logger first configured during the call gets its library's default (WARNING), not our ERROR
            lg.setLevel(level if level != logging.NOTSET or not lg.handlers else logging.WARNING)


def api_function(command: str):
    """A missing optional package becomes the same one-line EdgekitError the CLI prints (naming the extra)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ModuleNotFoundError as e:
                from edgekit.extras import missing_dependency

                err = missing_dependency(e, f"`edgekit {command}`")
                if err is None:
                    raise
                raise err from e

        return inner

    return wrap
