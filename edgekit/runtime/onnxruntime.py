"""ONNX Runtime runner for causal LMs exported with past key/values (optimum's text-generation-with-past layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError


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
        self._kv_shape = {n: (1, self.inputs[n].shape[1], 0, self.inputs[n].shape[3]) for n in self.past_names}
        self.reset()

    def reset(self) -> None:
        self.past = {n: np.zeros(s, dtype=np.float32) for n, s in self._kv_shape.items()}
        self.length = 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        t = ids.shape[1]
        if self.length + t > self.max_context:
            raise EdgekitError(f"sequence of {self.length + t} tokens exceeds the artifact's context "
                               f"({self.max_context})", "use a shorter prompt or export with a longer context")
        feeds = {"input_ids": ids}
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
