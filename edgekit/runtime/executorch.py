"""ExecuTorch runner for the .pte that exporters/executorch.py writes (static KV cache inside the method).

The method is `forward(input_ids (1, T) int64, input_pos (T,) int64) -> logits (1, T, vocab)`; its K/V buffers live
in the loaded method and persist between calls, so this runner only tracks the next position. Nothing here imports
torch at module import, but ExecuTorch's Python runtime (`executorch.runtime`) imports torch itself and takes torch
tensors as inputs: on a device, `pip install executorch==1.4.1` (it brings a CPU torch). A C++ app would use
ExecuTorch's Module API on the same .pte with no Python at all.

A VLM's language .pte (artifact.json `image_embeds`) takes two more inputs, image_embeds (1, T, hidden) and
image_mask (1, T, 1) (exporters/executorch.py StaticCacheVLM): forward's `image_embeds` rows go, in order, to the
image tokens' positions with mask 1; none given, the mask is zero (plain lookup), as OrtRunner does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtime.base import image_rows


class ExecuTorchRunner:
    def __init__(self, pte: Path, meta: dict, threads: int | None = None, all_logits: bool = True):
        try:
            import torch
            from executorch.runtime import Runtime
        except ModuleNotFoundError as e:
            raise EdgekitError(f"the ExecuTorch runtime is not installed ({e.name} missing)",
                               "pip install executorch==1.4.1 (or 'edgekit[executorch]')") from e
        self._torch = torch
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(int(threads))  # XNNPACK's pool is process-wide
        if not Path(pte).is_file():
            raise EdgekitError(f"{pte} is missing", "re-export the artifact")
        try:
            program = Runtime.get().load_program(Path(pte))
            self.method = program.load_method("forward")
        except Exception as e:  # the pybindings raise RuntimeError/ValueError with an error code for bad files
            raise EdgekitError(f"ExecuTorch cannot load {pte}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                               "re-export the artifact with the same executorch version as this runtime") from e
        self._program = program  # keeps the program (and its data) alive as long as the method
        self.image_token_id = (meta.get("image_embeds") or {}).get("image_token_id")
        io = self.method.metadata
        # the method's own signature decides (a plain .pte has no artifact.json): rows + mask after ids and positions
        self.hidden_size = int(io.input_tensor_meta(2).sizes()[-1]) if io.num_inputs() == 4 else 0
        self.vocab_size = int(meta["model"]["vocab_size"])
        self.max_context = int(meta["max_context"])
        # tokens one call may take (the method's planned bound); artifacts before it was recorded took the context
        self.max_chunk = int(meta.get("max_chunk") or self.max_context)
        self.all_logits = all_logits
        self.reset()

    @property
    def takes_image_embeds(self) -> bool:
        return bool(self.hidden_size) and self.image_token_id is not None

    def _image_rows(self, ids: np.ndarray, image_embeds: np.ndarray | None):
        """(rows (1, T, hidden), mask (1, T, 1)) float32 for a VLM .pte, None for a token-id one; checked here (the
        method would take any rows)."""
        if not self.hidden_size:
            if image_embeds is not None:
                raise EdgekitError("this .pte takes token ids only (no image_embeds input)",
                                   "export the language model with `edgekit vlm export -b executorch`")
            return None
        rows = np.zeros((1, ids.shape[1], self.hidden_size), dtype=np.float32)
        mask = np.zeros((1, ids.shape[1], 1), dtype=np.float32)
        if image_embeds is None:
            return rows, mask
        given, at = image_rows(ids, image_embeds, self.image_token_id, self.hidden_size)
        rows[0, at], mask[0, at] = given, 1.0
        return rows, mask

    def reset(self) -> None:
        # The mask only lets a query see slots up to its own position, so stale K/V past `length` never count.
        self.length = 0

    def forward(self, ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        t = ids.shape[1]
        if t == 0:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        if self.length + t > self.max_context:
            raise EdgekitError(f"sequence of {self.length + t} tokens exceeds the artifact's context "
                               f"({self.max_context})", "use a shorter prompt or export with a longer --context")
        image = self._image_rows(ids, image_embeds)
        torch = self._torch
        parts = []
        for i in range(0, t, self.max_chunk):
            chunk = ids[:, i:i + self.max_chunk]
            pos = torch.arange(self.length, self.length + chunk.shape[1], dtype=torch.long)
            inputs = [torch.from_numpy(chunk), pos]
            if image is not None:  # a chunk's rows and mask alike
                inputs += [torch.from_numpy(np.ascontiguousarray(a[:, i:i + self.max_chunk])) for a in image]
            out = self.method.execute(inputs)[0][0].numpy()
            self.length += chunk.shape[1]
            # Copy: the output lives in the method's planned memory, which the next call overwrites. Generation
            # needs the last row only: copying all of them held up to three chunk x vocab arrays at once.
            if self.all_logits:
                parts.append(np.array(out, dtype=np.float32, copy=True))
            elif i + self.max_chunk >= t:
                parts.append(np.array(out[-1:], dtype=np.float32, copy=True))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def load(path: Path, meta: dict, threads: int | None = None, all_logits: bool = True) -> ExecuTorchRunner:
    return ExecuTorchRunner(Path(path) / meta["entry"], meta, threads=threads, all_logits=all_logits)
