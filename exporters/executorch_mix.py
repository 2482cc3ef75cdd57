"""Which linears ExecuTorch 8da4w keeps at 8 bits, and what the .pte's weights weigh: torch-free, for the planner.

8da4w is int8 dynamic activations x int4 weights in groups of 32 (XNNPACK's qb4w kernels), except the EIGHT_BIT
linears, which stay int8 with one scale per output channel (qc8w), as llama.cpp's q4_k_m keeps the head and ffn_down /
attn_v at 6 bits (XNNPACK has no 6-bit kernels). SmolLM2-135M, GPTQ, 4 x 512 held-out tokens, eager torchao: every
linear 4-bit 1.177x fp32 perplexity; one kind at 8 bits (with the head): down_proj 1.099x, v_proj 1.131x, up_proj
1.136x, k_proj 1.143x, q_proj 1.147x, gate_proj 1.148x, o_proj 1.155x, only the head 1.156x; every linear 8-bit
1.008x. The head, down, k and v are 46% of SmolLM2's linear weights (k and v only 5%).
"""

from __future__ import annotations

EIGHT_BIT = ("lm_head", "down_proj", "k_proj", "v_proj", "qkv_proj")  # a fused qkv holds k and v
EIGHT_BIT_ROLES = ("output", "ffn_down", "attn_k", "attn_v", "attn_qkv")  # the same, as exporters/gguf_types names
INT4_BITS = 4 + 16 / 32  # a bf16 scale per group of 32, as XNNPACK stores it


def keeps_8_bits(name: str) -> bool:
    """Is this linear (a module name such as model.layers.3.mlp.down_proj) one 8da4w keeps at 8 bits?"""
    return name.rpartition(".")[2] in EIGHT_BIT


def planned_weight_bytes(cfg: dict, precision: str) -> int:
    """The planner's entry (RuntimeMemory.weight_bytes): a config.json's weights in the .pte. The embedding table
    stays fp32 for the portable lookup; a tied LM head is a second, packed copy of it."""
    from edgekit.arch import family_of, geometry
    from edgekit.exporters.gguf_types import matrices

    g = geometry(cfg)
    fused = family_of(cfg).fused  # Phi-3's qkv_proj is one linear, kept 8-bit whole (its q too)
    mats = matrices(g, fused_qkv=fused, fused_gate_up=fused)
    table = g.vocab_size * g.hidden_size
    vectors = g.params() - sum(w * rows for _, _, w, rows in mats)
    if precision == "fp32":
        return 4 * (g.params() + (table if g.tied else 0))
    linear_bits = sum(w * rows * ((8 + 32 / w) if role in EIGHT_BIT_ROLES else INT4_BITS)
                      for role, _, w, rows in mats if role != "token_embd")
    return int(linear_bits / 8 + 4 * table + 4 * vectors)
