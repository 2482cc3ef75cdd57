"""Decode speed against the memory-bandwidth roofline: each decode step reads every weight the step uses and the KV
cache once, so tokens/s can be at most bandwidth / bytes read per token (bench/gguf_decode.py measures it by hand).

Torch-free (numpy only). The bandwidth is measured here with numpy copies of a buffer far larger than the caches,
counted as read + write bytes, best of a few repeats; on a device the target profile's figure stands in.
"""

from __future__ import annotations

import time
from pathlib import Path


def measure_bandwidth(threads: int | None = None, mib: int = 256, repeats: int = 5) -> float:
    """Sustained copy bandwidth of this machine in bytes/s (read + write), split over `threads` threads (default:
    the CPUs this process may use). Takes about a second."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in np.array_split(np.arange(src.size), threads)]

    def run(b):
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])  # numpy releases the GIL for the copy

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, bounds))  # touch every page first
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(run, bounds))
            best = max(best, 2 * src.nbytes / (time.perf_counter() - t))
    return best


def roofline_fraction(artifact_bytes_read_per_token: float, tokens_per_s: float,
                      bandwidth_bytes_per_s: float) -> float | None:
    """Measured decode tokens/s as a fraction of bandwidth / bytes read per token (1.0 = at the memory limit)."""
    if not (artifact_bytes_read_per_token and tokens_per_s and bandwidth_bytes_per_s):
        return None
    return tokens_per_s * artifact_bytes_read_per_token / bandwidth_bytes_per_s


NOT_WEIGHTS = (".json", ".npz", ".jinja", ".txt", ".model", ".md")  # tokenizer, config, reference: never read


def bytes_read_per_token(artifact: Path, kv_positions: float) -> dict:
    """What one decode step of an artifact folder reads: its weight files as stored on disk, less the embedding rows
    it only gathers (a table used for input alone: ONNX Runtime's fp32 Gather copy, ExecuTorch's separate table, an
    untied model's input embedding), plus the KV cache at `kv_positions`. From artifact.json and the backend's
    declared memory model; returns the parts and their sum ("bytes")."""
    import json

    from edgekit.exporters import get
    from edgekit.precision import get_precision

    meta = json.loads((Path(artifact) / "artifact.json").read_text())
    m = meta.get("model") or {}
    spec = get(meta["backend"])
    prec = get_precision(meta["precision"])
    stored = sum((Path(artifact) / n).stat().st_size for n in meta.get("files", {})
                 if not n.endswith(NOT_WEIGHTS) and (Path(artifact) / n).is_file())
    vocab, hidden = int(m.get("vocab_size") or 0), int(m.get("hidden_size") or 0)
    rt = spec.memory
    emb = vocab * hidden
    if rt.fp32_embedding:
        gathered = emb * 4
    elif (rt.tied_stored_twice and m.get("tie_word_embeddings")) or not m.get("tie_word_embeddings"):
        gathered = emb * prec.bytes_per_weight
    else:
        gathered = 0  # one table serves as input and output: it is read in full as the LM head
    widths = m.get("layer_widths")
    kv_heads = ([w["num_key_value_heads"] for w in widths] if widths else
                [int(m.get("num_kv_heads") or 0)] * int(m.get("num_layers") or 0))
    kv_el = rt.kv_element_bytes(prec.quantized, meta.get("kv_cache"))
    kv = sum(kv_heads) * 2 * int(m.get("head_dim") or 0) * kv_positions * kv_el
    weights = max(stored - gathered, 0)
    return {"weights_bytes": int(weights), "kv_bytes": int(kv), "bytes": int(weights + kv),
            "method": "artifact files less gathered-only embedding rows, plus the KV cache at the mean position"}
