"""Which type llama.cpp's quantizer gives each tensor, and what the file weighs, predicted from the geometry alone.

`llama_model_quantize` does not apply one type: a q4_k_m file keeps the output head and some attn_v / ffn_down in
Q6_K, and every K-quant falls back to a 32-block type on rows whose width is not a multiple of 256 (Qwen2.5-0.5B's
896, SmolLM2's 576, Gemma 3 270M's 640), so "4.5 bits per weight" was 30% short on Qwen2.5-0.5B. This mirrors
llama.cpp's rules (src/llama-quant.cpp: llama_tensor_get_type_impl, tensor_type_fallback) for the mixes edgekit
builds, so the planner can count bytes without torch or the gguf package; tests/test_gguf_types.py holds it to the
types llama.cpp actually writes, for every family.
"""

from __future__ import annotations

# ggml's block layouts: (weights per block, bytes per block)
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
BASE = {"fp32": "F32", "fp16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # a 256-block type on a row it cannot tile


def _more_bits(i: int, n: int) -> bool:  # llama.cpp's use_more_bits: the first and last eighth, then every third
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: str, width: int) -> str:
    if width % BLOCKS[t][0] == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if width % BLOCKS[t][0] == 0 else "F16"


def _mixed(role: str, i: int, n: int, precision: str, width: int, imatrix: bool) -> str:
    """The type of one matrix (role as in llama.cpp's tensor categories; i = its layer of n)."""
    t = BASE[precision]
    if precision in ("fp32", "fp16"):
        return t
    if role == "output":  # also the token embedding when it is tied to the head
        if width % BLOCKS[t][0]:
            t = "Q8_0"
        elif t != "Q8_0":
            t = "Q6_K"
    elif precision in ("q4_k_m", "q5_k_m"):
        if role in ("attn_v", "attn_qkv", "ffn_down") and _more_bits(i, n):  # a fused qkv counts as attn_v
            t = "Q6_K"
    elif precision == "q4_0" and role == "ffn_down" and imatrix and i < n // 8:
        t = "Q4_1"  # llama.cpp guards the first ffn_down layers when an importance matrix is given
    return _fallback(t, width)


def matrices(geometry, fused_qkv: bool = False, fused_gate_up: bool = False) -> list[tuple[str, int, int, int]]:
    """(role, layer, row width, rows) of every weight matrix a GGUF of this geometry holds, in file order."""
    d, hd = geometry.hidden_size, geometry.head_dim
    out = [("output" if geometry.tied else "token_embd", -1, d, geometry.vocab_size)]
    for i, w in enumerate(geometry.layers):
        q, kv = w.num_attention_heads * hd, w.num_key_value_heads * hd
        out += ([("attn_qkv", i, d, q + 2 * kv)] if fused_qkv else
                [("attn_q", i, d, q), ("attn_k", i, d, kv), ("attn_v", i, d, kv)])
        out.append(("attn_output", i, q, d))
        out += ([("ffn_up", i, d, 2 * w.intermediate_size)] if fused_gate_up else
                [("ffn_gate", i, d, w.intermediate_size), ("ffn_up", i, d, w.intermediate_size)])
        out.append(("ffn_down", i, w.intermediate_size, d))
    if not geometry.tied:
        out.append(("output", -1, d, geometry.vocab_size))
    return out


def tensor_types(geometry, precision: str, imatrix: bool = True, **fused) -> list[dict]:
    n = len(geometry.layers)
    return [{"tensor": ("token_embd" if r == "output" and geometry.tied else r if i < 0 else f"blk.{i}.{r}") + ".weight",
             "role": r, "layer": i, "row_width": width, "rows": rows, "type": _mixed(r, i, n, precision, width, imatrix)}
            for r, i, width, rows in matrices(geometry, **fused)]


def row_bytes(t: str, width: int) -> int:
    per, size = BLOCKS[t]
    return width // per * size


def weight_bytes(geometry, precision: str, imatrix: bool = True, **fused) -> int:
    """Bytes of tensor data in the GGUF: the matrices at their mixed types, norms and biases in f32."""
    mats = sum(row_bytes(t["type"], t["row_width"]) * t["rows"] for t in tensor_types(geometry, precision, imatrix,
                                                                                       **fused))
    vectors = geometry.params() - sum(width * rows for _, _, width, rows in matrices(geometry, **fused))
    return mats + 4 * vectors


def planned_weight_bytes(cfg: dict, precision: str) -> int:
    """The planner's entry (RuntimeMemory.weight_bytes): a config.json's GGUF tensor data at `precision`."""
    from edgekit.arch import family_of, geometry

    g = geometry(cfg)
    fused = family_of(cfg).fused and g.uniform  # per-layer widths go to `deci`, which wants them split
    return weight_bytes(g, precision, fused_qkv=fused, fused_gate_up=fused)
