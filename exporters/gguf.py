"""GGUF for llama.cpp, written with gguf-py, quantized by llama.cpp's own quantizer.

The model family (edgekit/arch) picks llama.cpp's architecture: its own for uniform widths (llama, qwen2, qwen3,
gemma3, phi3), and `deci` for per-layer widths: it is the one llama.cpp architecture that builds each layer with its
own n_ff / n_head / n_head_kv (`llama` reads per-layer arrays but builds every layer with layer 0's widths). `deci`
has the Llama layout only, so families with q/k norms or four norms per layer (Qwen3, Gemma 3) export per-layer
widths elsewhere. Tensor names come from gguf-py's own HF -> GGUF map for the architecture; q/k rows are permuted
into llama.cpp's interleaved rotary layout where the architecture rotates adjacent pairs (llama, deci), partial
rotary included; fused projections are split where the architecture wants them split; Gemma's (1 + w) norms are
stored as 1 + w.
f32/f16 files are written directly; q8_0, q5_k_m, q4_k_m and q4_0 are made from an f32 GGUF by `llama_model_quantize`,
the C quantizer behind llama.cpp's llama-quantize, so K-quants and their per-tensor type mix are exactly upstream's;
the 4- and 5-bit types are calibrated with an importance matrix edgekit computes from the calibration text
(gguf_imatrix.py), or rounded to nearest without one (--no-calibrate).
The tokenizer is embedded from tokenizer.json (gguf_vocab.py: byte-level BPE as llama.cpp's `gpt2` model,
SentencePiece-style BPE with byte fallback as its SPM `llama` model) and checked: llama.cpp must tokenize held-out and
mixed text, and chat-template text with special tokens, to the same ids as the Hugging Face tokenizer, or the export
fails. An NFC normalizer (Qwen2) is the one recorded exception: llama.cpp has none, so text NFC changes is reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgekit.arch import WIDTHS_KEY, Family, LayerWidths, family_of
from edgekit.errors import EdgekitError, GateFailed
# The tokenizer (llama.cpp's `gpt2` model for byte-level BPE, its SPM `llama` model for SentencePiece-style BPE) and
# its parity check live in gguf_vocab.py; re-exported under the names callers and tests know.
from edgekit.exporters.gguf_vocab import (  # noqa: F401
    _LLAMA3_SPLIT, _QWEN2_SPLIT, KNOWN_PRE, PARITY_CHARS, add_tokenizer, pre_tokenizer_signature, tokenizer_fields,
    tokenizer_parity)

ENTRY = "model.gguf"
FTYPES = {"q8_0": 7, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
K_QUANTS = ("q5_k_m", "q4_k_m")
IMATRIX = ("q5_k_m", "q4_k_m", "q4_0")  # quantizers that weigh columns by an importance matrix (Q8_0's has none)
# GPTQ on the grids llama.cpp chose with the importance matrix (gguf_gptq.py) is the default wherever an importance
# matrix is (`--no-gptq` for the imatrix alone): SmolLM2 q4_k_m KL against llama.cpp's round-to-nearest 0.59x with the
# imatrix alone, 0.42x with GPTQ (0.0575 -> 0.0339 -> 0.0244), at a few times the export time (bench/quantize_quality.md)
FLOAT_TYPES = {"fp32": "f32", "fp16": "f16"}  # edgekit's precision -> the GGUF tensor type written directly
BLOCK = 32  # Q8_0 and every K-quant fallback type (Q5_0, Q5_1, Q8_0) pack a row in blocks of 32
K_BLOCK = 256  # K-quant super-block: rows of other widths silently fall back to a 32-block type
INTERLEAVED_ROPE = ("llama", "deci")  # llama.cpp archs that rotate adjacent pairs (HF rotates halves)
SWA_ARCHS = ("gemma3",)
Q_IS_HIDDEN = ("qwen2", "phi3")  # llama.cpp archs that assume heads x head_dim == hidden  # llama.cpp archs that apply a sliding window (per-layer pattern)


@dataclass(frozen=True)
class GgufPlan:
    """Everything the writer needs, decided (and validated) from config.json before any tensor is read."""

    arch: str  # gguf architecture
    family: Family
    hidden: int
    head_dim: int
    rotary_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tied: bool
    permute_qk: bool  # HF keeps each head's rotary halves apart; llama.cpp's llama/deci rope pairs neighbours
    split_fused: bool  # write fused qkv / gate_up as separate tensors (deci)
    layers: tuple[LayerWidths, ...]  # the checkpoint's widths
    swa: dict = field(default_factory=dict)  # sliding window, per-layer pattern, local rope base
    pad: LayerWidths | None = None  # every layer zero-padded to these widths (per-layer widths `deci` can't hold)

    @property
    def file_layers(self) -> tuple[LayerWidths, ...]:
        """The widths the GGUF declares."""
        return (self.pad,) * len(self.layers) if self.pad else self.layers

    @property
    def uniform(self) -> bool:
        return len(set(self.file_layers)) == 1


def layer_widths(config: dict) -> tuple[LayerWidths, ...]:
    """Per-layer widths: `edgekit_layer_widths` for non-uniformly pruned folders, else the config's one width."""
    n = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    per = config.get(WIDTHS_KEY)
    if per is None:
        return tuple(LayerWidths(config["intermediate_size"], heads, kv) for _ in range(n))
    if not isinstance(per, list) or len(per) != n:
        raise EdgekitError(f"config.json edgekit_layer_widths has {len(per) if isinstance(per, list) else 'no'} "
                           f"entries for {n} layers", "write one {intermediate_size, num_attention_heads, "
                           "num_key_value_heads} entry per layer")
    out = []
    for i, w in enumerate(per):
        try:
            lw = LayerWidths(int(w["intermediate_size"]), int(w["num_attention_heads"]),
                             int(w["num_key_value_heads"]))
        except (KeyError, TypeError, ValueError) as e:
            raise EdgekitError(f"config.json edgekit_layer_widths[{i}] is malformed ({e!r})",
                               "give intermediate_size, num_attention_heads, num_key_value_heads as integers") from e
        if min(asdict(lw).values()) < 1 or lw.num_attention_heads % lw.num_key_value_heads:
            raise EdgekitError(f"layer {i} widths {asdict(lw)} cannot run in llama.cpp (each needs at least one "
                               "neuron, one KV head, and query heads a multiple of KV heads)",
                               "keep at least one KV group per layer when pruning")
        out.append(lw)
    return tuple(out)


