"""Will a VLM fit? Memory of both towers on the device, arithmetic on config.json (torch-free).

- language model: edgekit.plan's memory model of the language backend on the text config (weights at its precision,
  KV cache for the whole context, one prefill chunk, the runtime's overhead); the context counts the image tokens, so
  the KV cache holds them (reported apart: images x image_tokens positions);
- vision tower + projector: their parameters at the vision precision's bytes per weight, plus one encode's fp32
  activations (a layer's hidden states, attention scores and MLP for the images encoded at once), plus the vision
  runtime's fixed overhead when it is another runtime than the language model's (one process each).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgekit.errors import EdgekitError

MiB = 1 << 20


@dataclass(frozen=True)
class VlmPlanRequest:
    context: int  # positions in the language model's sequence, image tokens included
    images: int = 1  # images per prompt (each takes image_tokens positions)
    language_backend: str = "onnxruntime"
    language_precision: str | None = None
    vision_backend: str = "onnxruntime"
    vision_precision: str | None = None
    headroom: float = 0.10


def vision_activation_bytes(g, images: int) -> int:
    """fp32 activations of one encode: residual + normed hidden + q/k/v/out, the scores of one layer, the MLP."""
    v = g.vision
    t = v.patches + int(v.class_token)
    heads = max(w.num_attention_heads for w in v.layers)
    inter = max(w.intermediate_size for w in v.layers)
    return 4 * images * (6 * t * v.hidden_size + heads * t * t + t * inter)


def vlm_memory(cfg: dict, target, req: VlmPlanRequest) -> dict:
    from edgekit.arch import vlm_family_of
    from edgekit.exporters import get
    from edgekit.plan import PlanRequest, memory
    from edgekit.precision import get_precision

    fam = vlm_family_of(cfg)
    g = fam.geometry(cfg)
    lang_spec, vis_spec = get(req.language_backend), get(req.vision_backend)
    lp = lang_spec.precision(req.language_precision)
    if not vis_spec.vision_precisions:
        raise EdgekitError(f"backend {vis_spec.name} has no vision-tower exporter",
                           "pass --vision-backend onnxruntime (or executorch, tensorrt, gguf)")
    vp = vis_spec.vision_precisions[0] if req.vision_precision is None else get_precision(req.vision_precision).name
    image_positions = req.images * g.image_tokens
    if image_positions >= req.context:
        raise EdgekitError(f"{req.images} image(s) take {image_positions} positions, the whole context of "
                           f"{req.context}", f"pass --context {image_positions + 256} or more")
    text = fam.text_config(cfg)
    lang = memory(text, lang_spec.name, lp, PlanRequest(context=req.context))
    kv_per_position = lang["kv_cache_bytes"] / req.context
    vision_params = g.vision.params() + g.projector_params
    vis_weights = int(vision_params * get_precision(vp).bytes_per_weight)
    vis_act = vision_activation_bytes(g, req.images)
    vis_overhead = 0 if vis_spec.name == lang_spec.name else int(vis_spec.memory.overhead_mb * MiB)
    total = lang["total_bytes"] + vis_weights + vis_act + vis_overhead
    budget = int(target.memory.usable_bytes * (1 - req.headroom))
    return {"target": target.name, "request": asdict(req), "language_precision": lp, "vision_precision": vp,
            "parts": g.parts(), "image_tokens": g.image_tokens, "image_positions": image_positions,
            "language": lang, "image_kv_cache_bytes": int(kv_per_position * image_positions),
            "vision": {"weights_bytes": vis_weights, "activations_bytes": vis_act,
                       "runtime_overhead_bytes": vis_overhead},
            "total_bytes": int(total), "budget_bytes": budget, "fits": total <= budget}
