"""edgekit.bench_matrix(): every backend x precision a target runs, built, gated and benchmarked side by side, and the
winner picked. `edgekit bench --matrix` is argparse around this function."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterable

from edgekit.api.common import api_function, as_path, console
from edgekit.api.results import MatrixResult

if TYPE_CHECKING:
    from edgekit.target import Target

_RANGES = {"context": (1, None), "prune_ratio": (0, 1), "distill_steps": (0, None), "bench_seconds": (0, 86400),
           "threads": (1, 1024), "timeout": (1, None)}


def _names(v) -> tuple[str, ...] | None:
    if v is None:
        return None
    items = v.split(",") if isinstance(v, str) else list(v)
    return tuple(x.strip() for x in items if x.strip()) or None


@api_function("bench")
def bench_matrix(model: str | Path | None = None, *, target: str | Path | Target, out: str | Path | None = None,
                 backends: str | Iterable[str] | None = None, precisions: str | Iterable[str] | None = None,
                 context: int | None = None, prune_ratio: float | None = None, distill_steps: int = 0,
                 bench_seconds: float = 2.0, threads: int | None = None, devices: Iterable[str] = (),
                 token_file: str | Path | None = None, timeout: float = 3600.0,
                 verbose: bool = False) -> MatrixResult:
    """Build `model` (None: the embedded SmolLM2-135M) for `target` at every backend x precision it runs (or those
    of `backends` / `precisions`, comma lists or lists), each through the resumable pipeline in its own folder under
    `out` (default edgekit-matrix/TARGET), gate and benchmark each on this host and on every agent URL of `devices`
    (concurrently; `token_file` holds their token), and pick the winner (edgekit.matrix.WINNER_RULE).
    A row that cannot be built or run (a backend the target does not run, an unreachable device, a wrong token, a
    timeout after `timeout` s) holds a one-line error; the other rows still finish. Finished rows are skipped on
    rerun. Writes matrix.json, matrix.md and matrix.html into `out`. Returns a MatrixResult."""
    from edgekit.commands import check_numbers
    from edgekit.errors import EdgekitError
    from edgekit.matrix import MatrixOptions, run_matrix
    from edgekit.target import Target, get_target

    check_numbers(SimpleNamespace(context=context, prune_ratio=prune_ratio, distill_steps=distill_steps,
                                  bench_seconds=bench_seconds, threads=threads, timeout=timeout), _RANGES)
    devices = tuple(devices or ())
    if devices and token_file is None:
        raise EdgekitError("--device needs --token-file", "pass the file holding the agents' token")
    with console(verbose) as log:
        t = target if isinstance(target, Target) else get_target(str(target))
        out_dir = as_path(out) or Path("edgekit-matrix") / t.name
        if out_dir.exists() and not out_dir.is_dir():
            raise EdgekitError(f"-o {out_dir} is a file", "pass a folder to -o (one build folder per row goes there)")
        opts = MatrixOptions(backends=_names(backends), precisions=_names(precisions), context_length=context,
                             prune_ratio=prune_ratio, distill_steps=distill_steps, bench_seconds=bench_seconds,
                             threads=threads, devices=devices,
                             token_file=None if token_file is None else str(token_file), device_timeout=timeout)
        data = run_matrix(None if model is None else str(model), t, out_dir, opts, log=log)
    return MatrixResult.from_dict(data)