def _arch(fam: Family, config: dict, layers, head_dim: int) -> tuple[str, LayerWidths | None]:
    rot = fam.rotary_dim(config)
    if len(set(layers)) > 1 and (not fam.gguf_nonuniform or rot != head_dim):
        pad = padded_widths(layers)
        if fam.gguf_arch in Q_IS_HIDDEN and pad.num_attention_heads * head_dim != config["hidden_size"]:
            raise EdgekitError(f"this {fam.name} model has per-layer widths and a pruned hidden width: llama.cpp's "
                               f"{fam.gguf_arch} needs heads x head_dim == hidden and its `deci` (per-layer widths) "
                               "rotates whole heads", "for GGUF, prune uniformly and only MLP neurons, or export "
                               "the per-layer model with --backend executorch")
        return fam.gguf_arch, pad
    arch = _pick_arch(fam, config, layers, head_dim)
    if arch in INTERLEAVED_ROPE and rot != head_dim:
        raise EdgekitError(f"this {fam.name} model rotates {rot} of each head's {head_dim} channels; its pruned "
                           f"widths need llama.cpp's {arch} architecture, which rotates whole heads",
                           "for GGUF, prune only MLP neurons (keep every head and the hidden width: heads x "
                           "head_dim must stay equal to hidden), or export the pruned model with --backend "
                           "executorch or onnxruntime")
    return arch, None


