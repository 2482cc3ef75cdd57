"""The runner contract and what every backend shares: greedy decoding and logits over a sequence."""

from __future__ import annotations

from typing import Protocol

import numpy as np

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
