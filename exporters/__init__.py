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
class RuntimeMemory:
    """How a runtime holds a model beyond its weights, for the planner (fitted to peak RSS by
    bench/plan_calibration.py)."""

    overhead_mb: float  # interpreter, libraries, allocator arenas; on TensorRT the CUDA context
    kv_bytes: int  # bytes per KV-cache element
    vocab_bytes: int = 0  # runtime tables per vocabulary entry (llama.cpp: token text, scores, merges)
    kv_bytes_unquantized: int | None = None  # when the weights are not quantized (llama.cpp: an f32 cache)
    kv_copies: float = 1.0  # ONNX Runtime: the runner holds `past` while the session writes `present`
    attn_buffers: int = 1  # score-sized (heads x chunk x context) fp32 buffers alive during a prefill chunk
    logits_per_chunk: bool = False  # the graph emits every position's logits, not just the last
    fp32_embedding: bool = False  # ONNX Runtime: the Gather table stays fp32, and a tied LM head is a transposed copy
    tied_stored_twice: bool = False  # ExecuTorch: the .pte holds the embedding table and the LM head apart
    # ExecuTorch: XNNPACK repacks each delegated weight at load and then frees the program's copy, so the largest one
    # (the LM head, vocab x hidden) is briefly held twice: the peak, measured at load (bench/plan_calibration.md)
    head_twice_at_load: bool = False
    # "module:function(cfg, precision) -> bytes" when the backend does not store every weight at the precision's
    # nominal bits (llama.cpp mixes types per tensor and falls back on rows K-quants cannot tile)
    weight_bytes: str | None = None

    def kv_element_bytes(self, weights_quantized: bool, kv_cache: str | None = None) -> float:
        """Bytes per KV-cache element: an explicit cache type (llama.cpp's --kv-cache), else the runtime's default."""
        if kv_cache:
            from edgekit.precision import get_kv_cache

            return get_kv_cache(kv_cache).bytes_per_element
        return self.kv_bytes_unquantized if self.kv_bytes_unquantized and not weights_quantized else self.kv_bytes


@dataclass(frozen=True)
class ExporterSpec:
    """A backend's contract: what it exports, where its artifacts run, how they are gated, how they hold memory."""

    name: str
    module: str
    runtime: str
    precisions: tuple[str, ...]  # canonical names from edgekit.precision, most faithful first
    description: str
    requires: str  # the pip extra that brings its libraries
    memory: RuntimeMemory
    libraries: tuple[str, ...] = ()  # distributions whose versions artifact.json records
    # None: the artifact runs on this host and is gated there. Otherwise the module that gates its source graph on the
    # host, and the artifact itself is benchmarked only on the device (TensorRT).
    host_gate: str | None = None
    # precisions users will ask for that this backend does not build yet, with the reason (said in the error)
    not_yet: tuple[tuple[str, str], ...] = ()
    # precisions it exports a VLM's vision tower + projector in (exporters/vision.py), most faithful first; () = none
    vision_precisions: tuple[str, ...] = ()
    # its language artifact also takes a VLM's image embeddings at the image-token positions
    # (ExportConfig.image_token_id)
    image_embeds: bool = False
    # KV-cache element types the runtime can be told to use (edgekit.precision.KV_CACHES); () = only its default
    kv_caches: tuple[str, ...] = ()

    @property
    def host_runtime(self) -> bool:
        return self.host_gate is None

    def load(self) -> ModuleType:
        return _import(self.module, self)

    def load_runtime(self) -> ModuleType:
        return _import(self.runtime, self)

    def precision(self, name: str | None) -> str:
        """`name` (any alias, any case) as this backend's canonical precision; None: its most faithful one."""
        from edgekit.precision import get_precision

        if name is None:
            return self.precisions[0]
        p = get_precision(name).name
        if p not in self.precisions:
            from edgekit.precision import backends_for

            why = dict(self.not_yet).get(p)
            others = [b for b in backends_for(p) if b != self.name]
            detail = f": {why}" if why else (f"; {p} is built by {', '.join(others)}" if others else "")
            raise EdgekitError(f"backend {self.name} cannot produce precision {p!r}{detail}",
                               f"use --precision with one of {', '.join(self.precisions)}")
        return p

    def kv_cache(self, name: str | None) -> str | None:
        """`name` as a KV-cache type this backend's runtime takes; None stays None (the runtime's default)."""
        if name is None:
            return None
        from edgekit.precision import get_kv_cache

        k = get_kv_cache(name).name
        if k not in self.kv_caches:
            others = [s.name for s in REGISTRY.values() if k in s.kv_caches]
            raise EdgekitError(f"backend {self.name} does not take a KV-cache type (--kv-cache {k})"
                               + (f"; {k} is {', '.join(others)}'s" if others else ""),
                               "drop --kv-cache" + (f", or use --backend {others[0]}" if others else ""))
        return k