def padded_widths(layers) -> LayerWidths:
    """The smallest uniform widths every layer fits in with its KV groups kept apart: per layer, group j's heads sit
    at j * heads-per-group; padded rows and columns are zero, so the padded model computes exactly what the per-layer
    one does (a zero query head attends uniformly, and its output column is zero)."""
    kv = max(lw.num_key_value_heads for lw in layers)
    per_group = max(lw.num_attention_heads // lw.num_key_value_heads for lw in layers)
    return LayerWidths(max(lw.intermediate_size for lw in layers), kv * per_group, kv)


def _pick_arch(fam: Family, config: dict, layers, head_dim: int) -> str:
    if len(set(layers)) > 1:
        return "deci"
    if fam.gguf_arch in Q_IS_HIDDEN and layers[0].num_attention_heads * head_dim != config["hidden_size"]:
        # llama.cpp's qwen2 and phi3 size q/o as hidden x hidden: a head-pruned one is written as llama (which takes
        # q/k/v biases and split projections; permuting q/k turns their rotate-half rope into llama's)
        return "llama"
    return fam.gguf_arch


def plan(config: dict, cfg) -> GgufPlan:
    fam = family_of(config)
    layers = layer_widths(config)
    hidden = config["hidden_size"]
    head_dim = fam.head_dim(config)
    arch, pad = _arch(fam, config, layers, head_dim)
    window = fam.sliding_window(config)
    swa = {}
    if window and arch in SWA_ARCHS:
        types = fam.layer_types(config)
        swa = {"window": int(window), "pattern": [t == "sliding_attention" for t in types],
               "local_base": float(config.get("rope_local_base_freq") or 1e4)}
    elif window and window < cfg.context_length:
        raise EdgekitError(f"this {fam.name} model uses a {window}-token sliding window, which llama.cpp's {arch} "
                           f"architecture does not apply; context {cfg.context_length} would exceed it",
                           f"export with --context {window} or less")
    rs = config.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type") or rs.get("type")
        if kind not in ("linear", "default", "llama3"):
            raise EdgekitError(f"rope_scaling {kind!r} is not supported by edgekit's GGUF exporter",
                               "use a model without rope scaling (or with linear or llama3 scaling)")
        rs = None if kind == "default" else {**rs, "rope_type": kind}
    if arch == "gemma3" and float(config.get("query_pre_attn_scalar") or head_dim) != head_dim:
        raise EdgekitError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} differs from head_dim "
                           f"{head_dim}; llama.cpp's gemma3 scales attention by head_dim", "use another backend")
    rot = fam.rotary_dim(config)
    permute = arch in INTERLEAVED_ROPE
    if permute and rot % 2:
        raise EdgekitError(f"rotary dimension {rot} is odd; rotary embeddings need an even size",
                           "check the model's config.json")
    return GgufPlan(arch=arch, family=fam, hidden=hidden, head_dim=head_dim, rotary_dim=rot,
                    vocab_size=config["vocab_size"],
                    context_length=config.get("max_position_embeddings", cfg.context_length),
                    rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(config.get("rope_theta", 1e4)),
                    rope_scaling=rs, tied=fam.tied(config), permute_qk=permute,
                    split_fused=arch in INTERLEAVED_ROPE, layers=layers, swa=swa, pad=pad)


def check_quantizable(p: GgufPlan, precision: str) -> None:
    """Quantized types pack each row in blocks of 32: refuse widths llama.cpp's quantizer would reject mid-way."""
    if precision not in FTYPES:
        return
    for i, lw in enumerate(p.file_layers):
        widths = {"hidden_size": p.hidden, f"layer {i} intermediate_size": lw.intermediate_size,
                  f"layer {i} attention width (heads x head_dim)": lw.num_attention_heads * p.head_dim}
        for what, w in widths.items():
            if w % BLOCK:
                raise EdgekitError(f"{precision} needs every weight row width divisible by {BLOCK}, but {what} is "
                                   f"{w}", f"prune to widths that are multiples of {BLOCK} ({K_BLOCK} for K-quants), "
                                   "or use --precision fp16")


# -- tensors ----------------------------------------------------------------------------------------------------

