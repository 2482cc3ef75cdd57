"""Typed pruning options. A PruneConfig says how much to remove (one budget), how to score structures, how to share
the cut between layers and structures, and which calibration text to read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class Budget:
    """Exactly one of: fraction of parameters removed, parameters to keep, or bytes to fit (at bytes_per_param)."""

    ratio: float | None = None
    params: int | None = None
    bytes: int | None = None
    bytes_per_param: float = 4.0  # fp32 checkpoint; pass 0.5625 for ~4.5-bit quantized weights

    def removed(self, total_params: int) -> int:
        """Parameters to remove from a model of total_params."""
        given = [x for x in (self.ratio, self.params, self.bytes) if x is not None]
        if len(given) != 1:
            raise EdgekitError("give exactly one pruning budget (a ratio, a parameter count or a size in bytes)",
                               "e.g. --ratio 0.25, or --params 100000000, or --bytes 300000000")
        if self.bytes is not None and not (math.isfinite(self.bytes_per_param) and self.bytes_per_param > 0):
            raise EdgekitError(f"bytes per parameter must be a positive number, got {self.bytes_per_param}",
                               "e.g. --bytes-per-param 4 (fp32), 2 (fp16), 0.5625 (~4.5-bit)")
        if self.ratio is not None:
            if not 0 < self.ratio < 1:
                raise EdgekitError(f"pruning ratio must be between 0 and 1 (exclusive), got {self.ratio}",
                                   "e.g. --ratio 0.3 removes 30% of parameters")
            return int(round(self.ratio * total_params))
        keep = self.params if self.params is not None else int(self.bytes / self.bytes_per_param)
        if not 0 < keep < total_params:
            raise EdgekitError(f"the budget keeps {keep:,} parameters, but the model has {total_params:,}",
                               f"ask for fewer than {total_params:,} parameters (or bytes for that many)")
        return total_params - keep


@dataclass(frozen=True)
class PruneConfig:
    budget: Budget
    criterion: str = "activation"  # a key of edgekit.prune.criteria.CRITERIA
    non_uniform: bool = False
    align: int = 8  # every pruned reduction width (hidden, intermediate, heads*head_dim) is a multiple of this
    # How the cut is shared between structures. None: searched on calibration loss (uniform split search).
    hidden_keep: float | None = None  # fraction of hidden channels kept; 1.0 never prunes hidden
    attn_weight: float = 1.0  # non-uniform: >1 protects attention relative to the MLP in the global ranking
    protected_layers: tuple[int, ...] = ()  # non-uniform: layers left dense
    calibration: Path | None = None  # .txt/.jsonl file or folder; None: edgekit's shipped calibration text
    num_samples: int = 32  # calibration sequences
    seq_len: int = 256
    batch_size: int = 4
    search_samples: int = 4  # sequences that score each candidate split in the search
    norm_correction: bool = True  # rescale RMSNorm weights for the removed hidden channels' share of the RMS
    reconstruct: bool = True  # refit o_proj/down_proj by least squares on the calibration text (prune/reconstruct.py)
    reconstruct_damp: float = 0.1  # ridge strength towards the cut weights, relative to the mean input energy
    seed: int = 0

    def check(self) -> None:
        from edgekit.prune.criteria import CRITERIA

        if self.criterion not in CRITERIA:
            raise EdgekitError(f"unknown importance criterion {self.criterion!r}",
                               f"use one of {', '.join(CRITERIA)}")
        if self.align < 1:
            raise EdgekitError(f"alignment must be a positive integer, got {self.align}", "e.g. --align 8")
        if self.hidden_keep is not None and not 0 < self.hidden_keep <= 1:
            raise EdgekitError(f"hidden_keep must be in (0, 1], got {self.hidden_keep}", "e.g. --hidden-keep 0.9")
        if self.attn_weight <= 0:
            raise EdgekitError(f"attention weight must be positive, got {self.attn_weight}", "e.g. --attn-weight 1")
        if not self.non_uniform and (self.protected_layers or self.attn_weight != 1.0):
            raise EdgekitError("protected layers and the attention weight only apply to per-layer widths",
                               "add --non-uniform, or drop --protect / --attn-weight")
        if self.reconstruct_damp <= 0:
            raise EdgekitError(f"reconstruct_damp must be positive, got {self.reconstruct_damp}", "e.g. 0.1")
        for n in ("num_samples", "seq_len", "batch_size", "search_samples"):
            if getattr(self, n) < 1:
                raise EdgekitError(f"{n} must be at least 1, got {getattr(self, n)}", f"pass a positive {n}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["calibration"] = str(self.calibration) if self.calibration else None
        d["protected_layers"] = list(self.protected_layers)
        return d
