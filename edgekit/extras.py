"""Which pip extra brings each optional import, so that a missing package is one line naming the extra to install,
never a traceback. tests/test_packaging.py holds this table equal to pyproject's [project.optional-dependencies]."""

from __future__ import annotations

import importlib.util

from edgekit.errors import EdgekitError

# extra -> (the extras it includes, the top-level modules its own packages bring)
EXTRAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "torch": ((), ("torch", "transformers", "accelerate", "safetensors", "rich", "matplotlib")),
    "onnx": (("torch",), ("onnx", "onnxruntime", "onnxscript", "optimum", "onnxruntime_genai")),
    "gguf": (("torch",), ("gguf", "llama_cpp")),
    "executorch": (("torch",), ("executorch", "torchao")),
    "vlm": (("onnx",), ("PIL",)),
    # on a device: the agent plus the one runtime it serves
    "agent": ((), ("psutil", "pytest")),
    "agent-onnx": ((), ("onnxruntime",)),
    "agent-gguf": ((), ("llama_cpp",)),
    "dev": ((), ("setuptools", "pytest", "torch_pruning")),
}
# the first of these that brings a module names the fix (the runners name the agent-* extras themselves)
_FIX_ORDER = ("torch", "onnx", "gguf", "executorch", "vlm", "agent", "dev")


def modules(extra: str) -> tuple[str, ...]:
    """Every top-level module `pip install 'edgekit[extra]'` makes importable (included extras too)."""
    includes, own = EXTRAS[extra]
    return tuple(dict.fromkeys(m for inc in includes for m in modules(inc))) + own


def missing_dependency(e: ModuleNotFoundError, what: str) -> EdgekitError | None:
    """The one-line error for an optional package that is not installed; None when `e` is not about one (our own
    module missing is a packaging bug and keeps its traceback)."""
    top = (e.name or "").split(".")[0]
    extra = next((x for x in _FIX_ORDER if top in EXTRAS[x][1]), None)
    if extra is None:
        return None
    return EdgekitError(f"{what} needs the Python package {top!r}, which is not installed",
                        f"pip install 'edgekit[{extra}]'")


def require(extra: str, what: str) -> None:
    """Refuse in one line, before any work, when `extra` is not fully installed: one install then fixes it all
    (without this, a core-only install names torch first, and the backend's own package only after that)."""
    missing = [m for m in modules(extra) if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EdgekitError(f"{what} needs edgekit[{extra}], which is not installed (missing: {names})",
                           f"pip install 'edgekit[{extra}]'")
