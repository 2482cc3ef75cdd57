"""ONNX Runtime: optimum's text-generation-with-past export (prefill and decode through past key/values), and int8
dynamic quantization by onnxruntime's own quantizer."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

LIBRARIES = ("onnx", "onnxruntime", "optimum", "optimum-onnx")
OPSET = 17


def to_onnx(model_dir: Path, out_dir: Path) -> Path:
    """fp32 ONNX graph with KV-cache inputs/outputs; returns the .onnx path (weights may sit beside it)."""
    import json

    from edgekit.errors import EdgekitError

    if json.loads((Path(model_dir) / "config.json").read_text()).get("edgekit_layer_widths"):
        # optimum sizes the KV-cache inputs from one config-wide head count; per-layer widths don't fit its graph.
        raise EdgekitError(f"{model_dir} has per-layer widths (non-uniform pruning), which the ONNX export cannot "
                           "express yet", "prune with uniform widths for onnxruntime/tensorrt, or export the "
                           "non-uniform model with --backend gguf (llama.cpp's deci architecture)")
    from optimum.exporters.onnx import main_export

    with contextlib.redirect_stdout(io.StringIO()):  # optimum prints its own progress
        main_export(str(model_dir), str(out_dir), task="text-generation-with-past", device="cpu", opset=OPSET,
                    do_validation=False)  # edgekit's gate validates instead, on real text
    return out_dir / "model.onnx"


def export(model_dir: Path, out: Path, cfg) -> dict:
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        onnx_path = to_onnx(model_dir, Path(tmp))
        if cfg.precision == "fp32":
            for f in Path(tmp).iterdir():
                if f.name.startswith("model.onnx"):
                    shutil.move(str(f), out / f.name)
        else:  # int8: weights int8 per channel, activations quantized on the fly
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(onnx_path, out / "model.onnx", weight_type=QuantType.QInt8, per_channel=True)
    tok = Path(model_dir) / "tokenizer.json"
    if tok.exists():
        shutil.copy(tok, out / "tokenizer.json")
    return {"entry": "model.onnx", "opset": OPSET}
