"""Text -> fixed-length token blocks: documents are tokenized, joined with an end-of-text token, packed into
`block_size` sequences (the tail that does not fill a block is dropped) and split into train and held-out sets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from edgekit.errors import EdgekitError

SPLIT_SEED = 1234  # fixed, so the held-out split does not move when the training seed changes


@dataclass
class Blocks:
    train: "torch.Tensor"  # noqa: F821  int64 (N, block_size)
    heldout: "torch.Tensor"  # noqa: F821  int64 (M, block_size)
    source: str

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.train, self.heldout):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def tokenize(tokenizer, texts: Iterable[str]) -> list[int]:
    """All documents as one id stream, each followed by the end-of-text id."""
    from transformers.utils import logging as hf_logging

    sep = tokenizer.eos_token_id
    ids: list[int] = []
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum" is expected: we pack, not feed
    try:
        for text in texts:
            if text.strip():
                ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
                if sep is not None:
                    ids.append(sep)
    finally:
        hf_logging.set_verbosity(old)
    return ids


def pack(ids: list[int], block_size: int):
    import torch

    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def load_blocks(tokenizer, block_size: int, data: Path | None = None, heldout: Path | None = None,
                heldout_fraction: float = 0.05) -> Blocks:
    """Training and held-out blocks.

    No `data`: edgekit's shipped corpus (calibration text to train, held-out text to score). With `data` and no
    `heldout`: a fixed random `heldout_fraction` of the data's blocks is held out."""
    import torch

    from edgekit.data import calibration_text, heldout_text, iter_texts

    if data is None:
        train_ids, source = tokenize(tokenizer, [calibration_text()]), "edgekit calibration text (shipped)"
    else:
        train_ids, source = tokenize(tokenizer, iter_texts(Path(data))), str(data)
    if heldout is None and data is None:
        held_ids = tokenize(tokenizer, [heldout_text()])
    elif heldout is not None:
        held_ids = tokenize(tokenizer, iter_texts(Path(heldout)))
    else:
        held_ids = None
    if not train_ids:
        raise EdgekitError(f"{source} holds no text", "give a .txt/.jsonl file or folder with text in it")
    train = pack(train_ids, block_size)
    if held_ids is None:
        n = len(train)
        n_held = max(1, round(n * heldout_fraction)) if heldout_fraction > 0 else 0
        if n - n_held < 1 or n_held < 1:
            raise EdgekitError(f"{source} gives {len(train_ids)} tokens: {n} block(s) of {block_size}, too few to "
                               "hold some out for perplexity and still train",
                               "give more text, a smaller --block-size, or separate --heldout data")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        held_idx, train_idx = perm[:n_held].sort().values, perm[n_held:].sort().values
        train, held = train[train_idx], train[held_idx]
    else:
        held = pack(held_ids, block_size)
        if len(held) == 0:
            raise EdgekitError(f"the held-out text gives {len(held_ids)} tokens, less than one block of {block_size}",
                               "give more held-out text or a smaller --block-size")
    if len(train) == 0:
        raise EdgekitError(f"{source} gives {len(train_ids)} tokens, less than one block of {block_size}",
                           "give more text or a smaller --block-size")
    return Blocks(train=train, heldout=held, source=source)


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int):
    """Block indices of the global batch of optimizer step `step`: a fresh seeded permutation each epoch, read in
    order, so any step's data follows from (step, seed) alone and a resumed run reads exactly what it would have."""
    import torch

    start = step * batch_size
    out = []
    pos = start
    while len(out) < batch_size:
        epoch, off = divmod(pos, n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n_blocks - off)
        out.extend(perm[off: off + take].tolist())
        pos += take
    return out
