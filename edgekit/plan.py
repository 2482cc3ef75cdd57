"""Memory estimate of a model on a target: weights + KV cache + activations + runtime overhead vs. what is free."""

from __future__ import annotations

from edgekit.target import GiB, Target

# Bytes per weight, block scales included (q4_k_m mixes 4- and 6-bit blocks: ~4.85 bits on Llama models).
BYTES_PER_WEIGHT = {"fp32": 4.0, "f32": 4.0, "fp16": 2.0, "f16": 2.0, "int8": 1.0 + 4 / 256, "q8_0": 34 / 32,
                    "q4_k_m": 4.85 / 8, "8da4w": 0.5 + 2 / 32}
# Bytes per KV-cache element as each runtime stores it.
KV_BYTES = {"onnxruntime": 4, "gguf": 2, "executorch": 4, "tensorrt": 2}
# Fixed runtime cost (interpreter, libraries, arenas), measured on x86 for onnxruntime and llama.cpp.
RUNTIME_OVERHEAD_MB = {"onnxruntime": 120, "gguf": 60, "executorch": 80, "tensorrt": 600}


def count_params(cfg: dict) -> int:
    h, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    per_layer = h * hd * heads * 2 + h * hd * kv * 2 + 3 * h * cfg["intermediate_size"] + 2 * h
    emb = v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return n * per_layer + emb + h


def estimate(cfg: dict, target: Target, backend: str, precision: str, context: int, batch: int = 1) -> dict:
    params = count_params(cfg)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    weights = params * BYTES_PER_WEIGHT[precision]
    kv = cfg["num_hidden_layers"] * kv_heads * head_dim * context * 2 * KV_BYTES.get(backend, 4) * batch
    # Activations of one decode step are small; the prefill's logits and attention scores dominate.
    activations = batch * (context * cfg["vocab_size"] * 4 // 8 + heads * context * 4 * 64)
    overhead = RUNTIME_OVERHEAD_MB.get(backend, 150) * 2**20
    total = weights + kv + activations + overhead
    free = target.memory.usable_bytes
    return {
        "params": params,
        "weights_bytes": int(weights),
        "kv_cache_bytes": int(kv),
        "activations_bytes": int(activations),
        "runtime_overhead_bytes": int(overhead),
        "total_bytes": int(total),
        "available_bytes": int(free),
        "fits": bool(total <= free),
        "headroom_gb": round((free - total) / GiB, 3),
        "bytes_per_token": int(weights + kv / 2),  # decode reads every weight and, on average, half the cache
        "decode_tps_roofline": round(target.memory.bandwidth_gbps * 1e9 / (weights + kv / 2), 1),
    }
