"""ONNX Runtime: a decoder graph with a KV cache (prefill and decode through past key/values), and weight-only
quantization by onnxruntime's own quantizer: int8 (MatMulNBits, 8 bits, blocks of 32, round-to-nearest)
and int4 (MatMulNBits, 4 bits, groups of 32/64/128, HQQ with integer zero points; the LM head at 8 bits), both
with int8 activations inside MatMulNBits (accuracy_level 4), its fast path on CPU.

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
# the linears a QAT-trained int4 model keeps at 8 bits (edgekit.qat's int4asym-mix recipe trains them so): down, and
# q/k/v whole because the lean graph fuses them into one MatMul
QAT_EIGHT_BIT = ("down_proj", "q_proj", "k_proj", "v_proj", "qkv_proj")
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


def int8_compute(model, bits: int = 8) -> int:
    """Give every `bits`-bit MatMulNBits accuracy_level 4 (int8 activations). At the default (0) ONNX Runtime 1.32
    runs 8-bit blocks on a slow generic path: SmolLM2's 576 x 49,152 head took 265 ms per decode step against 3.3 ms
    at level 4, which held int8 decode at 2 tokens/s against fp32's 30 (bench/matrix.md). 4-bit blocks gain less
    but still: Qwen2.5-0.5B int4 decode 24.4 -> 41.8 tokens/s for KL 0.0485 -> 0.0491 (commit 1be931e).
    Returns how many nodes it set."""
    from onnx import helper

    n = 0
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits" and "bits" in attrs and attrs["bits"].i == bits:
            if "accuracy_level" in attrs:
                node.attribute.remove(attrs["accuracy_level"])
            node.attribute.append(helper.make_attribute("accuracy_level", INT8_COMPUTE))
            n += 1
    return n


FLOAT_ZERO_GAIN = 2.0  # keep HQQ's float zero points where integer ones would more than double the weight error


def _hqq_integer_zero():
    """onnxruntime's HQQ quantizer, with its zero points made integers and the weights re-fitted to them
    (integer_zero_fit). HQQ optimizes a float zero point per group, and MatMulNBits runs float zero points on a slow
    path: 2.0 ms against 0.04 ms with uint8 ones for a 576 x 1536 decode step (bench/ort_int4.py), which held ONNX
    Runtime int4 decode at 3 tokens/s. A matrix whose weights already sit on a min/offset 4-bit grid (a dequantized
    Q4_1 / Q4_K GGUF, as SmolLM2's is) keeps its float zero points: there they are exact, and integer ones cost
    hundreds of times the error (SmolLM2 int4 failed its gate at KL 0.30); elsewhere integer ones cost 1.05-1.10x
    (Qwen2.5-0.5B). `kept_float` / `integer` count the matrices of each kind."""
    import torch
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    class IntegerZeroHQQ(mq.HQQWeightOnlyQuantizer):
        kept_float = integer = 0

        def quantize_internal(self, tensor, bits=4, channel_wise=True, group_size=64, optimize=True,
                              round_zero=True, axis=1):
            q0, scale, zero = super().quantize_internal(tensor, bits, channel_wise, group_size, optimize,
                                                        round_zero, axis)
            assert axis == 1 and channel_wise  # how quantize() calls it: groups along the rows of W^T
            w = tensor.float()
            w = torch.nn.functional.pad(w, (0, (group_size - w.shape[1] % group_size) % group_size))
            wg, s0, z0 = w.reshape(-1, group_size), scale.reshape(-1, 1).float(), zero.reshape(-1, 1).float()
            q, s, z = integer_zero_fit(wg, s0, z0, 2**bits - 1)
            e_float = ((q0.reshape(wg.shape).float() - z0) * s0 - wg).pow(2).sum()
            if ((q - z) * s - wg).pow(2).sum() > FLOAT_ZERO_GAIN * e_float:
                self.kept_float += 1
                return q0, scale, zero
            self.integer += 1
            return q.reshape(w.shape).int(), s.reshape(scale.shape).to(scale.dtype), z.reshape(zero.shape)

    return IntegerZeroHQQ


def qat_bits_by_row(model_dir: Path, plan) -> dict:
    """{first weight row as bytes: bits} for every linear of a QAT-trained folder, read from its safetensors: how
    the exporter finds which trained linear an ONNX MatMul's weight is (a fused qkv starts with q's first row), so
    no graph's node names are parsed."""
    from safetensors import safe_open

    from edgekit.qat import bits

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.endswith(".weight") and len(st.get_slice(k).get_shape()) == 2:
                    out[st.get_slice(k)[0:1].float().numpy().tobytes()] = bits(plan, k[: -len(".weight")])
    return out


