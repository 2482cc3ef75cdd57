"""edgekit: take a transformer from a workstation to an edge device.

    import edgekit
    res = edgekit.build("my-llama", target="x86-cpu", out="build")   # also edgekit.prune/export/bench (docs/api.md)

Importing edgekit is cheap: torch, transformers and every runtime are imported only by the stage that needs them.
"""

from pathlib import Path as _Path
from types import ModuleType as _ModuleType

__version__ = "0.1.0"

# In a source checkout targets/, exporters/ and device_tests/ sit beside this folder (installed, they are inside it):
# let the package find them there, so a checkout on PYTHONPATH behaves like the installed package.
_root = _Path(__file__).resolve().parent.parent
if (_root / "exporters" / "__init__.py").is_file() and not (_Path(__file__).parent / "exporters").exists():
    __path__.append(str(_root))  # noqa: F821 (package __path__)

_API = ("build", "prune", "export", "bench", "bench_matrix")
_RESULTS = ("BuildResult", "BuildPlan", "StagePlan", "PruneResult", "LayerWidths", "ExportResult", "BenchResult",
            "BenchPoint", "GateResult", "MatrixResult", "MatrixRow")
_CONFIGS = {"BuildOptions": "edgekit.pipeline", "PruneConfig": "edgekit.prune.config", "Budget": "edgekit.prune.config"}
__all__ = ["__version__", *_API, *_RESULTS, *_CONFIGS]


class _CallableModule(_ModuleType):
    """edgekit.prune and edgekit.export are a subpackage and a module as well as API verbs: once imported, the
    submodule is the package's attribute, so the module itself calls the verb (edgekit.prune(...) ==
    edgekit.api.prune(...)) while edgekit.prune.PruneConfig and friends keep working."""

    def __call__(self, *args, **kwargs):
        return getattr(self._api(), self.__name__.rpartition(".")[2])(*args, **kwargs)

    @staticmethod
    def _api():
        import edgekit.api

        return edgekit.api

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(getattr(self._api(), self.__name__.rpartition(".")[2]))


def __getattr__(name: str):
    """The API, imported on first use (edgekit.api itself imports no stage code until a verb runs)."""
    if name in ("prune", "export"):
        import importlib

        return importlib.import_module(f"edgekit.{name}")  # a _CallableModule
    if name in _CONFIGS:  # the typed options build(options=) and prune(config=) take
        import importlib

        return getattr(importlib.import_module(_CONFIGS[name]), name)
    if name in _API or name in _RESULTS:
        import edgekit.api

        return getattr(edgekit.api, name)
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")
