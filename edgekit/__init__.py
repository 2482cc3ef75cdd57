"""edgekit: take a transformer from a workstation to an edge device.

Importing edgekit is cheap: torch, transformers and every runtime are imported only by the stage that needs them.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout targets/, exporters/ and device_tests/ sit beside this folder (installed, they are inside it):
# let the package find them there, so a checkout on PYTHONPATH behaves like the installed package.
_root = _Path(__file__).resolve().parent.parent
if (_root / "exporters" / "__init__.py").is_file() and not (_Path(__file__).parent / "exporters").exists():
    __path__.append(str(_root))  # noqa: F821 (package __path__)
