"""The precision registry: one record per weight format, the single source of every precision fact.

A precision has one canonical name and the aliases users bring from peer tools (llama.cpp's `F16`/`Q4_K_M`,
torch's `float32`); names are matched case-insensitively. The record carries what the planner (bytes per weight,
scales included), the gate (thresholds) and the pipeline (is it quantized?) need. Which backends lower it is
declared on each backend's registry entry (edgekit/exporters: `precisions`) and read back here by `backends_for`,
so adding a backend never edits this file and adding a precision never edits the planner or the gate.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class Thresholds:
    max_abs: float | None  # largest |logit difference| allowed (None: not checked, quantized weights move logits)
    top1: float  # least fraction of positions whose argmax agrees
    mean_kl: float | None  # largest mean KL(reference || artifact) in nats
    greedy_exact: bool  # the greedy continuation must be identical


@dataclass(frozen=True)
class Precision:
    name: str
    bits: float  # stored bits per weight, block scales included (what a decode step reads)
    gate: Thresholds
    quantized: bool  # False: the weights are the model's own numbers in a float format
    description: str
    aliases: tuple[str, ...] = ()
    # the fake-quantization recipe quantization-aware training uses for this format (edgekit/qat.py RECIPES: the
    # same grid and scale rule its exporter applies); None: no QAT for it
    fake_quant: str | None = None

    @property
    def bytes_per_weight(self) -> float:
        return self.bits / 8


_FP32 = Thresholds(max_abs=1e-3, top1=1.0, mean_kl=1e-5, greedy_exact=True)

PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", 32, _FP32, False, "float32 weights", ("f32", "float32", "float")),
        Precision("fp16", 16, Thresholds(max_abs=0.1, top1=0.95, mean_kl=1e-3, greedy_exact=False), False,
                  "float16 weights", ("f16", "float16", "half")),
        # ONNX Runtime MatMulNBits (weight-only, an fp32 scale per block of 32)
        Precision("int8", 8 + 32 / 32, Thresholds(max_abs=None, top1=0.85, mean_kl=0.05, greedy_exact=False), True,
                  "8-bit weights, a scale per block of 32", ("w8", "int8_weight_only")),
        # ONNX Runtime MatMulNBits 4-bit by HQQ: an fp32 scale and an fp32 zero point per group of 32 (64/128 optional)
        Precision("int4", 4 + 64 / 32, Thresholds(max_abs=None, top1=0.65, mean_kl=0.10, greedy_exact=False), True,
                  "4-bit weights (HQQ), a scale and zero point per group of 32; the LM head at 8 bits",
                  ("w4",), fake_quant="int4asym-mix"),
        Precision("q8_0", 8 + 16 / 32, Thresholds(max_abs=None, top1=0.90, mean_kl=0.02, greedy_exact=False), True,
                  "llama.cpp Q8_0: 8-bit blocks of 32 with an f16 scale"),
        # K-quant mix of 5- and 6-bit super-blocks: ~5.69 bits per weight on Llama models (llama.cpp's table)
        Precision("q5_k_m", 5.69, Thresholds(max_abs=None, top1=0.80, mean_kl=0.12, greedy_exact=False), True,
                  "llama.cpp Q5_K_M: 5-bit K-quants, 6-bit for the most sensitive tensors"),
        # K-quant mix of 4- and 6-bit super-blocks: ~4.85 bits per weight measured on Llama models
        Precision("q4_k_m", 4.85, Thresholds(max_abs=None, top1=0.70, mean_kl=0.25, greedy_exact=False), True,
                  "llama.cpp Q4_K_M: 4-bit K-quants, 6-bit for the most sensitive tensors"),
        Precision("q4_0", 4 + 16 / 32, Thresholds(max_abs=None, top1=0.65, mean_kl=0.35, greedy_exact=False), True,
                  "llama.cpp Q4_0: 4-bit blocks of 32 with an f16 scale"),
        # torchao int8 dynamic activations x int4 weights, an fp32 scale per group of 32
        Precision("8da4w", 4 + 32 / 32, Thresholds(max_abs=None, top1=0.65, mean_kl=0.35, greedy_exact=False), True,
                  "int4 weights (group 32) with int8 dynamic activations (torchao, XNNPACK)", ("a8w4",),
                  fake_quant="int8dyn-int4sym-mix"),
    )
}

_BY_NAME = {n.lower(): p for p in PRECISIONS.values() for n in (p.name, *p.aliases)}
assert len(_BY_NAME) == sum(1 + len(p.aliases) for p in PRECISIONS.values()), "a precision alias is used twice"


def lookup(name: str) -> Precision | None:
    return _BY_NAME.get(str(name).strip().lower())


def get_precision(name: str) -> Precision:
    p = lookup(name)
    if p is None:
        raise EdgekitError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}",
                           "pass one of those (case does not matter; f32/F16/Q4_K_M-style aliases work)")
    return p


@dataclass(frozen=True)
class KVCache:
    """An element format of the KV cache, for runtimes that let it differ from the weights' (llama.cpp's type_k/v)."""

    name: str
    bytes_per_element: float  # block scales included
    quantized: bool
    description: str
    block: int = 1  # elements per scale along a head: head_dim must be a multiple

    def check(self, head_dim: int) -> None:
        if head_dim % self.block:
            raise EdgekitError(f"a {self.name} KV cache stores blocks of {self.block} values per head, and this "
                               f"model's head_dim {head_dim} is not a multiple of {self.block}",
                               "pass --kv-cache f16 (or drop --kv-cache)")


KV_CACHES: dict[str, KVCache] = {
    k.name: k
    for k in (
        KVCache("f32", 4, False, "float32 keys and values"),
        KVCache("f16", 2, False, "float16 keys and values"),
        # blocks of 32 int8 with one f16 scale; llama.cpp needs flash attention to read a quantized V
        KVCache("q8_0", 34 / 32, True, "8-bit keys and values, a scale per block of 32", block=32),
    )
}


def get_kv_cache(name: str) -> KVCache:
    k = KV_CACHES.get(str(name).strip().lower())
    if k is None:
        raise EdgekitError(f"unknown KV-cache type {name!r}; known: {', '.join(KV_CACHES)}",
                           f"pass --kv-cache with one of {', '.join(KV_CACHES)}")
    return k


def qat_schemes() -> list[str]:
    """The precisions quantization-aware training can target (those with a fake-quantization recipe)."""
    return [p.name for p in PRECISIONS.values() if p.fake_quant]


def backends_for(name: str) -> list[str]:
    """The backends whose registry entry declares this precision."""
    from edgekit.exporters import REGISTRY

    p = get_precision(name)
    return [s.name for s in REGISTRY.values() if p.name in s.precisions]


__all__ = ["KV_CACHES", "KVCache", "PRECISIONS", "Precision", "Thresholds", "backends_for", "get_kv_cache",
           "get_precision", "lookup", "qat_schemes"]
