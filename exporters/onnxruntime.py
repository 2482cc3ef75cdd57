"""ONNX Runtime: a decoder graph with a KV cache (prefill and decode through past key/values), and weight-only
quantization by onnxruntime's own quantizer: int8 (MatMulNBits, 8 bits, blocks of 32, round-to-nearest)
and int4 (MatMulNBits, 4 bits, groups of 32/64/128, HQQ; the LM head at 8 bits).

Weight-only, not dynamic: dynamic int8 also quantizes activations per tensor, and LLM activations carry outliers that
this destroys (SmolLM2-135M with quantize_dynamic: top-1 agreement 0.62, mean KL 0.57; with MatMulNBits int8: top-1
1.0, KL 0.0013, identical greedy text).

Two graphs (GRAPHS), chosen per model by `choose_graph`: "lean", onnxruntime-genai's builder (exporters/ort_genai.py:
GroupQueryAttention, fused norms, ~11 kernels per layer), for every family that declares `ort_lean` and whose
geometry its kernels take; "optimum", optimum's text-generation-with-past export (~105 kernels per layer), for the
rest. Both take input_ids, attention_mask and past_key_values.N.key/value and return logits and present.N.*, so one
runner drives both. The lean graph decodes pruned models faster: its per-kernel overhead is small enough that speed
follows the weights (bench/prune_speed.md)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

OPSET = 17
BLOCK = 32  # int8 block size (K dimension); widths that are not multiples are padded by the quantizer
GROUP_SIZES = (32, 64, 128)  # int4 groups along K; the first is the default
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


LEAN, OPTIMUM = "lean", "optimum"
GRAPHS = (LEAN, OPTIMUM)


def lean_refusal(config: dict) -> str | None:
    """Why the lean graph cannot express this model (None: it can), in words for artifact.json."""
    import importlib.util

    from edgekit.arch import get_family

    fam = get_family(config.get("model_type"))
    if not fam.ort_lean:
        return f"the lean graph is not enabled for the {fam.name} family"
    hd, rot = fam.head_dim(config), fam.rotary_dim(config)
    if rot != hd:  # measured: the builder's partial-rotary graph (Phi-4-mini's 3/4) does not match transformers
        return f"partial rotary ({rot} of {hd} channels per head)"
    if (rot // 2) % 8:  # GroupQueryAttention's rotary kernel takes cos/sin caches of a multiple of 8 columns
        return f"GroupQueryAttention needs a rotary half-width that is a multiple of 8 (this model's: {rot // 2})"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai is not installed (pip install 'edgekit[onnx]')"
    return None


def choose_graph(config: dict, requested: str | None = None) -> tuple[str, str | None]:
    """(graph, why the lean one was not used). `requested` None picks the lean graph wherever it applies; "lean"
    refuses a model it cannot express in one line; "optimum" forces optimum's graph."""
    from edgekit.errors import EdgekitError

    if requested not in (None, *GRAPHS):
        raise EdgekitError(f"unknown ONNX graph {requested!r}; known: {', '.join(GRAPHS)}",
                           f"pass one of {', '.join(GRAPHS)}")
    if requested == OPTIMUM:
        return OPTIMUM, "asked for"
    why = lean_refusal(config)
    if why and requested == LEAN:
        raise EdgekitError(f"the lean ONNX graph cannot express this model: {why}",
                           "export it without asking for the lean graph (optimum's graph is the fallback)")
    return (OPTIMUM, why) if why else (LEAN, None)


def check_uniform(model_dir: Path) -> None:
    import json

    from edgekit.errors import EdgekitError

    if json.loads((Path(model_dir) / "config.json").read_text()).get("edgekit_layer_widths"):
        # optimum sizes the KV-cache inputs from one config-wide head count; per-layer widths don't fit its graph.
        raise EdgekitError(f"{model_dir} has per-layer widths (non-uniform pruning), which the ONNX export cannot "
                           "express yet", "prune with uniform widths for onnxruntime/tensorrt, or export the "
                           "non-uniform model with --backend gguf (llama.cpp's deci architecture)")


def to_onnx(model_dir: Path, out_dir: Path) -> Path:
    """optimum's fp32 ONNX graph with KV-cache inputs/outputs (TensorRT's source graph: no contrib ops); returns
    the .onnx path (weights may sit beside it)."""
    check_uniform(model_dir)
    from optimum.exporters.onnx import main_export

    with contextlib.redirect_stdout(io.StringIO()):  # optimum prints its own progress
        main_export(str(model_dir), str(out_dir), task="text-generation-with-past", device="cpu", opset=OPSET,
                    do_validation=False)  # edgekit's gate validates instead, on real text
    return out_dir / "model.onnx"


def check_group_size(config: dict, precision: str, group_size: int | None) -> int | None:
    """The int4 group size to use, or a one-line error: one of GROUP_SIZES that divides every input width a
    projection has (hidden, attention output, MLP), so no group straddles two rows' worth of padding."""
    from edgekit.arch import get_family
    from edgekit.errors import EdgekitError

    if precision != "int4":
        if group_size is not None:
            raise EdgekitError(f"a group size applies to int4 only, not {precision}",
                               "drop the group size, or export --precision int4")
        return None
    group = group_size or GROUP_SIZES[0]
    if group not in GROUP_SIZES:
        raise EdgekitError(f"int4 group size {group} is not one of {', '.join(map(str, GROUP_SIZES))}",
                           f"pass one of {', '.join(map(str, GROUP_SIZES))}")
    widths = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"],
              "attention heads x head_dim": config["num_attention_heads"] * get_family(config.get("model_type"))
              .head_dim(config)}
    bad = {k: w for k, w in widths.items() if w % group}
    if bad:
        fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
        raise EdgekitError(f"int4 group size {group} does not divide the model's "
                           f"{', '.join(f'{k} {w}' for k, w in bad.items())}",
                           f"pass group size {' or '.join(map(str, fits))}" if fits else
                           "export int8, or prune to widths that are multiples of 32")
    return group