def _import(dotted: str, spec: ExporterSpec) -> ModuleType:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        if e.name and (e.name == dotted or dotted.startswith(e.name + ".")):
            raise  # our own module is missing: a packaging bug, keep the traceback
        raise EdgekitError(f"backend {spec.name!r} needs the Python package {e.name!r}, which is not installed",
                           f"pip install 'edgekit[{spec.requires}]'") from e


ORT_LIBRARIES = ("onnx", "onnxruntime", "optimum", "optimum-onnx", "onnxruntime-genai")

REGISTRY: dict[str, ExporterSpec] = {
    s.name: s
    for s in (
        ExporterSpec("onnxruntime", "edgekit.exporters.onnxruntime", "edgekit.runtime.onnxruntime",
                     ("fp32", "int8", "int4"), "ONNX with a KV cache for ONNX Runtime (CPU); int8/int4 = weight-only "
                     "MatMulNBits",
                     "onnx", RuntimeMemory(overhead_mb=90, kv_bytes=4, kv_copies=2, attn_buffers=3,
                                           logits_per_chunk=True, fp32_embedding=True),
                     ORT_LIBRARIES, vision_precisions=("fp32",), image_embeds=True),
        ExporterSpec("gguf", "edgekit.exporters.gguf", "edgekit.runtime.llamacpp",
                     ("fp32", "fp16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"), "GGUF for llama.cpp", "gguf",
                     # f16 cache; unquantized artifacts get an f32 one (f16 alone adds ~1.5e-3 logit error)
                     # fitted on SmolLM2 (49k vocab), Gemma 3 270M (262k) and Qwen2.5-0.5B (152k) at q8_0 and q4_k_m:
                     # 72 MB + 160 B per token of vocabulary, within 5% of peak RSS (bench/plan_calibration.md)
                     RuntimeMemory(overhead_mb=72, vocab_bytes=160, kv_bytes=2, kv_bytes_unquantized=4,
                                   weight_bytes="edgekit.exporters.gguf_types:planned_weight_bytes"),
                     ("gguf", "llama-cpp-python", "safetensors", "tokenizers"), kv_caches=("f32", "f16", "q8_0"),
                     vision_precisions=("fp32", "fp16")),  # llama.cpp's mmproj (exporters/mmproj.py)
        # fitted on SmolLM2-135M at 512 and 2048 tokens of context and Gemma 3 270M at 1024 (bench/plan_calibration.md):
        # the Python runtime imports torch (~400 MB); one 512-token chunk's activations are planned (MAX_CHUNK)
        ExporterSpec("executorch", "edgekit.exporters.executorch", "edgekit.runtime.executorch",
                     ("fp32", "8da4w"), "ExecuTorch .pte lowered to XNNPACK (mobile CPUs)", "executorch",
                     RuntimeMemory(overhead_mb=400, kv_bytes=4, attn_buffers=6, logits_per_chunk=True,
                                   tied_stored_twice=True, head_twice_at_load=True,
                                   # 8da4w keeps the head, down, k and v at 8 bits: counted per tensor
                                   weight_bytes="edgekit.exporters.executorch_mix:planned_weight_bytes"),
                     ("executorch", "torchao"), vision_precisions=("fp32",), image_embeds=True),
        ExporterSpec("tensorrt", "edgekit.exporters.tensorrt", "edgekit.runtime.tensorrt",
                     ("fp32", "fp16"), "ONNX + trtexec plan; the engine is built on the Jetson itself", "onnx",
                     RuntimeMemory(overhead_mb=700, kv_bytes=2, attn_buffers=2, logits_per_chunk=True),
                     ORT_LIBRARIES, host_gate="edgekit.runtime.onnxruntime",
                     # not declared, so never planned (the planner once chose it and the export failed)
                     not_yet=(("int8", "TensorRT int8 needs a calibrated (QDQ) graph, which edgekit does not "
                                       "produce yet"),), vision_precisions=("fp32", "fp16")),
    )
}


def get(name: str) -> ExporterSpec:
    if name not in REGISTRY:
        raise EdgekitError(f"unknown backend {name!r}; known: {', '.join(REGISTRY)}", "pass one of those to --backend")
    return REGISTRY[name]
