"""An importance matrix for llama.cpp's quantizer, computed by edgekit in PyTorch from the calibration text.

llama.cpp's imatrix is, per weight matrix, the mean over calibration tokens of each input column's squared
activation: the quantizer then minimizes sum_j imatrix[j] * (w_j - q_j)^2 per row, so columns that carry large
activations are rounded most carefully (its K-quants and Q4_0 take it; a plain export is round-to-nearest). edgekit
computes it with a forward hook on every nn.Linear of the Hugging Face model over token windows of the calibration
text, then names each vector as the GGUF tensor it weighs. Column importance survives every layout change the GGUF
writer makes: q/k are permuted by rows (rotary interleave), not columns; fused qkv / gate_up parts, split for `deci`,
share the fused input; per-layer widths zero-padded to the widest layer pad o_proj/down_proj columns, which get the
layer's mean importance (their weights are zero, so any positive value quantizes them exactly).

The vectors reach `llama_model_quantize` through its C API (`llama_model_quantize_params.imatrix`, an array of
{name, data, size} ended by a NULL name, in llama.cpp since the llama_model_imatrix_data struct replaced the C++
unordered_map pointer), so no compiler and no imatrix file are needed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

# 16 windows of 512 tokens (llama-imatrix's chunk length). KL on SmolLM2 q4_k_m hardly moves with more text (2k tokens:
# 0.0349, 8k: 0.0341, 16k: 0.0353; round-to-nearest 0.0575), and each 8k tokens cost ~2 min on 2 busy cores.
SEQ_LEN = 512
TOKENS = 16 * SEQ_LEN


@dataclass(frozen=True)
class Imatrix:
    """GGUF tensor name -> mean squared input activation per column (float32), and how it was measured."""

    vectors: dict[str, np.ndarray]
    tokens: int
    source: str

    def summary(self) -> dict:
        return {"tensors": len(self.vectors), "tokens": self.tokens, "text": self.source,
                "method": "mean squared input activation per column (llama.cpp imatrix), PyTorch forward hooks"}


def activation_stats(model, seqs: list, batch_size: int = 4) -> tuple[dict[str, np.ndarray], int]:
    """HF weight name -> mean of x^2 per input column over every token, for every nn.Linear of `model`."""
    import torch

    from edgekit.prune.calib import batches

    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def run(_mod, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = (x * x).sum(0)
            sums[name] = s if name not in sums else sums[name] + s
        return run

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            hooks.append(mod.register_forward_hook(hook(f"{name}.weight")))
    head = model.get_output_embeddings()
    n = 0
    try:
        with torch.inference_mode():
            for ids in batches(seqs, batch_size):
                # the decoder alone: the LM head's input is its (normed) last hidden state, and skipping the
                # vocabulary-wide product saves a sixth of the time on a 135M model
                h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                hook("lm_head.weight")(head, (h,), None)
                n += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / n).float().numpy() for k, v in sums.items()}, n


def to_gguf_names(stats: dict[str, np.ndarray], p) -> dict[str, np.ndarray]:
    """The HF-named vectors under the GGUF tensor names the writer gives those weights (exporters/gguf.py's map)."""
    import gguf

    from edgekit.exporters.gguf import _pad, _split

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, p.arch.upper()), len(p.layers))
    out: dict[str, np.ndarray] = {}
    for src, v in stats.items():
        if src == "lm_head.weight" and p.tied:
            # llama.cpp multiplies by the tied embedding as its output matrix: that product's input is this one's
            out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"] = v
            continue
        layer = int(src.split(".")[2]) if src.startswith("model.layers.") else None
        lw = p.layers[layer] if layer is not None else None
        if p.pad is not None and lw is not None:
            kind = src.split(".")[-2]
            if kind in ("o_proj", "down_proj"):  # columns are padded; rows (q/k/v/gate/up) keep the same input
                real = _pad(src, np.ones((1, v.size), np.float32), p, lw)[0] > 0
                padded = np.full(real.size, v.mean(), np.float32)
                padded[real] = v
                v = padded
            lw = p.pad
        # fused projections split for the architecture: each part multiplies the same input
        parts = _split(src, np.empty((0, 0)), p, lw) if lw is not None else [(src, None)]
        for name, _ in parts:
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise EdgekitError(f"no GGUF tensor for {name!r} (arch {p.arch}) to give its importance matrix",
                                   "report the model; meanwhile --precision q8_0 needs no importance matrix")
            out[target] = v
    return out


def compute(model_dir: Path, p, data: Path | None = None, tokens: int = TOKENS, seq_len: int = SEQ_LEN,
            threads: int | None = None) -> Imatrix:
    """The importance matrix of the model in model_dir over the calibration text (a GGUF export has a tokenizer:
    it is embedded in the file)."""
    import torch

    from edgekit.models import load_torch_model
    from edgekit.prune.calib import calibration_sequences

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_torch_model(Path(model_dir))
    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len) or seq_len))
    seqs = calibration_sequences(tok, data, seq_len, max(1, tokens // seq_len))
    stats, n = activation_stats(model, seqs)
    del model
    return Imatrix(to_gguf_names(stats, p), n, str(data) if data else "edgekit calibration text (shipped)")


def c_array(im: Imatrix):
    """llama_model_imatrix_data[] ended by a NULL name, for llama_model_quantize_params.imatrix. Returned with the
    buffers it points into: keep the pair alive until the quantizer returns."""
    import llama_cpp

    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(im.vectors) + 1))()
    for i, (name, v) in enumerate(sorted(im.vectors.items())):
        buf = np.ascontiguousarray(v, dtype=np.float32)
        if not np.isfinite(buf).all():
            raise EdgekitError(f"the importance matrix of {name} is not finite (the model overflows on the "
                               "calibration text)",
                               "use --precision q8_0 (no importance matrix), or other calibration text")
        keep.append(buf)
        arr[i].name = name.encode()
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    arr[len(im.vectors)].name = None
    return arr, keep
