"""Structured widthwise pruning (MLP neurons, query heads / KV groups, hidden channels) of Llama, Qwen2 and Mistral.

    from edgekit.prune import Budget, PruneConfig, prune_model
    prune_model("model", "out", PruneConfig(Budget(ratio=0.25), criterion="activation"))

Modules: arch (adapters, geometry), criteria (importance registry), allocate (budget -> plan), apply (cut, save,
load), calib (calibration text), report. torch is imported only inside functions.
"""

from edgekit.prune.api import REPORT_FILE, plan_pruning, prune_model, score_model
from edgekit.prune.config import Budget, PruneConfig

__all__ = ["Budget", "PruneConfig", "prune_model", "plan_pruning", "score_model", "REPORT_FILE"]

# `edgekit.prune(...)` is the API verb (edgekit/api/pruning.py); this package stays importable as before
import sys as _sys  # noqa: E402

from edgekit import _CallableModule  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
