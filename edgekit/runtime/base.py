"""The runner contract and what every backend shares: greedy decoding and logits over a sequence."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgekit.errors import EdgekitError

ARTIFACT_FILE = "artifact.json"
REFERENCE_FILE = "reference.npz"


class Runner(Protocol):
    """A loaded artifact with a KV cache. `forward` appends tokens to the cache and returns their logits."""

    vocab_size: int
    max_context: int

    def reset(self) -> None: ...

    def forward(self, ids: np.ndarray) -> np.ndarray:  # (T,) int64 -> (T, vocab) float32
        ...


def sequence_logits(runner: Runner, ids: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Logits for every position of `ids`, from a fresh cache (prefill in chunks when asked, to exercise decode)."""
    runner.reset()
    ids = np.asarray(ids, dtype=np.int64)
    step = chunk or len(ids)
    return np.concatenate([runner.forward(ids[i:i + step]) for i in range(0, len(ids), step)], axis=0)


def greedy(runner: Runner, prompt: np.ndarray, n_new: int) -> np.ndarray:
    """Prefill the prompt, then decode one token at a time through the cache; returns the new token ids."""
    runner.reset()
    logits = runner.forward(np.asarray(prompt, dtype=np.int64))
    out = []
    for _ in range(n_new):
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
        logits = runner.forward(np.array([tok], dtype=np.int64))
    return np.array(out, dtype=np.int64)


def image_rows(ids: np.ndarray, image_embeds, image_token_id: int | None, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (k, hidden) float32, their positions in `ids`): a VLM language artifact's image embeddings, one row per
    image token of this call, in order; refused in one line otherwise (neither runtime checks: ONNX's ScatterND and
    the .pte take any rows)."""
    if image_token_id is None:
        raise EdgekitError("this language artifact takes image_embeds but no artifact.json says its image token id",
                           "open the artifact folder `edgekit vlm export` wrote (language/)")
    rows = np.asarray(image_embeds, dtype=np.float32)
    if rows.size % hidden:
        raise EdgekitError(f"image embeddings of shape {rows.shape} are not rows of the model's width {hidden}",
                           "pass the vision artifact's image_embeds (k, hidden)")
    rows = rows.reshape(-1, hidden)
    at = np.flatnonzero(np.asarray(ids).reshape(-1) == image_token_id)
    if rows.shape[0] != len(at):
        raise EdgekitError(f"{rows.shape[0]} image-embedding rows for {len(at)} image tokens (id {image_token_id}) in "
                           "the ids", "pass one row per image token of this call, in order (a prompt split into "
                           "chunks splits its rows alike)")
    return rows, at