def rotary_to_interleaved(w: np.ndarray, n_heads: int, rotary_dim: int | None = None) -> np.ndarray:
    """Reorder q/k rows per head from HF's [first halves | second halves] of the rotated channels to llama.cpp's
    adjacent rotary pairs; channels past rotary_dim (partial rotary) stay where they are."""
    hd = w.shape[0] // n_heads
    rot = rotary_dim or hd
    heads = w.reshape(n_heads, hd, *w.shape[1:])
    r = heads[:, :rot].reshape(n_heads, 2, rot // 2, *w.shape[1:]).swapaxes(1, 2).reshape(n_heads, rot,
                                                                                           *w.shape[1:])
    return np.concatenate([r, heads[:, rot:]], axis=1).reshape(w.shape)


def _read_tensors(model_dir: Path):
    """(name, float32 array) for every tensor of the folder's safetensors files (shards included), one at a time."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise EdgekitError(f"{model_dir} has no *.safetensors weights", "save the model with safe_serialization=True")
    for f in files:
        with safe_open(str(f), framework="pt") as st:  # pt: bf16 has no numpy dtype
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def _expected_rows(p: GgufPlan, kind: str, lw: LayerWidths) -> int | None:
    q, kv, ff = lw.num_attention_heads * p.head_dim, lw.num_key_value_heads * p.head_dim, lw.intermediate_size
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "qkv_proj": q + 2 * kv, "gate_proj": ff, "up_proj": ff,
            "gate_up_proj": 2 * ff, "o_proj": p.hidden, "down_proj": p.hidden}.get(kind)


def _split(name: str, w: np.ndarray, p: GgufPlan, lw: LayerWidths):
    """Fused projections as their parts, for architectures that read them apart."""
    if not p.split_fused:
        return [(name, w)]
    q, kv = lw.num_attention_heads * p.head_dim, lw.num_key_value_heads * p.head_dim
    if ".qkv_proj." in name:
        return [(name.replace("qkv_proj", "q_proj"), w[:q]), (name.replace("qkv_proj", "k_proj"), w[q:q + kv]),
                (name.replace("qkv_proj", "v_proj"), w[q + kv:])]
    if ".gate_up_proj." in name:
        half = w.shape[0] // 2
        return [(name.replace("gate_up_proj", "gate_proj"), w[:half]),
                (name.replace("gate_up_proj", "up_proj"), w[half:])]
    return [(name, w)]


def _head_slots(lw: LayerWidths, pad: LayerWidths) -> np.ndarray:
    """Padded head index of each of the layer's query heads (group j's g-th head -> j * padded group size + g)."""
    g, gp = lw.num_attention_heads // lw.num_key_value_heads, pad.num_attention_heads // pad.num_key_value_heads
    return np.array([(h // g) * gp + h % g for h in range(lw.num_attention_heads)])


def _pad(name: str, w: np.ndarray, p: GgufPlan, lw: LayerWidths) -> np.ndarray:
    """A layer tensor zero-padded from its own widths to p.pad (rows of q/k/v/gate/up, columns of o/down)."""
    pad, hd = p.pad, p.head_dim

    def rows_to(n_rows, index):  # place rows at `index` in a zero tensor of n_rows
        out = np.zeros((n_rows, *w.shape[1:]), dtype=w.dtype)
        out[index] = w
        return out

    def head_rows(slots):
        return (slots[:, None] * hd + np.arange(hd)[None]).reshape(-1)

    kind = name.split(".")[-2]
    q_rows = head_rows(_head_slots(lw, pad))
    if kind == "q_proj":
        return rows_to(pad.num_attention_heads * hd, q_rows)
    if kind in ("k_proj", "v_proj"):
        return rows_to(pad.num_key_value_heads * hd, np.arange(lw.num_key_value_heads * hd))
    if kind in ("gate_proj", "up_proj"):
        return rows_to(pad.intermediate_size, np.arange(lw.intermediate_size))
    if kind == "qkv_proj":
        q, kv = lw.num_attention_heads * hd, lw.num_key_value_heads * hd
        parts = [(".q_proj.", w[:q]), (".k_proj.", w[q:q + kv]), (".v_proj.", w[q + kv:])]
        return np.concatenate([_pad(f"x{k}weight", part, p, lw) for k, part in parts])
    if kind == "gate_up_proj":
        half = w.shape[0] // 2
        return np.concatenate([_pad("x.gate_proj.weight", w[:half], p, lw), _pad("x.up_proj.weight", w[half:], p, lw)])
    if kind == "o_proj" and w.ndim == 2:
        out = np.zeros((w.shape[0], pad.num_attention_heads * hd), dtype=w.dtype)
        out[:, q_rows] = w
        return out
    if kind == "down_proj" and w.ndim == 2:
        out = np.zeros((w.shape[0], pad.intermediate_size), dtype=w.dtype)
        out[:, :lw.intermediate_size] = w
        return out
    return w


def llama3_rope_factors(p: GgufPlan) -> np.ndarray:
    """Per rotary frequency, the factor llama3 rope scaling divides it by (llama.cpp reads them as rope_freqs)."""
    rs = p.rope_scaling
    factor, lo, hi = float(rs.get("factor", 8.0)), float(rs.get("low_freq_factor", 1.0)), float(
        rs.get("high_freq_factor", 4.0))
    old = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (p.rope_theta ** (np.arange(0, p.rotary_dim, 2, dtype=np.float64) / p.rotary_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def gguf_tensors(model_dir: Path, p: GgufPlan):
    """(gguf name, array) in llama.cpp's layout, shapes checked against the plan."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, p.arch.upper()), len(p.layers))
    if p.rope_scaling and p.rope_scaling["rope_type"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(p)
    for src, w0 in _read_tensors(model_dir):
        if src.endswith("rotary_emb.inv_freq") or (p.tied and src == "lm_head.weight"):
            continue
        layer = int(src.split(".")[2]) if src.startswith("model.layers.") else None
        lw = p.layers[layer] if layer is not None else None
        if lw is not None:
            kind = src.split(".")[-2]
            rows = _expected_rows(p, kind, lw)
            if rows is not None and w0.shape[0] != rows:
                raise EdgekitError(f"tensor {src} has shape {tuple(w0.shape)} but the config's widths for layer "
                                   f"{layer} ({asdict(lw)}) need {rows} rows",
                                   "make config.json (edgekit_layer_widths for per-layer widths) match the weights")
        if p.pad is not None and lw is not None:
            w0 = _pad(src, w0, p, lw)
            lw = p.pad
        for name, w in (_split(src, w0, p, lw) if lw is not None else [(src, w0)]):
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise EdgekitError(f"tensor {name!r} has no GGUF counterpart for arch {p.arch}",
                                   f"export a standard Hugging Face {p.family.name} checkpoint")
            if p.family.norm_offset and name.endswith("norm.weight"):
                w = w + p.family.norm_offset  # llama.cpp multiplies by the stored weight
            if p.permute_qk and lw is not None and ".q_proj." in name:
                w = rotary_to_interleaved(w, lw.num_attention_heads, p.rotary_dim)
            elif p.permute_qk and lw is not None and ".k_proj." in name:
                w = rotary_to_interleaved(w, lw.num_key_value_heads, p.rotary_dim)
            yield target, np.ascontiguousarray(w)


# -- tokenizer: see gguf_vocab.py --------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_stderr():
    """Capture what C code prints on fd 2 (llama.cpp's quantizer warns per tensor; edgekit reports from the file)."""
    buf = tempfile.TemporaryFile(mode="w+b")
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(buf.fileno(), 2)
    out: list[str] = []
    try:
        yield out
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        buf.seek(0)
        out.append(buf.read().decode("utf-8", "replace"))
        buf.close()


@contextlib.contextmanager
def llama_log():
    """Collect what llama.cpp logs (its quantizer reports per tensor, and whether it read an importance matrix);
    llama-cpp-python's own callback prints to sys.stderr only until a Llama(verbose=False) silences it."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(_level, text, _user):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# -- writing ----------------------------------------------------------------------------------------------------

# llama.cpp sets token attributes by general.name: a name containing "phi3"/"phi-3" makes it look up these tokens
# with no fallback, and loading aborts (unordered_map::at) when the vocabulary lacks one of them.
_NAME_NEEDS = {("phi3", "phi-3"): ("<unk>", "<s>", "</s>", "<|endoftext|>")}


def safe_model_name(name: str, model_dir: Path) -> str:
    import re

    tj = json.loads((Path(model_dir) / "tokenizer.json").read_text()) if (Path(model_dir) / "tokenizer.json").is_file() \
        else {}
    vocab = tj.get("model", {}).get("vocab", {})  # a dict for BPE/WordPiece, [piece, score] pairs for Unigram
    have = {v if isinstance(v, str) else v[0] for v in vocab} | {a["content"] for a in tj.get("added_tokens", [])}
    for keys, needed in _NAME_NEEDS.items():
        if not have.issuperset(needed):
            name = re.sub("|".join(map(re.escape, keys)), "phi_3", name, flags=re.IGNORECASE)
    return name


def write_gguf(model_dir: Path, path: Path, p: GgufPlan, dtype: str, tensors: bool = True) -> dict:
    """An f32 or f16 GGUF (norms and biases always f32); returns the tokenizer's info (for artifact.json).
    tensors=False writes metadata and vocab only (enough for llama.cpp's vocab_only loading)."""
    import gguf

    w = gguf.GGUFWriter(str(path), p.arch)
    w.add_name(safe_model_name(Path(model_dir).name, model_dir))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(p.context_length)
    w.add_embedding_length(p.hidden)
    fl = p.file_layers
    w.add_block_count(len(fl))
    per_layer = not p.uniform
    w.add_feed_forward_length([lw.intermediate_size for lw in fl] if per_layer else fl[0].intermediate_size)
    w.add_head_count([lw.num_attention_heads for lw in fl] if per_layer else fl[0].num_attention_heads)
    w.add_head_count_kv([lw.num_key_value_heads for lw in fl] if per_layer else fl[0].num_key_value_heads)
    w.add_key_length(p.head_dim)  # explicit: llama.cpp would otherwise derive it from layer 0's head count
    w.add_value_length(p.head_dim)
    w.add_rope_dimension_count(p.rotary_dim)
    w.add_rope_freq_base(p.rope_theta)
    if p.rope_scaling and p.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(p.rope_scaling["factor"]))
    if p.swa:
        w.add_sliding_window(p.swa["window"])
        w.add_sliding_window_pattern(p.swa["pattern"])
        w.add_rope_freq_base_swa(p.swa["local_base"])
    w.add_layer_norm_rms_eps(p.rms_eps)
    w.add_vocab_size(p.vocab_size)
    tok = add_tokenizer(w, model_dir, p.vocab_size)  # tokens, scores/merges, special ids, chat template
    if tensors:
        for name, arr in gguf_tensors(model_dir, p):
            if dtype == "f16" and arr.ndim == 2:
                arr = arr.astype(np.float16)
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tok


def quantize(src: Path, dst: Path, precision: str, threads: int | None = None, imatrix=None) -> str:
    """llama.cpp's quantizer (returns its log); `imatrix` (gguf_imatrix.Imatrix) weighs each column's rounding
    error, None rounds to nearest."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[precision]
    params.nthread = threads or 0
    if imatrix is not None:
        from edgekit.exporters.gguf_imatrix import c_array

        arr, _keep = c_array(imatrix)  # _keep holds the float buffers until the call returns
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with captured_stderr() as err, llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    log = "".join(lines) + err[0]
    if rc != 0:
        last = [ln for ln in log.splitlines() if ln.strip()][-1:] or ["no message"]
        raise EdgekitError(f"llama.cpp's quantizer failed making {precision} from {src.name}: {last[0].strip()}",
                           "use --precision fp16 or fp32, or check the row widths (see docs/gguf.md)")
    return log


def tensor_types(path: Path) -> list[dict]:
    """Name, row width and stored type of every tensor in a GGUF (what llama.cpp actually wrote)."""
    from gguf import GGUFReader

    return [{"tensor": t.name, "row_width": int(t.shape[0]), "rows": int(np.prod(t.shape[1:])),
             "type": t.tensor_type.name} for t in GGUFReader(str(path)).tensors]


def quant_report(types: list[dict], precision: str) -> dict:
    """Counts of stored types, and each matrix that fell back from a K-quant (its row width is no multiple of 256)."""
    mats = [t for t in types if t["rows"] > 1]
    counts: dict[str, int] = {}
    for t in types:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    rep = {"tensor_types": counts}
    if precision in K_QUANTS:
        fb = [dict(t, reason=f"row width {t['row_width']} is not a multiple of {K_BLOCK}")
              for t in mats if not t["type"].endswith("_K")]
        rep["k_quant_fallbacks"] = fb
        rep["k_quant_tensors"] = len(mats) - len(fb)
    return rep


def export(model_dir: Path, out: Path, cfg) -> dict:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    p = plan(config, cfg)
    check_quantizable(p, cfg.precision)
    if getattr(cfg, "kv_cache", None):
        from edgekit.precision import get_kv_cache

        get_kv_cache(cfg.kv_cache).check(p.head_dim)
    final = out / ENTRY
    if cfg.precision in FLOAT_TYPES:
        tok = write_gguf(model_dir, final, p, FLOAT_TYPES[cfg.precision])
    else:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            src = Path(tmp) / "f32.gguf"
            tok = write_gguf(model_dir, src, p, "f32")
            imatrix = rounding = None
            if cfg.calibrate and cfg.precision in IMATRIX:
                from edgekit.exporters.gguf_imatrix import compute

                imatrix = compute(model_dir, p, cfg.calibration, threads=cfg.threads)
            made = Path(tmp) / ENTRY
            quantize(src, made, cfg.precision, cfg.threads, imatrix)
            if imatrix is not None and cfg.gptq is not False:  # the imatrix chose the block scales; GPTQ rounds
                from edgekit.exporters.gguf_gptq import calibrate

                rounding = calibrate(model_dir, p, made, cfg.calibration, threads=cfg.threads)
            os.replace(made, final)
    parity = tokenizer_parity(final, model_dir)  # held-out + mixed text, and chat-template text with specials
    if not parity["identical"] and not cfg.accept_gate_failure:
        part, at = (("held-out text", parity["first_difference"]) if parity["first_difference"] is not None else
                    ("chat-template text with special tokens", parity["special"]["first_difference"]))
        raise GateFailed(f"llama.cpp tokenizes the {part} differently from the Hugging Face tokenizer (first "
                         f"difference at token {at})",
                         "report the tokenizer; pass --accept-gate-failure to keep the file anyway")
    rep = quant_report(tensor_types(final), cfg.precision)
    if rep.get("k_quant_fallbacks"):
        from edgekit.ui import log

        fb = rep["k_quant_fallbacks"]
        widths = sorted({f["row_width"] for f in fb})
        log(f"gguf: {len(fb)} of {len(fb) + rep['k_quant_tensors']} weight matrices fell back from K-quants (row "
            f"widths {widths} are not multiples of {K_BLOCK}); each is listed in artifact.json k_quant_fallbacks")
    return {
        "entry": ENTRY,
        "gguf_arch": p.arch,
        "layer_widths": [asdict(lw) for lw in p.layers] if len(set(p.layers)) > 1 else None,
        # per-layer widths llama.cpp's deci cannot hold, written at the widest layer's widths with zero rows: exact,
        # but the padded rows cost what they would have saved
        **({"padded_to": asdict(p.pad)} if p.pad else {}),
        # unquantized files are gated (and run) with an f32 KV cache: llama.cpp's default f16 cache alone moves
        # logits by ~1.5e-3, more than an f32 file's own error (the planner reads the same rule from the registry).
        # An explicit --kv-cache (q8_0 at long contexts, chosen by the planner) is served and gated as asked.
        "kv_cache": getattr(cfg, "kv_cache", None) or ("f32" if cfg.precision in FLOAT_TYPES else "f16"),
        "tokenizer": {**tok, **parity},
        # None: llama.cpp's plain round-to-nearest (unquantized, Q8_0, --no-calibrate, or no tokenizer to read text)
        **({"imatrix": imatrix.summary() if imatrix else None,
            "rounding": rounding or ("llama.cpp, imatrix-weighted" if imatrix else "llama.cpp nearest")}
           if cfg.precision in FTYPES else {}),
        **rep,
    }
