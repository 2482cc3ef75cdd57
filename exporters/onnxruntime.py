"""ONNX Runtime: optimum's text-generation-with-past export (prefill and decode through past key/values), and int8
weight-only quantization by onnxruntime's own quantizer (MatMulNBits, 8 bits, blocks of 32).

Weight-only, not dynamic: dynamic int8 also quantizes activations per tensor, and LLM activations carry outliers that
this destroys (SmolLM2-135M with quantize_dynamic: top-1 agreement 0.62, mean KL 0.57; with MatMulNBits int8: top-1
1.0, KL 0.0013, identical greedy text)."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

LIBRARIES = ("onnx", "onnxruntime", "optimum", "optimum-onnx")
OPSET = 17
BLOCK = 32  # int8 block size (K dimension); widths that are not multiples are padded by the quantizer


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
        else:  # int8: weights int8 in blocks of BLOCK with an fp32 scale each, activations stay fp32
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                          MatMulNBitsQuantizer)

            q = MatMulNBitsQuantizer(onnx.load(str(onnx_path)),
                                     algo_config=DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                                                              bits=8))
            with contextlib.redirect_stdout(io.StringIO()):
                q.process()
            q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
    tok = Path(model_dir) / "tokenizer.json"
    if tok.exists():
        shutil.copy(tok, out / "tokenizer.json")
    return {"entry": "model.onnx", "opset": OPSET} | (
        {"quantization": f"weight-only int8, MatMulNBits block {BLOCK}"} if cfg.precision == "int8" else {})
