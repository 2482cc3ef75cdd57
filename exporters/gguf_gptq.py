"""GPTQ on llama.cpp's own grids: the calibrated GGUF rounding (issue #14).

An importance matrix lets llama.cpp's quantizer choose each block's scale (and minimum) with the columns weighed by
their activations, but it still rounds every weight to the nearest level of that grid. GPTQ (edgekit/gptq.py) does
the rounding instead: llama.cpp quantizes with the importance matrix, edgekit reads back each block's affine grid
(value = a * code + b), rounds the weights column by column on exactly that grid while spreading each column's error
over the columns not yet rounded (the layer's input Hessian from the calibration text, layers in order so each sees
its already-rounded predecessors), and writes the new codes into the file's blocks in place. Scales, minimums, the
per-tensor type mix and the file's layout stay llama.cpp's; only the codes change, so every reader of the file reads
it as before. Opt-in: `edgekit export -b gguf -p q4_k_m --gptq` (ExportConfig.gptq).

The grid of each block type (values for code q in 0..qmax, one (a, b) per group of `group` weights):
  Q8_0  d * (q - 128), group 32        Q5_0  d * (q - 16)    Q4_0  d * (q - 8)    Q5_1 / Q4_1  d * q + m (32)
  Q4_K  d*sc_j * q - dmin*m_j, sub-blocks of 32 (6-bit sc/m)       Q6_K  d*sc_j * (q - 32), sub-blocks of 16
Other types (the i-quants, f16) keep llama.cpp's own codes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from gguf.quants import Q4_K

    return Q4_K.get_scale_min(scales)


# type name -> (weights per group, qmax)
GRIDS = {"Q8_0": (32, 255), "Q5_0": (32, 31), "Q5_1": (32, 31), "Q4_0": (32, 15), "Q4_1": (32, 15),
         "Q4_K": (32, 15), "Q6_K": (16, 63)}
# 32-blocks with 4-bit codes in nibbles after a header: type -> header bytes (and 4 more for the 5th bits)
_NIBBLES = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 2, "Q5_1": 4}


def grid(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per group, flattened in weight order: value = a * q + b for the codes q of `blocks` (n, bytes)."""
    if kind == "Q8_0":
        d = _f16(blocks[:, :2])[:, 0]
        return d, -128 * d
    if kind in ("Q4_0", "Q5_0"):
        d = _f16(blocks[:, :2])[:, 0]
        return d, -(GRIDS[kind][1] + 1) // 2 * d
    if kind in ("Q4_1", "Q5_1"):
        return _f16(blocks[:, :2])[:, 0], _f16(blocks[:, 2:4])[:, 0]
    if kind == "Q4_K":
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, m = _q4k_scale_min(blocks[:, 4:16])
        return (d * sc).reshape(-1), (-dmin * m).reshape(-1)
    if kind == "Q6_K":
        a = (_f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(-1)
        return a, -32 * a
    raise KeyError(kind)


def codes(kind: str, blocks: np.ndarray) -> np.ndarray:
    """The unsigned codes (n, weights per block) of `blocks`."""
    n = blocks.shape[0]
    if kind == "Q8_0":
        return blocks[:, 2:].view(np.int8).astype(np.int16) + 128
    if kind in _NIBBLES:
        h = _NIBBLES[kind]
        five = kind.startswith("Q5")
        qs = blocks[:, h + 4 * five:]
        lo = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int16)
        if not five:
            return lo
        qh = np.ascontiguousarray(blocks[:, h:h + 4]).view("<u4").reshape(n, 1) >> np.arange(32, dtype=np.uint32)
        return lo | ((qh & 1).astype(np.int16) << 4)
    if kind == "Q4_K":
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        return (qs & 0x0F).reshape(n, QK_K).astype(np.int16)
    if kind == "Q6_K":
        ql = blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        return ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 0x03).reshape(n, 8, 32) << 4)).reshape(n, QK_K).astype(
            np.int16)
    raise KeyError(kind)