def _qat_grid(plan):
    """A MatMulNBits node quantizer that writes the grid a QAT-trained folder trained through (edgekit.qat
    asym_grid: the same function as training's fake quantizer, so the integers are the ones training saw), in
    onnxruntime's own packing. `integer` counts the matrices (quantize() reads it as it reads HQQ's)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    from edgekit.qat import asym_grid

    class QATGrid(mq.HQQWeightOnlyQuantizer):
        integer = 0

        def quantize_internal(self, tensor, bits=4, channel_wise=True, group_size=64, optimize=True,
                              round_zero=True, axis=1):
            assert axis == 1 and channel_wise and group_size == plan.group_size and tensor.shape[1] % group_size == 0
            codes, scale, zero = asym_grid(tensor, group_size, bits)
            self.integer += 1
            return codes.int(), scale.to(tensor.dtype), zero.to(tensor.dtype)

    return QATGrid


SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8)  # fractions of each group's min-max range integer_zero_fit starts from


def integer_zero_fit(w, s, z, top: int, iters: int = 2):
    """Integer zero points and least-squares scales for the groups (rows) of `w`, starting from HQQ's (s, z) and from
    min-max grids shrunk by SHRINKS: from each start, alternately the codes, the scale that fits them best and the
    integer zero point nearest their mean offset, keeping each group's best (s, z) by squared error. On Qwen2.5-0.5B
    this leaves 1.05-1.10x float HQQ's weight error, where rounding HQQ's zero points leaves 1.14-1.26x.
    s, z: (groups, 1). Returns codes, scales, zero points."""
    import torch

    def codes(s, z):
        return torch.round(w / s + z).clamp(0, top)

    def error(s, z):
        return ((codes(s, z) - z) * s - w).pow(2).sum(1, keepdim=True)

    lo, hi = w.min(1, keepdim=True)[0], w.max(1, keepdim=True)[0]
    starts = [(s, z)]
    for k in SHRINKS:
        s0 = ((hi - lo) * k / top).clamp(min=1e-12)
        starts.append((s0, (-lo - (hi - lo) * (1 - k) / 2) / s0))
    best_s, best_z, best = s, z.round().clamp(0, top), None
    for s, z in starts:
        z = z.round().clamp(0, top)
        for _ in range(iters + 1):
            e = error(s, z)
            better = e < best if best is not None else torch.ones_like(e, dtype=torch.bool)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best = e if best is None else torch.minimum(e, best)
            d = codes(s, z) - z
            dd = (d * d).sum(1, keepdim=True)
            s = torch.where(dd > 0, (w * d).sum(1, keepdim=True) / dd.clamp(min=1e-12), s).clamp(min=1e-12)
            z = (codes(s, z) - w / s).mean(1, keepdim=True).round().clamp(0, top)
    return codes(best_s, best_z), best_s, best_z


def _qat_eight_bit(model, row_bits: dict) -> list[str]:
    """Names of the MatMul nodes whose weight is a linear the QAT recipe trained at 8 bits; a constant weight that
    is none of the trained linears is refused (its grid is unknown)."""
    import numpy as np
    from onnx import numpy_helper

    from edgekit.errors import EdgekitError

    inits = {t.name: t for t in model.graph.initializer}
    eight = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        b = numpy_helper.to_array(inits[n.input[1]])
        key = np.ascontiguousarray(b.reshape(b.shape[-2], b.shape[-1])[:, 0], dtype=np.float32).tobytes()
        if key not in row_bits:
            raise EdgekitError(f"the ONNX graph's MatMul {n.name} has a weight that is none of the QAT-trained "
                               "linears, so its grid is unknown", "report it with the model; export with -p fp32 "
                               "meanwhile")
        if row_bits[key] == 8:
            eight.append(n.name)
    return eight


def pack_zero_points(model) -> int:
    """Store every 4-bit MatMulNBits' integer-valued float zero points as packed uint8 (two values a byte, the first
    in the low nibble, rows padded to whole bytes: the operator's layout), an 8-bit one's as one uint8 each; others
    stay. Returns how many it packed."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    n = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits:
            continue
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype == np.uint8:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        bits, N, K, block = attrs["bits"], attrs["N"], attrs["K"], attrs["block_size"]
        if bits not in (4, 8) or not np.array_equal(zp, np.round(zp)):
            continue  # a matrix that kept HQQ's float zero points (_hqq_integer_zero)
        blocks = -(-K // block)
        z = zp.astype(np.uint8).reshape(N, blocks)
        if bits == 8:
            packed = z.reshape(-1)
        else:
            if blocks % 2:
                z = np.pad(z, ((0, 0), (0, 1)))
            packed = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        t = numpy_helper.from_array(packed, node.input[3])
        inits[node.input[3]].CopyFrom(t)
        n += 1
    return n


def quantize(model, precision: str, group: int | None = None, calibrate: bool = True, qat=None,
             row_bits: dict | None = None):
    """Weight-only MatMulNBits: int8 round-to-nearest in blocks of BLOCK; int4 in groups of `group` by HQQ (calibrate)
    or round-to-nearest, or on the grid a QAT plan (edgekit.qat.QATPlan) trained through, each matrix at the bits
    `row_bits` (qat_bits_by_row) gives it, the LM head at 8 bits. Returns the quantized ModelProto and a one-line
    description.

    HQQ over GPTQ and RTN by measurement on SmolLM2-135M (bench/quantize_quality.py and the commit message)."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    # its import-time basicConfig logs one INFO line per node it skips (893 on SmolLM2): only warnings surface
    logging.getLogger(mq.__name__).setLevel(logging.WARNING)

    def run(m, config, exclude=()):
        q = mq.MatMulNBitsQuantizer(m, algo_config=config, nodes_to_exclude=list(exclude))
        if config.algorithm == "HQQ":
            q.node_quantizer = (_qat_grid(qat) if qat is not None else _hqq_integer_zero())(config)
        with contextlib.redirect_stdout(io.StringIO()):
            q.process()
        q.model.topological_sort()  # what ONNXModel.save_model_to_file does before writing
        counts["float"] += getattr(q.node_quantizer, "kept_float", 0)
        counts["integer"] += getattr(q.node_quantizer, "integer", 0)
        return q.model.model

    counts = {"float": 0, "integer": 0}

    def rtn(bits, block):
        return mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)

    if precision == "int8":
        model = run(model, rtn(8, BLOCK))
        int8_compute(model)
        return model, f"weight-only int8, MatMulNBits block {BLOCK}, int8 compute"
    head = _materialize_lm_head(model)
    if head:  # the LM head first, at 8 bits: every other MatMul is excluded from this pass
        model = run(model, rtn(8, BLOCK),
                    [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head])
        int8_compute(model)
    method = "the QAT grid" if qat is not None else "HQQ" if calibrate else "round-to-nearest"
    eight = []
    if qat is not None:  # the grid's 8-bit matrices first (same rule, 8 bits), then the 4-bit ones
        eight = _qat_eight_bit(model, row_bits)
        if eight:
            model = run(model, mq.HQQWeightOnlyQuantConfig(block_size=group, bits=8),
                        [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in eight])
            int8_compute(model)
    model = run(model, mq.HQQWeightOnlyQuantConfig(block_size=group, bits=4) if calibrate or qat is not None
                else rtn(4, group))
    pack_zero_points(model)
    int8_compute(model, bits=4)
    kept, n = counts["float"], counts["float"] + counts["integer"]
    zeros = ("" if not (calibrate or qat is not None) else ", uint8 zero points" if not kept else
             f", uint8 zero points; {kept} of {n} matrices kept HQQ's float ones (the checkpoint sits on a 4-bit "
             "offset grid, as a dequantized GGUF does: exact there, but a slow path)")
    mix = f"; {len(eight)} matrices (down, q/k/v) int8 on the QAT grid" if eight else ""
    return model, (f"weight-only int4 ({method}{zeros}), MatMulNBits group {group}, int8 compute{mix}"
                   + (f"; LM head int8 block {BLOCK}, int8 compute" if head else "") + "; embedding (Gather) fp32")


IMAGE_EMBEDS = "image_embeds"


def splice_image_embeds(model, image_token_id: int) -> int:
    """Give a decoder graph a second input, image_embeds (batch, k, hidden): its k rows replace, in order, the
    embeddings of the first k positions of input_ids that hold `image_token_id` (a VLM's image features, placed as
    transformers' masked_scatter places them). Every other position keeps the graph's own embedding table, so with
    k = 0 (text-only calls feed (1, 0, hidden)) the graph computes exactly what it did without the input. One graph
    for both, so the language weights are not stored twice. Returns the hidden size."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.errors import EdgekitError

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    gather = next((n for n in g.node if n.op_type == "Gather" and n.input[0] in inits and n.input[1] == "input_ids"),
                  None)
    if gather is None:
        raise EdgekitError("the ONNX decoder graph has no embedding Gather over input_ids to splice image embeddings "
                           "into", "report it with the model, or export the language model with --backend gguf")
    hidden = int(inits[gather.input[0]].dims[1])
    ids_dtype = helper.tensor_dtype_to_np_dtype(next(i for i in g.input if i.name == "input_ids")
                                                .type.tensor_type.elem_type)
    p, emb = "/model/image_embeds/", gather.output[0]
    out = p + "ScatterND/output_0"
    for n in g.node:  # every reader of the token embeddings reads the spliced ones instead
        n.input[:] = [out if x == emb else x for x in n.input]
    g.initializer.extend([numpy_helper.from_array(np.array(image_token_id, dtype=ids_dtype), p + "image_token_id"),
                          numpy_helper.from_array(np.array([-1, hidden], dtype=np.int64), p + "rows_shape"),
                          numpy_helper.from_array(np.array([0], dtype=np.int64), p + "zero")])
    nodes = [helper.make_node("Equal", ["input_ids", p + "image_token_id"], [p + "Equal/output_0"], p + "Equal"),
             helper.make_node("NonZero", [p + "Equal/output_0"], [p + "NonZero/output_0"], p + "NonZero"),
             helper.make_node("Transpose", [p + "NonZero/output_0"], [p + "Transpose/output_0"], p + "Transpose",
                              perm=[1, 0]),  # (k, 2): one (batch, position) index per image token, in order
             helper.make_node("Reshape", [IMAGE_EMBEDS, p + "rows_shape"], [p + "Reshape/output_0"], p + "Reshape"),
             helper.make_node("Shape", [p + "Reshape/output_0"], [p + "Shape/output_0"], p + "Shape", end=1),
             helper.make_node("Slice", [p + "Transpose/output_0", p + "zero", p + "Shape/output_0", p + "zero"],
                              [p + "Slice/output_0"], p + "Slice"),  # the first k image tokens: as many as rows
             helper.make_node("ScatterND", [emb, p + "Slice/output_0", p + "Reshape/output_0"], [out],
                              p + "ScatterND")]
    at = list(g.node).index(gather) + 1
    for i, n in enumerate(nodes):
        g.node.insert(at + i, n)
    g.input.append(helper.make_tensor_value_info(IMAGE_EMBEDS, TensorProto.FLOAT,
                                                 ["batch_size", "image_positions", hidden]))
    return hidden


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
        image = cfg.image_token_id
        if image is not None:  # a VLM's language model: image features go in beside the token ids
            splice_image_embeds(model, image)
        if cfg.precision != "fp32":  # weights in blocks with an fp32 scale each, activations stay fp32
            row_bits = qat_bits_by_row(model_dir, cfg.qat) if cfg.qat is not None else None
            model, quantization = quantize(model, cfg.precision, group, cfg.calibrate, cfg.qat, row_bits)
        written = save_onnx(model, out / "model.onnx")
    return {"entry": "model.onnx", "opset": opset, "graph": graph} | ({"graph_fallback": why} if why else {}) | (
        {"external_data": EXTERNAL_DATA} if EXTERNAL_DATA in written else {}) | (
        {"quantization": quantization} if quantization else {}) | ({"group_size": group} if group else {}) | (
        {"image_embeds": {"input": IMAGE_EMBEDS, "image_token_id": image}} if image is not None else {})
