"""The exporter registry (installed as edgekit.exporters): one module per backend, one entry below.

An entry names its modules by dotted path so that nothing heavy is imported until a backend is used:
`module` converts a Hugging Face folder into an artifact on the host (torch allowed), `runtime` loads and runs the
artifact with only numpy and the backend's own runtime (what the on-device agent imports). Adding a backend is one
module here, one runner in edgekit/runtime/, and one entry in REGISTRY.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class ExporterSpec:
    name: str
    module: str
    runtime: str
    precisions: tuple[str, ...]
    description: str
    requires: str  # the pip extra that brings its libraries

    def load(self) -> ModuleType:
        return _import(self.module, self)

    def load_runtime(self) -> ModuleType:
        return _import(self.runtime, self)


def _import(dotted: str, spec: ExporterSpec) -> ModuleType:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        if e.name and (e.name == dotted or dotted.startswith(e.name + ".")):
            raise  # our own module is missing: a packaging bug, keep the traceback
        raise EdgekitError(f"backend {spec.name!r} needs the Python package {e.name!r}, which is not installed",
                           f"pip install 'edgekit[{spec.requires}]'") from e


REGISTRY: dict[str, ExporterSpec] = {
    s.name: s
    for s in (
        ExporterSpec("onnxruntime", "edgekit.exporters.onnxruntime", "edgekit.runtime.onnxruntime",
                     ("fp32", "int8"), "ONNX with a KV cache for ONNX Runtime (CPU); int8 = dynamic quantization",
                     "onnx"),
        ExporterSpec("gguf", "edgekit.exporters.gguf", "edgekit.runtime.llamacpp",
                     ("f32", "f16", "q8_0", "q4_k_m"), "GGUF for llama.cpp", "gguf"),
        ExporterSpec("executorch", "edgekit.exporters.executorch", "edgekit.runtime.executorch",
                     ("fp32", "8da4w"), "ExecuTorch .pte lowered to XNNPACK (mobile CPUs)", "executorch"),
        ExporterSpec("tensorrt", "edgekit.exporters.tensorrt", "edgekit.runtime.tensorrt",
                     ("fp32", "fp16", "int8"), "ONNX + trtexec plan; the engine is built on the Jetson itself",
                     "onnx"),
    )
}


def get(name: str) -> ExporterSpec:
    if name not in REGISTRY:
        raise EdgekitError(f"unknown backend {name!r}; known: {', '.join(REGISTRY)}", "pass one of those to --backend")
    return REGISTRY[name]