def pack(kind: str, blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`blocks` with their codes replaced by `q` (n, weights per block), scales untouched."""
    n = blocks.shape[0]
    out = blocks.copy()
    q = q.astype(np.uint16)
    if kind == "Q8_0":
        out[:, 2:] = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    elif kind in _NIBBLES:
        h = _NIBBLES[kind]
        five = kind.startswith("Q5")
        lo = (q & 0x0F).astype(np.uint8)
        out[:, h + 4 * five:] = lo[:, :16] | (lo[:, 16:] << 4)
        if five:
            bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            out[:, h:h + 4] = bits.sum(1, dtype=np.uint32).astype("<u4").reshape(n, 1).view(np.uint8)
    elif kind == "Q4_K":
        q4 = q.astype(np.uint8).reshape(n, 4, 2, 32)
        out[:, 16:] = (q4[:, :, 0] | (q4[:, :, 1] << 4)).reshape(n, 128)
    elif kind == "Q6_K":
        q8 = q.astype(np.uint8).reshape(n, 8, 32)
        lo, hi = (q8 & 0x0F).reshape(n, 2, 2, 64), (q8 >> 4).reshape(n, 2, 4, 32)
        out[:, :128] = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
        out[:, 128:192] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    else:
        raise KeyError(kind)
    return out


class GridFile:
    """A quantized GGUF opened for writing its codes in place: per tensor name, its block type, row width and
    (a, b) grids as (rows, row_width / group) float32 arrays."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.reader = GGUFReader(str(path), "r+")
        self.tensors = {t.name: t for t in self.reader.tensors if t.tensor_type.name in GRIDS and len(t.shape) == 2}

    def reader_tensor(self, name: str):
        return next((t for t in self.reader.tensors if t.name == name), None)

    @staticmethod
    def _blocks(t) -> np.ndarray:
        from gguf import GGML_QUANT_SIZES

        return t.data.reshape(-1, GGML_QUANT_SIZES[t.tensor_type][1])  # a view: writes land in the file

    def grid(self, name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
        t = self.tensors[name]
        kind = t.tensor_type.name
        group, qmax = GRIDS[kind]
        rows, cols = int(t.shape[1]), int(t.shape[0])
        a, b = grid(kind, self._blocks(t))
        return a.reshape(rows, cols // group), b.reshape(rows, cols // group), group, qmax

    def write(self, name: str, q: np.ndarray) -> None:
        """Replace the tensor's codes by `q` (rows, row_width) in the file."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        data = self._blocks(t)
        data[...] = pack(kind, np.asarray(data), q.reshape(data.shape[0], -1))

    def close(self) -> None:
        self.reader.data.flush()
        del self.reader


def row_maps(p, hf_name: str, rows: int) -> list[tuple[str, np.ndarray]]:
    """(GGUF tensor name, HF row of each of its rows) for one HF linear, through the writer's own layout changes
    (fused parts split, q/k rows permuted to llama.cpp's rotary layout)."""
    import gguf

    from edgekit.exporters.gguf import _split, rotary_to_interleaved

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, p.arch.upper()), len(p.layers))
    idx = np.arange(rows)[:, None]
    layer = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else None
    lw = p.layers[layer] if layer is not None else None
    out = []
    for name, part in (_split(hf_name, idx, p, lw) if lw is not None else [(hf_name, idx)]):
        if p.permute_qk and lw is not None and ".q_proj." in name:
            part = rotary_to_interleaved(part, lw.num_attention_heads, p.rotary_dim)
        elif p.permute_qk and lw is not None and ".k_proj." in name:
            part = rotary_to_interleaved(part, lw.num_key_value_heads, p.rotary_dim)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is not None:
            out.append((target + ".weight" if not target.endswith(".weight") else target, part[:, 0]))
    return out


def calibrate(model_dir: Path, p, path: Path, data: Path | None = None, tokens: int | None = None,
              threads: int | None = None) -> dict:
    """Re-round the codes of the quantized GGUF at `path` by GPTQ on its own grids (see the module docstring);
    returns what was done. Models written with per-layer padding keep llama.cpp's rounding (their padded rows and
    columns have no HF counterpart to calibrate); so does a tied embedding, which is also the input lookup."""
    import torch
    from gguf.quants import dequantize

    from edgekit.arch import get_family
    from edgekit.exporters.gguf_imatrix import SEQ_LEN, TOKENS
    from edgekit.gptq import gptq_on_grid, quantize_sequentially
    from edgekit.models import load_torch_model
    from edgekit.prune.calib import batches, calibration_sequences

    if p.pad is not None:
        return {"method": "none (per-layer widths padded)"}
    if threads:
        torch.set_num_threads(threads)
    model, tok = load_torch_model(Path(model_dir))
    seq_len = min(SEQ_LEN, int(getattr(model.config, "max_position_embeddings", SEQ_LEN) or SEQ_LEN))
    seqs = calibration_sequences(tok, data, seq_len, max(1, (tokens or TOKENS) // seq_len))
    gf = GridFile(path)
    done: dict[str, str] = {}
    head = model.get_output_embeddings()

    def quantize(name, mod, hessian):
        if mod is head and p.tied:
            return
        w = mod.weight.detach().float().clone()
        for target, rows in row_maps(p, f"{name}.weight", w.shape[0]):
            t = gf.reader_tensor(target)
            if t is None:
                continue
            if target in gf.tensors and int(t.shape[0]) == w.shape[1]:
                a, b, group, qmax = gf.grid(target)
                at, bt = torch.from_numpy(a), torch.from_numpy(b)
                q = gptq_on_grid(w[rows], hessian, at, bt, 0, qmax)
                gf.write(target, q.numpy())
                cols = q.shape[1] // group
                w[rows] = (q.float().reshape(-1, cols, group) * at[..., None] + bt[..., None]).reshape(q.shape)
                done[target] = t.tensor_type.name
            else:  # llama.cpp's own rounding, so the layers after it calibrate on what will run
                w[rows] = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(len(rows), -1)[:, :w.shape[1]]
                                           .astype(np.float32))
        mod.weight = torch.nn.Parameter(w, requires_grad=False)  # a new one: a tied embedding keeps its own

    try:
        quantize_sequentially(model, list(get_family(model.config.model_type).layers(model)),
                              list(batches(seqs, 4)), quantize)
    finally:
        gf.close()
    return {"method": "GPTQ on llama.cpp's block grids (act order, layer by layer)", "tensors": len(done),
            "tokens": sum(int(s.numel()) for s in seqs)}
