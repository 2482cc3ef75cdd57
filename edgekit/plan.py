"""Will it fit, and how fast will it decode? The memory-fit planner.

Memory = weights (bytes per weight of the precision) + KV cache (layers x KV heads x head_dim x context x 2 x bytes x
batch) + activations of one prefill chunk + the runtime's fixed overhead, against what the target leaves free (RAM
minus the OS reserve; on a Jetson the GPU shares that pool, so the CUDA context counts as overhead). Decode is bound by
memory bandwidth: every token reads all weights and the filled part of the cache, so a decode-speed goal caps the
bytes per token. The planner picks the least compression that fits with headroom: the target's preferred precision,
else a smaller one, and only when quantization alone cannot fit, a pruning ratio on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgekit.errors import EdgekitError
from edgekit.target import GiB, Target

MiB = 1 << 20
EXTERNAL_DATA_BYTES = 2**31 - 1  # ONNX graphs larger than protobuf's limit keep their weights in a separate file
# Fraction of the target's DRAM bandwidth a decode step achieves (measured on x86 by bench/gguf_decode.py).
BANDWIDTH_EFFICIENCY = 0.6
MAX_PRUNE_RATIO = 0.6  # beyond this, width pruning without much retraining loses too much


@dataclass(frozen=True)
class PlanRequest:
    context: int
    batch: int = 1
    min_decode_tps: float | None = None
    headroom: float = 0.10  # fraction of the free memory kept free
    prefill_chunk: int = 512  # activations are sized for one prefill chunk of this many tokens
    kv_cache: str | None = None  # pinned KV-cache type; None: the runtime's default, quantized only when needed to fit


@dataclass
class Candidate:
    precision: str
    prune_ratio: float
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    runtime_overhead_bytes: int
    total_bytes: int
    bytes_per_token: int
    decode_tps_estimate: float
    fits_memory: bool
    meets_speed: bool
    kv_cache: str | None = None  # None: the runtime's default KV cache

    @property
    def ok(self) -> bool:
        return self.fits_memory and self.meets_speed


@dataclass
class Plan:
    target: str
    backend: str
    params: int
    available_bytes: int
    budget_bytes: int  # available minus headroom
    request: dict
    precision: str
    prune_ratio: float
    chosen: dict
    kv_cache: str | None = None  # a KV-cache type the export must ask for (None: the runtime's default)
    candidates: list[dict] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def default_context(target: Target, cfg: dict) -> int:
    """The target's context length, capped at what the model can address."""
    return min(target.build.context_length, cfg.get("max_position_embeddings") or target.build.context_length)


def shape(cfg: dict) -> dict:
    """The shape facts the memory model needs, from the family's geometry (per-layer widths: the widest layer)."""
    from edgekit.arch import get_family

    fam = get_family(cfg.get("model_type"))
    g = fam.geometry(cfg)
    types = fam.layer_types({**cfg, "num_hidden_layers": len(g.layers)})
    return {"layers": len(g.layers), "hidden": g.hidden_size, "head_dim": g.head_dim,
            "heads": max(w.num_attention_heads for w in g.layers),
            "kv_heads": max(w.num_key_value_heads for w in g.layers),
            "kv_per_layer": [w.num_key_value_heads for w in g.layers],
            "inter": max(w.intermediate_size for w in g.layers), "vocab": g.vocab_size, "tied": g.tied,
            "sliding": [t == "sliding_attention" for t in types], "window": fam.sliding_window(cfg),
            "gguf_swa": fam.gguf_arch in ("gemma3",)}


def count_params(cfg: dict) -> int:
    """Parameters of any registered family (per-layer widths honoured), from the family's one counter."""
    from edgekit.arch import geometry

    return geometry(cfg).params()


def kv_elements(s: dict, context: int, backend: str) -> int:
    """K and V elements of the cache at `context` tokens. llama.cpp keeps only the window for sliding layers."""
    total = 0
    for kv, sliding in zip(s["kv_per_layer"], s["sliding"]):
        n = min(context, s["window"]) if sliding and s["window"] and backend == "gguf" and s["gguf_swa"] else context
        total += kv * s["head_dim"] * n * 2
    return total