def _materialize_lm_head(model) -> str | None:
    """The MatMul that makes the logits, with its weight as an initializer (optimum feeds a tied LM head through a
    Transpose of the embedding, which the quantizer cannot see as a constant). Returns the node's name."""
    from onnx import numpy_helper

    g = model.graph
    node = next((n for n in g.node if n.op_type == "MatMul" and "logits" in n.output), None)
    if node is None:
        return None
    inits = {i.name: i for i in g.initializer}
    if node.input[1] not in inits:
        tr = next((n for n in g.node if n.op_type == "Transpose" and n.output[0] == node.input[1]), None)
        if tr is None or tr.input[0] not in inits:
            return None
        name = tr.input[0] + "_lm_head"
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[tr.input[0]]).T.copy(), name))
        node.input[1] = name
        if not any(tr.output[0] in n.input for n in g.node):
            g.node.remove(tr)
    return node.name


INT8_COMPUTE = 4  # MatMulNBits accuracy_level: int8 activations x the packed weights (MLAS's CompInt8 kernels)


def fast_8bit(model) -> int:
    """Give every 8-bit MatMulNBits accuracy_level 4. At the default (0) ONNX Runtime 1.32 runs 8-bit blocks on a
    slow generic path: SmolLM2's 576 x 49,152 head took 265 ms per decode step against 3.3 ms at level 4 (4-bit:
    3.1 and 2.2 ms), which held int4 and int8 decode at 2-3 tokens/s against fp32's 30 (bench/matrix.md).
    Returns how many nodes it set."""
    from onnx import helper

    n = 0
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits" and "bits" in attrs and attrs["bits"].i == 8:
            if "accuracy_level" in attrs:
                node.attribute.remove(attrs["accuracy_level"])
            node.attribute.append(helper.make_attribute("accuracy_level", INT8_COMPUTE))
            n += 1
    return n


def quantize(model, precision: str, group: int | None = None, calibrate: bool = True):
    """Weight-only MatMulNBits: int8 round-to-nearest in blocks of BLOCK; int4 in groups of `group` by HQQ (calibrate)
    or round-to-nearest, the LM head at 8 bits. Returns the quantized ModelProto and a one-line description.

    HQQ over GPTQ and RTN by measurement on SmolLM2-135M (bench/quantize_quality.py and the commit message)."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    # its import-time basicConfig logs one INFO line per node it skips (893 on SmolLM2): only warnings surface
    logging.getLogger(mq.__name__).setLevel(logging.WARNING)

    def run(m, config, exclude=()):
        q = mq.MatMulNBitsQuantizer(m, algo_config=config, nodes_to_exclude=list(exclude))
        with contextlib.redirect_stdout(io.StringIO()):
            q.process()
        q.model.topological_sort()  # what ONNXModel.save_model_to_file does before writing
        return q.model.model

    def rtn(bits, block):
        return mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)

    if precision == "int8":
        model = run(model, rtn(8, BLOCK))
        fast_8bit(model)
        return model, f"weight-only int8, MatMulNBits block {BLOCK}, int8 compute"
    head = _materialize_lm_head(model)
    if head:  # the LM head first, at 8 bits: every other MatMul is excluded from this pass
        model = run(model, rtn(8, BLOCK), [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head])
        fast_8bit(model)
    method = "HQQ" if calibrate else "round-to-nearest"
    model = run(model, mq.HQQWeightOnlyQuantConfig(block_size=group, bits=4) if calibrate else rtn(4, group))
    return model, (f"weight-only int4 ({method}), MatMulNBits group {group}"
                   + (f"; LM head int8 block {BLOCK}, int8 compute" if head else "") + "; embedding (Gather) fp32")


def export(model_dir: Path, out: Path, cfg) -> dict:
    import json

    import onnx

    config = json.loads((Path(model_dir) / "config.json").read_text())
    group = check_group_size(config, cfg.precision, cfg.group_size)
    check_uniform(model_dir)
    graph, why = choose_graph(config, getattr(cfg, "onnx_graph", None))
    quantization = None
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        if graph == LEAN:
            from edgekit.exporters import ort_genai

            onnx_path = ort_genai.build(model_dir, Path(tmp))
        else:
            onnx_path = to_onnx(model_dir, Path(tmp))
        model = onnx.load(str(onnx_path))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        # Re-saved, not moved: the layout (model.onnx, plus EXTERNAL_DATA past protobuf's limit) is then the same on
        # every path, not optimum's own (model.onnx_data, at torch's threshold) nor the builder's (always external).
        if cfg.precision != "fp32":  # weights in blocks with an fp32 scale each, activations stay fp32
            model, quantization = quantize(model, cfg.precision, group, cfg.calibrate)
        written = save_onnx(model, out / "model.onnx")
    return {"entry": "model.onnx", "opset": opset, "graph": graph} | ({"graph_fallback": why} if why else {}) | (
        {"external_data": EXTERNAL_DATA} if EXTERNAL_DATA in written else {}) | (
        {"quantization": quantization} if quantization else {}) | ({"group_size": group} if group else {})
