"""ONNX Runtime runner for causal LMs exported with past key/values.

One interface for both graphs edgekit exports (exporters/onnxruntime.py GRAPHS) and for plain .onnx files of either
layout: input_ids, attention_mask (ones over past + new tokens) and, where the graph takes them, position_ids; past
key/values (1, kv_heads, past, head_dim) in, present.* out. optimum's graph declares head_dim in its input shapes;
the lean (GroupQueryAttention) graph leaves it symbolic, so it comes from artifact.json's model shape.
A VLM's language graph also takes image_embeds (exporters/onnxruntime.py splice_image_embeds): forward's
`image_embeds` rows replace the image tokens' embeddings in order; none given, it is fed empty (plain lookup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtime.base import image_rows


class OrtRunner:
    def __init__(self, model_path: Path, meta: dict, threads: int | None = None, all_logits: bool = True):
        self.all_logits = all_logits
        try:
            import onnxruntime as ort
        except ModuleNotFoundError as e:
            raise EdgekitError("onnxruntime is not installed", "pip install onnxruntime (or 'edgekit[agent-onnx]')") from e
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise EdgekitError(f"onnxruntime cannot load {model_path}: {str(e).splitlines()[0]}",
                               "re-export the artifact") from e
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        m = meta["model"]
        # A plain .onnx may come without config.json: the logits' last dim is the vocabulary when it is static.
        dim = next((o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"), None)
        self.vocab_size = int(m.get("vocab_size") or (dim if isinstance(dim, int) else 0))
        self.max_context = int(meta.get("max_context") or m.get("max_position_embeddings") or 2048)
        self._kv_shape = {n: (1, self._dim(n, 1, m.get("num_kv_heads")), 0, self._dim(n, 3, m.get("head_dim")))
                          for n in self.past_names}
        self.image_token_id = (meta.get("image_embeds") or {}).get("image_token_id")
        self.hidden_size = self._dim("image_embeds", 2, m.get("hidden_size")) if "image_embeds" in self.inputs else 0
        self.reset()

    def _dim(self, name: str, axis: int, fallback) -> int:
        d = self.inputs[name].shape[axis]
        if isinstance(d, int):
            return d
        if fallback:
            return int(fallback)
        raise EdgekitError(f"the graph's {name} leaves axis {axis} symbolic ({d!r}) and no artifact.json says its "
                           "size", "open the artifact folder edgekit wrote (artifact.json gives the model's shape)")

    @property
    def takes_image_embeds(self) -> bool:
        return self.image_token_id is not None and "image_embeds" in self.inputs

    def _image_rows(self, ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray:
        """(1, k, hidden) float32, one row per image token of this call; none given, image tokens keep their table
        embedding, as in a graph without the input."""
        if image_embeds is None:
            return np.zeros((1, 0, self.hidden_size), dtype=np.float32)
        return image_rows(ids, image_embeds, self.image_token_id, self.hidden_size)[0][None]

    def reset(self) -> None:
        self.past = {n: np.zeros(s, dtype=np.float32) for n, s in self._kv_shape.items()}
        self.length = 0

    def forward(self, ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        t = ids.shape[1]
        if self.length + t > self.max_context:
            raise EdgekitError(f"sequence of {self.length + t} tokens exceeds the artifact's context "
                               f"({self.max_context})", "use a shorter prompt or export with a longer context")
        feeds = {"input_ids": ids}
        if "image_embeds" in self.inputs:
            feeds["image_embeds"] = self._image_rows(ids, image_embeds)
        elif image_embeds is not None:
            raise EdgekitError("this ONNX language graph takes token ids only (no image_embeds input)",
                               "export the language model with `edgekit vlm export -b onnxruntime`")
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, self.length + t), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(self.length, self.length + t, dtype=np.int64).reshape(1, -1)
        feeds.update(self.past)
        res = dict(zip(self.output_names, self.session.run(None, feeds)))
        for name in self.past_names:
            self.past[name] = res[name.replace("past_key_values.", "present.", 1)]
        self.length += t
        logits = res["logits"][0]
        # The graph always emits every position; keeping only the last row frees that buffer at once.
        return logits.astype(np.float32, copy=False) if self.all_logits else logits[-1:].copy()


def load(path: Path, meta: dict, threads: int | None = None, all_logits: bool = True) -> OrtRunner:
    return OrtRunner(Path(path) / meta["entry"], meta, threads=threads, all_logits=all_logits)
