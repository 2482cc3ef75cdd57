"""edgekit.prune(): structured widthwise pruning into a plain Hugging Face folder. `edgekit prune` is argparse
around this function."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterable

from edgekit.api.common import api_function, as_path, console
from edgekit.api.results import PruneResult

if TYPE_CHECKING:
    from edgekit.prune.config import PruneConfig

_RANGES = {"ratio": (0, 1), "params": (1, None), "bytes": (1, None), "bytes_per_param": (1e-3, 64),
           "align": (1, 4096), "hidden_keep": (0, 1), "attn_weight": (0, None), "samples": (1, None),
           "seq_len": (2, None)}


@api_function("prune")
def prune(model: str | Path | None = None, *, out: str | Path, ratio: float | None = None,
          params: int | None = None, bytes: int | None = None, bytes_per_param: float = 4.0,
          criterion: str = "activation", non_uniform: bool = False, align: int = 8, hidden_keep: float | None = None,
          attn_weight: float = 1.0, protect: str | Iterable[int] = (), calibration: str | Path | None = None,
          samples: int = 32, seq_len: int = 256, reconstruct: bool = True, force: bool = False,
          config: PruneConfig | None = None, verbose: bool = False) -> PruneResult:
    """Prune `model` (a Hugging Face folder or .gguf; None: the embedded SmolLM2-135M) into the folder `out`.

    One budget: `ratio` (fraction of parameters removed), `params` (parameters kept) or `bytes` (size to fit at
    bytes_per_param). The other keywords are `edgekit prune`'s flags (`reconstruct=False` is --no-reconstruct,
    `protect` takes "0,1" or [0, 1]). `config` (a prune.PruneConfig) may carry them instead; a keyword left at its
    default does not override it. Returns a PruneResult whose `widths` the pruned folder's config holds."""
    from edgekit.commands import check_numbers
    from edgekit.fsutil import check_output
    from edgekit.models import resolve_model
    from edgekit.prune import Budget, PruneConfig, prune_model
    from edgekit.prune.api import REPORT_FILE

    check_numbers(SimpleNamespace(ratio=ratio, params=params, bytes=bytes, bytes_per_param=bytes_per_param,
                                  align=align, hidden_keep=hidden_keep, attn_weight=attn_weight, samples=samples,
                                  seq_len=seq_len), _RANGES)
    given = {"criterion": criterion, "non_uniform": non_uniform, "align": align, "hidden_keep": hidden_keep,
             "attn_weight": attn_weight, "protected_layers": _layers(protect), "calibration": as_path(calibration),
             "num_samples": samples, "seq_len": seq_len, "reconstruct": reconstruct}
    budget = Budget(ratio=ratio, params=params, bytes=bytes, bytes_per_param=bytes_per_param)
    if config is None:
        cfg = PruneConfig(budget=budget, **given)
    else:
        from dataclasses import replace

        defaults = PruneConfig(budget=Budget())
        cfg = replace(config, **{k: v for k, v in given.items() if v != getattr(defaults, k)})
        if budget != Budget():
            cfg = replace(cfg, budget=budget)
    cfg.check()
    if cfg.budget.ratio is not None:
        cfg.budget.removed(100)  # a bad ratio fails before the model is read
    out = as_path(out)
    with console(verbose) as log:
        ref = resolve_model(None if model is None else str(model))
        check_output(out, [ref.path] + ([cfg.calibration] if cfg.calibration else []), REPORT_FILE, force)
        report = prune_model(ref.path, out, cfg, log=log)
    return PruneResult.from_report(out, report)


def _layers(protect) -> tuple[int, ...]:
    from edgekit.errors import EdgekitError

    if isinstance(protect, str):
        try:
            return tuple(int(x) for x in protect.split(",") if x.strip())
        except ValueError:
            raise EdgekitError(f"--protect takes comma-separated layer numbers, got {protect!r}",
                               "e.g. --protect 0,1") from None
    return tuple(int(x) for x in protect)