def memory(cfg: dict, backend: str, precision: str, req: PlanRequest, prune_ratio: float = 0.0,
           kv_cache: str | None = None) -> dict:
    from edgekit.exporters import get
    from edgekit.precision import get_precision

    s = shape(cfg)
    rt = get(backend).memory  # the backend's memory model, declared on its registry entry
    prec = get_precision(precision)
    bpw = prec.bytes_per_weight
    params = count_params(cfg) * (1 - prune_ratio)
    emb = s["vocab"] * s["hidden"]
    if rt.fp32_embedding:
        body = params - emb * (1 if s["tied"] else 2)
        weights = body * bpw + emb * 4 + emb * (4 if s["tied"] else bpw)
        if weights > EXTERNAL_DATA_BYTES:
            # past protobuf's 2 GB the weights sit in model.onnx.data, which ONNX Runtime maps: the Gather table is
            # only paged in for the tokens used (Qwen2.5-0.5B fp32: 2,488 MB measured against 3,008 with the table)
            weights -= emb * 4
    elif rt.weight_bytes:  # the backend counts its own bytes per tensor
        import importlib

        module, func = rt.weight_bytes.split(":")
        weights = getattr(importlib.import_module(module), func)(cfg, prec.name) * (1 - prune_ratio)
    else:
        weights = params * bpw + (emb * bpw if rt.tied_stored_twice and s["tied"] else 0)
    stored = weights  # what a decode step reads
    weights += emb * bpw if rt.head_twice_at_load else 0
    kv_bytes = rt.kv_element_bytes(prec.quantized, kv_cache or req.kv_cache)
    kv = kv_elements(s, req.context, backend) * kv_bytes * req.batch
    chunk = min(req.prefill_chunk, req.context)
    # One prefill chunk, fp32: logits, attention scores against the whole context, MLP and residual activations.
    act = 4 * req.batch * chunk * ((s["vocab"] if rt.logits_per_chunk else 0) + rt.attn_buffers * s["heads"] *
                                   req.context + 3 * s["inter"] + 4 * s["hidden"]) + 4 * s["vocab"]
    overhead = rt.overhead_mb * MiB + rt.vocab_bytes * s["vocab"]
    return {"weights_bytes": int(weights), "kv_cache_bytes": int(kv * rt.kv_copies), "activations_bytes": int(act),
            "runtime_overhead_bytes": int(overhead), "total_bytes": int(weights + kv * rt.kv_copies + act + overhead),
            "bytes_per_token": int(stored + kv / 2)}


def _candidate(cfg, target, backend, precision, req, ratio, budget, kv_cache=None) -> Candidate:
    kv_cache = kv_cache or req.kv_cache
    m = memory(cfg, backend, precision, req, ratio, kv_cache)
    tps = target.memory.bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY / m["bytes_per_token"]
    return Candidate(precision=precision, prune_ratio=round(ratio, 3), decode_tps_estimate=round(tps, 1),
                     fits_memory=m["total_bytes"] <= budget,
                     meets_speed=req.min_decode_tps is None or tps >= req.min_decode_tps, kv_cache=kv_cache, **m)


