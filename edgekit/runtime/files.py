"""Plain model files (a .gguf, .onnx or .pte with no artifact.json): what a runner needs, read from the file itself.

`edgekit bench model.gguf` works like llama-bench on any GGUF: the family, context length, vocabulary and file type
come from the GGUF header (gguf-py, memory-mapped, no tensor is read). An ONNX graph must be a causal LM with a KV
cache (optimum's text-generation-with-past layout: `input_ids` and `past_key_values.*`); a .pte must have edgekit's
`forward(input_ids, input_pos)` method. Nothing here imports torch except what ExecuTorch's own runtime imports.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import EdgekitError

SUFFIX_BACKENDS = {".gguf": "gguf", ".onnx": "onnxruntime", ".pte": "executorch"}
USAGE_FIX = "pass an artifact folder (has artifact.json) or a .gguf, .onnx or .pte file"


def _precision(name: str) -> str:
    """The precision registry's name when it knows the format (f32 -> fp32), else the file's own (q4_1)."""
    from edgekit.precision import lookup

    p = lookup(name)
    return p.name if p else name


def _gguf(path: Path) -> dict:
    try:
        from gguf import GGUFReader, LlamaFileType
    except ModuleNotFoundError as e:
        raise EdgekitError("reading a .gguf needs the Python package 'gguf'", "pip install 'edgekit[gguf]'") from e
    try:
        r = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError/struct errors on foreign bytes
        raise EdgekitError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e!r})",
                           "pass a GGUF that llama.cpp writes") from e

    def field(key, default=None):
        f = r.get_field(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if not arch:
        raise EdgekitError(f"{path} has no general.architecture", "pass a GGUF that llama.cpp writes")
    tokens = r.get_field("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else field(f"{arch}.vocab_size")
    ftype = field("general.file_type")
    try:
        fname = LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except ValueError:
        fname = "unknown" if ftype is None else f"file_type {ftype}"
    ctx = int(field(f"{arch}.context_length", 0)) or None
    return {"precision": _precision(fname), "model": {"architecture": arch, "vocab_size": vocab,
                                                     "max_position_embeddings": ctx, "name": field("general.name")}}


def _companion_config(path: Path) -> dict:
    """config.json beside an ONNX file (optimum writes one into its folder): vocab and positions, when present."""
    cfg = path.parent / "config.json"
    try:
        c = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, json.JSONDecodeError):
        c = {}
    heads = c.get("num_attention_heads")
    # a GroupQueryAttention graph leaves the KV head_dim symbolic: the runner reads it from here
    head_dim = c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None)
    return {"architecture": (c.get("architectures") or [c.get("model_type")])[0], "vocab_size": c.get("vocab_size"),
            "max_position_embeddings": c.get("max_position_embeddings"), "head_dim": head_dim,
            "num_kv_heads": c.get("num_key_value_heads") or heads}


def _onnx(path: Path) -> dict:
    model = _companion_config(path)
    precision = "unknown"
    try:
        import onnx
    except ModuleNotFoundError:  # the runner still checks the graph's inputs; only the precision stays unknown
        return {"precision": precision, "model": model}
    try:
        g = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises DecodeError and friends on foreign bytes
        raise EdgekitError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0] if str(e) else e!r})",
                           "pass a graph that onnx.load opens") from e
    names = {i.name for i in g.input}
    if "input_ids" not in names or not any(n.startswith("past_key_values.") for n in names):
        raise EdgekitError(f"{path} is not a causal LM with a KV cache (inputs: {', '.join(sorted(names))[:200]})",
                           "export it with optimum's text-generation-with-past task (or `edgekit export`)")
    logits = next((o for o in g.output if o.name == "logits"), None)
    if logits is not None and model["vocab_size"] is None:
        last = logits.type.tensor_type.shape.dim[-1]
        model["vocab_size"] = last.dim_value or None
    nbits = [a.i for n in g.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    if nbits:
        precision = _precision(f"int{max(nbits)}")
    else:  # the floating type holding most weight bytes
        sizes: dict[int, int] = {}
        for t in g.initializer:
            n = 1
            for d in t.dims:
                n *= d
            sizes[t.data_type] = sizes.get(t.data_type, 0) + n
        main = max(sizes, key=sizes.get) if sizes else None
        precision = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16",
                     onnx.TensorProto.BFLOAT16: "bf16"}.get(main, precision)
    return {"precision": precision, "model": model}


def _pte(path: Path) -> dict:
    try:
        from executorch.runtime import Runtime
    except ModuleNotFoundError as e:
        raise EdgekitError(f"reading a .pte needs the ExecuTorch runtime ({e.name} missing)",
                           "pip install 'edgekit[executorch]'") from e
    try:
        m = Runtime.get().load_program(path).metadata("forward")
    except Exception as e:  # the pybindings raise RuntimeError with an error code
        raise EdgekitError(f"{path} has no loadable forward method ({str(e).splitlines()[0] if str(e) else e!r})",
                           "pass a .pte with forward(input_ids, input_pos), as `edgekit export -b executorch` "
                           "writes") from e
    if m.num_inputs() not in (2, 4) or m.num_outputs() < 1:  # 4: a VLM's language .pte (+ image_embeds, image_mask)
        raise EdgekitError(f"{path}'s forward takes {m.num_inputs()} inputs, not (input_ids, input_pos)",
                           "pass a .pte as `edgekit export -b executorch` writes")
    # The sequence dim is dynamic up to the static KV cache's length; the meta reports that upper bound.
    seq = int(m.input_tensor_meta(0).sizes()[-1])
    vocab = int(m.output_tensor_meta(0).sizes()[-1])
    return {"precision": "unknown", "model": {"architecture": None, "vocab_size": vocab,
                                              "max_position_embeddings": seq}}


def describe_file(path: Path) -> dict:
    """An artifact.json-shaped description of a plain model file (`source: file`, no `files` hashes)."""
    path = Path(path)
    backend = SUFFIX_BACKENDS.get(path.suffix.lower())
    if backend is None:
        raise EdgekitError(f"{path} is neither an artifact folder nor a .gguf, .onnx or .pte file", USAGE_FIX)
    if not path.is_file():
        raise EdgekitError(f"{path} does not exist", USAGE_FIX)
    info = {"gguf": _gguf, "onnxruntime": _onnx, "executorch": _pte}[backend](path)
    return {"backend": backend, "source": "file", "entry": path.name, "size_bytes": path.stat().st_size,
            "max_context": info["model"].get("max_position_embeddings"), **info}
