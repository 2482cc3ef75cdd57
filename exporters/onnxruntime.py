"""ONNX Runtime: optimum's text-generation-with-past export (prefill and decode through past key/values), and int8
weight-only quantization by onnxruntime's own quantizer (MatMulNBits, 8 bits, blocks of 32).

Weight-only, not dynamic: dynamic int8 also quantizes activations per tensor, and LLM activations carry outliers that
this destroys (SmolLM2-135M with quantize_dynamic: top-1 agreement 0.62, mean KL 0.57; with MatMulNBits int8: top-1
1.0, KL 0.0013, identical greedy text)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

OPSET = 17
BLOCK = 32  # int8 block size (K dimension); widths that are not multiples are padded by the quantizer
# protobuf cannot serialize a message of 2 GiB or more, nor even size it (ModelProto.ByteSize() raises EncodeError):
# graphs whose tensors come near that keep their weights in EXTERNAL_DATA beside model.onnx, where onnxruntime and
# trtexec both look for it. MARGIN covers the rest of the graph (nodes, names, shapes, protobuf's framing): about
# 46 KB per decoder layer in optimum's graphs, so ~1 MB for a 24-layer LM.
PROTOBUF_LIMIT = 2**31 - 1
MARGIN = 64 << 20
EXTERNAL_DATA = "model.onnx.data"


def _tensor_nbytes(t) -> int:
    """Bytes a TensorProto's data takes in the protobuf, from its dims and element type (raw_data itself is not read:
    that would copy it); typed repeated fields are counted at their widest varint encoding."""
    import math

    from onnx import TensorProto, helper

    if t.data_location == TensorProto.EXTERNAL:
        return 0  # already in another file
    if t.HasField("raw_data"):
        try:  # sub-byte types (int4, ...) count as one byte per element: an overestimate, on the safe side
            size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            return len(t.raw_data)  # an element type onnx can't size: measure the bytes themselves
        return math.prod(t.dims) * size
    return (4 * len(t.float_data) + 8 * len(t.double_data)
            + 10 * (len(t.int32_data) + len(t.int64_data) + len(t.uint64_data))
            + sum(len(s) + 5 for s in t.string_data))


def tensor_bytes(model) -> int:
    """Bytes of every tensor in an ONNX model: initializers (sparse ones too) and tensors inside nodes (Constant
    values), in subgraphs and functions as well. Nothing is serialized."""
    from onnx import AttributeProto

    def sparse(s) -> int:
        return _tensor_nbytes(s.values) + _tensor_nbytes(s.indices)

    def nodes(ns) -> int:
        n = 0
        for node in ns:
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    n += _tensor_nbytes(a.t)
                elif a.type == AttributeProto.TENSORS:
                    n += sum(map(_tensor_nbytes, a.tensors))
                elif a.type == AttributeProto.SPARSE_TENSOR:
                    n += sparse(a.sparse_tensor)
                elif a.type == AttributeProto.SPARSE_TENSORS:
                    n += sum(map(sparse, a.sparse_tensors))
                elif a.type == AttributeProto.GRAPH:
                    n += graph(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    n += sum(map(graph, a.graphs))
        return n

    def graph(g) -> int:
        return sum(map(_tensor_nbytes, g.initializer)) + sum(map(sparse, g.sparse_initializer)) + nodes(g.node)

    return graph(model.graph) + sum(nodes(f.node) for f in model.functions)


def needs_external_data(model) -> bool:
    """Whether `model` is too big for one protobuf file, from its tensors' sizes plus MARGIN, without serializing it
    (past 2 GB protobuf raises instead of answering)."""
    return tensor_bytes(model) + MARGIN > PROTOBUF_LIMIT


def save_onnx(model, path: Path) -> list[str]:
    """Write `model` as `path`, or, when it is too big for one protobuf, as `path` (the graph) plus EXTERNAL_DATA
    beside it (every initializer of 1 KB or more). Returns the names of the files written."""
    import onnx

    path = Path(path)
    if not needs_external_data(model):
        onnx.save(model, str(path))
        return [path.name]
    data = path.parent / EXTERNAL_DATA
    data.unlink(missing_ok=True)  # onnx appends to a data file that exists
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA)
    os.chmod(data, path.stat().st_mode & 0o777)  # onnx creates it 0600; the artifact's files read alike
    return [path.name, EXTERNAL_DATA]


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
    import onnx

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        onnx_path = to_onnx(model_dir, Path(tmp))
        if cfg.precision == "fp32":
            # Re-saved, not moved: the layout (model.onnx, plus EXTERNAL_DATA past protobuf's limit) is then the
            # same on every path, not optimum's own (model.onnx_data, at torch's threshold).
            written = save_onnx(onnx.load(str(onnx_path)), out / "model.onnx")
        else:  # int8: weights int8 in blocks of BLOCK with an fp32 scale each, activations stay fp32
            from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                          MatMulNBitsQuantizer)

            q = MatMulNBitsQuantizer(onnx.load(str(onnx_path)),
                                     algo_config=DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                                                              bits=8))
            with contextlib.redirect_stdout(io.StringIO()):
                q.process()
            q.model.topological_sort()  # what ONNXModel.save_model_to_file does before writing
            written = save_onnx(q.model.model, out / "model.onnx")
    return {"entry": "model.onnx", "opset": OPSET} | (
        {"external_data": EXTERNAL_DATA} if EXTERNAL_DATA in written else {}) | (
        {"quantization": f"weight-only int8, MatMulNBits block {BLOCK}"} if cfg.precision == "int8" else {})
