"""llama.cpp runner (through llama-cpp-python) for GGUF artifacts: numpy and llama_cpp only, no torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # llama.cpp's ggml_type ids for the KV cache (type_k / type_v)


def kv_cache_args(kv_cache: str | None) -> dict:
    """Llama() keywords for artifact.json's kv_cache; a quantized V cache needs flash attention in llama.cpp."""
    if kv_cache is None:
        return {}
    if kv_cache not in GGML_TYPES:
        raise EdgekitError(f"artifact asks for a {kv_cache!r} KV cache, which this runner does not know",
                           "re-export the artifact with a newer edgekit")
    t = GGML_TYPES[kv_cache]
    return {"type_k": t, "type_v": t, **({"flash_attn": True} if kv_cache.startswith("q") else {})}


def default_threads() -> int:
    """llama.cpp's own CLI default, one thread per physical core this process may use. llama-cpp-python's is half
    the logical CPUs: 1 on a 2-core machine, where SmolLM2 q8_0 then decodes at 33-35 tokens/s against 50-51 with 2
    (512 + 128 tokens, alternated in one run, 2026-12-03)."""
    import os

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ModuleNotFoundError:
        physical = usable
    return max(1, min(usable, physical))


class LlamaCppRunner:
    def __init__(self, model_path: Path, meta: dict, threads: int | None = None, all_logits: bool = True):
        try:
            from llama_cpp import Llama
        except ModuleNotFoundError as e:
            raise EdgekitError("llama-cpp-python is not installed",
                               "pip install llama-cpp-python (or 'edgekit[agent-gguf]')") from e
        m = meta["model"]
        self.max_context = int(meta.get("max_context", m.get("max_position_embeddings", 2048)))
        kw = kv_cache_args(meta.get("kv_cache"))
        threads = threads or default_threads()
        try:
            # logits_all: llama.cpp returns logits for every token of a batch (the gate compares them all); off for
            # benchmarks, where that n_ctx x vocab float buffer would dominate the measured memory
            self.all_logits = all_logits
            self.llm = Llama(model_path=str(model_path), n_ctx=self.max_context, logits_all=all_logits, verbose=False,
                             n_threads=threads, n_threads_batch=threads, **kw)
        except (ValueError, RuntimeError) as e:  # llama-cpp-python raises ValueError for files llama.cpp rejects
            raise EdgekitError(f"llama.cpp cannot load {model_path}: {e}", "re-export the artifact") from e
        self.vocab_size = int(self.llm.n_vocab())

    def reset(self) -> None:
        self.llm.reset()  # the next eval drops every cached position past n_tokens (0)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        start = self.llm.n_tokens
        if start + len(ids) > self.max_context:
            raise EdgekitError(f"sequence of {start + len(ids)} tokens exceeds the artifact's context "
                               f"({self.max_context})", "use a shorter prompt or export with a longer context")
        self.llm.eval(ids)
        if not self.all_logits:  # llama-cpp-python fills `scores` only with logits_all; read the last row directly
            import llama_cpp

            row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
            return np.ctypeslib.as_array(row, shape=(1, self.vocab_size)).astype(np.float32, copy=True)
        return np.array(self.llm.scores[start:start + len(ids)], dtype=np.float32)


def load(path: Path, meta: dict, threads: int | None = None, all_logits: bool = True) -> LlamaCppRunner:
    return LlamaCppRunner(Path(path) / meta["entry"], meta, threads=threads, all_logits=all_logits)