def make_plan(cfg: dict, target: Target, req: PlanRequest, backend: str | None = None,
              precision: str | None = None) -> Plan:
    """Choose precision and prune ratio. `precision` pins the precision (the user asked for it)."""
    backend = backend or target.build.backend
    if req.context < 1 or req.batch < 1:
        raise EdgekitError("context and batch must be positive", "pass --context N and --batch B with N, B >= 1")
    max_pos = cfg.get("max_position_embeddings")
    if max_pos and req.context > max_pos:
        raise EdgekitError(f"context {req.context} exceeds the model's {max_pos} positions",
                           f"pass --context {max_pos} or less")
    from edgekit.exporters import get
    from edgekit.precision import get_kv_cache, get_precision

    spec = get(backend)
    if spec.kv_cache(req.kv_cache):  # a pinned KV-cache type this runtime or model cannot take: one line, here
        get_kv_cache(req.kv_cache).check(shape(cfg)["head_dim"])
    # At long contexts the cache can outweigh the weights: before dropping to coarser weights, try the runtime's
    # quantized cache (llama.cpp q8_0: about half an f16 cache, gated like q8_0 weights).
    small_kv = None if req.kv_cache else next((k for k in spec.kv_caches if get_kv_cache(k).quantized and
                                                not shape(cfg)["head_dim"] % get_kv_cache(k).block), None)
    bpw = {p: get_precision(p).bytes_per_weight for p in spec.precisions}
    preferred = bpw[target.build.precision] if target.build.backend == backend else None
    # Only what this backend declares it can build; most faithful first, starting at the target's preferred precision
    # (never more bytes than it asks for).
    options = [spec.precision(precision)] if precision else sorted(
        (p for p in spec.precisions if p in target.build.precisions or target.build.backend != backend),
        key=lambda p: -bpw[p])
    if preferred and not precision:
        options = [p for p in options if bpw[p] <= preferred] or options
    available = target.memory.usable_bytes
    budget = int(available * (1 - req.headroom))
    cands = []
    for p in options:
        cands.append(_candidate(cfg, target, backend, p, req, 0.0, budget))
        if not cands[-1].fits_memory and small_kv:
            cands.append(_candidate(cfg, target, backend, p, req, 0.0, budget, small_kv))
    chosen = next((c for c in cands if c.ok), None)
    if chosen:
        before = cands[:cands.index(chosen)]
        coarser = list(dict.fromkeys(c.precision for c in before if c.precision != chosen.precision))
        why = (f"{chosen.precision} fits without pruning" if not coarser else
               f"{chosen.precision} is the least quantization that fits; {', '.join(coarser)} would not")
    else:  # quantization alone is not enough: prune on top of the smallest precision
        smallest = options[-1]
        chosen = None
        for step in range(1, int(MAX_PRUNE_RATIO * 100) + 1):
            c = _candidate(cfg, target, backend, smallest, req, step / 100, budget, small_kv)
            if c.ok:
                chosen = c
                break
        if chosen is None:
            best = _candidate(cfg, target, backend, smallest, req, MAX_PRUNE_RATIO, budget, small_kv)
            raise EdgekitError(_impossible(cfg, target, backend, smallest, req, best, budget),
                               "lower --context or --min-decode-tps, or pick a target with more memory/bandwidth")
        cands.append(chosen)
        short = "fits" if not cands[-2].fits_memory else f"reaches {req.min_decode_tps:g} tokens/s"
        why = (f"no precision {short} alone; {smallest} plus pruning {chosen.prune_ratio:.0%} of parameters "
               f"is the least compression that does")
    if chosen.kv_cache and not req.kv_cache:
        why += (f", with a {chosen.kv_cache} KV cache (the runtime's default cache would not fit at {req.context} "
                "tokens)")
    return Plan(target=target.name, backend=backend, params=count_params(cfg), available_bytes=available,
                budget_bytes=budget, request=asdict(req), precision=chosen.precision, prune_ratio=chosen.prune_ratio,
                chosen=asdict(chosen), candidates=[asdict(c) for c in cands], reason=why, kv_cache=chosen.kv_cache)


def _impossible(cfg, target, backend, precision, req, best: Candidate, budget: int) -> str:
    at = f"{precision} with {MAX_PRUNE_RATIO:.0%} of parameters pruned"
    if not best.fits_memory:
        msg = (f"{target.name} cannot hold this model even at {at}: it needs {best.total_bytes / GiB:.2f} GiB of "
               f"{budget / GiB:.2f} GiB")
        lo, hi = 0, req.context  # what would fit: the longest context at that precision and ratio
        while lo < hi:
            mid = (lo + hi + 1) // 2
            c = _candidate(cfg, target, backend, precision, PlanRequest(mid, req.batch, None, req.headroom,
                                                                         req.prefill_chunk), MAX_PRUNE_RATIO, budget,
                           best.kv_cache)
            lo, hi = (mid, hi) if c.fits_memory else (lo, mid - 1)
        return msg + (f"; a context of {lo} tokens would fit" if lo else "")
    need = target.memory.bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY / req.min_decode_tps
    return (f"{target.name} cannot decode {req.min_decode_tps:g} tokens/s even at {at}: about "
            f"{best.decode_tps_estimate:g} tokens/s at {target.memory.bandwidth_gbps:g} GB/s; that goal needs at most "
            f"{need / 2**20:.0f} MiB read per token, this model reads {best.bytes_per_token / 2**20:.0f} MiB; "
            f"{best.decode_tps_estimate:g} tokens/s would be reachable")
