"""The lean ONNX Runtime decoder graph, built by onnxruntime-genai's model builder (`onnxruntime_genai.models.builder`).

Per layer it emits about ten kernels: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one fused q/k/v
MatMul, GroupQueryAttention (rotary, GQA and the KV append inside, no mask or shape subgraphs), the o/gate/up/down
MatMuls and the activation. optimum's graph for the same model runs ~105 kernels per layer, whose fixed per-kernel
cost does not shrink when pruning narrows the layers (bench/prune_speed.md). The graph uses com.microsoft contrib ops
and runs in plain onnxruntime; its inputs are input_ids, attention_mask and past_key_values.N.key/value
(batch, kv_heads, past, head_dim), the same layout as optimum's, with positions taken from the mask.

The builder (0.18.0) is written against transformers 5: `adapt_config` maps a 4.57 config onto what it reads, and
`_import_builder` gives its module-level import two VLM class names transformers 4.57 does not have (never used for
the causal-LM families edgekit sends it)."""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

# transformers classes onnxruntime-genai 0.18's builder imports at module level, absent from transformers 4.57
_LATER_CLASSES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


def _import_builder():
    import transformers

    for name in _LATER_CLASSES:
        if name not in dir(transformers):  # dir() lists the lazy module's names without importing them
            setattr(transformers, name, type(name, (), {}))
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as its CLI expects)
    import builder

    return builder


def adapt_config(cfg) -> None:
    """transformers 5 moved rope_theta and rope_scaling into one `rope_parameters` dict, which the builder reads;
    a 4.57 config keeps them apart (rope_scaling may be None). Gemma 3's local base stays rope_local_base_freq.
    Mistral 4.57 configs say `sliding_window` without `layer_types`; the builder windows only the layers that
    `layer_types` marks, so every layer is marked, as transformers 4.57 windows them all."""
    if getattr(cfg, "layer_types", None) is None and getattr(cfg, "sliding_window", None):
        cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        return
    rope = dict(getattr(cfg, "rope_scaling", None) or {})
    if hasattr(cfg, "rope_scaling"):
        del cfg.rope_scaling  # else the builder copies it over rope_parameters again
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
    cfg.rope_parameters = rope
    if rope["rope_type"] == "default" and hasattr(cfg, "original_max_position_embeddings"):
        # Phi-3: the builder picks its LongRoPE variant whenever the two lengths differ; without rope scaling
        # transformers ignores the original length, so the plain variant is the same model
        cfg.original_max_position_embeddings = cfg.max_position_embeddings


def build(model_dir: Path, out_dir: Path) -> Path:
    """fp32 lean graph of the HF folder `model_dir` in `out_dir` (model.onnx + model.onnx.data); returns its path."""
    builder = _import_builder()
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # per-tensor progress bars
        opts = builder.parse_extra_options(None, str(model_dir), str(out_dir), "fp32", "cpu", cache,
                                           ["hf_token=false", "windowed_kv_cache=false"])
        adapt_config(opts["hf_details"]["hf_config"])
        builder.create_model(None, str(model_dir), str(out_dir), "fp32", "cpu", cache, **opts)
    return out_dir / "model.onnx"


if __name__ == "__main__":  # python -m edgekit.exporters.ort_genai HF_DIR OUT_DIR
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
