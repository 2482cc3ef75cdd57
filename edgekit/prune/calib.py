"""Calibration and evaluation text as fixed-length token sequences, produced in batches so memory stays bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator


def token_sequences(tok, texts, seq_len: int, limit: int) -> list:
    """Up to `limit` int64 tensors of seq_len tokens: documents joined by EOS and cut into full windows.

    Documents are tokenized one at a time and only as far as `limit` windows need, so a large corpus is never read
    whole into tokens."""
    import torch

    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    buf: list[int] = []
    out = []
    for text in texts:
        # long documents are split at paragraph breaks so each tokenizer call stays small
        for part in text.split("\n\n"):
            if not part.strip():
                continue
            buf += tok(part + "\n\n", add_special_tokens=False)["input_ids"]
            while len(buf) >= seq_len and len(out) < limit:
                out.append(torch.tensor(buf[:seq_len], dtype=torch.long))
                buf = buf[seq_len:]
            if len(out) >= limit:
                return out
        buf += eos
    return out


def calibration_sequences(tok, path: Path | None, seq_len: int, limit: int) -> list:
    from edgekit.data import calibration_text, iter_texts
    from edgekit.errors import EdgekitError

    texts = iter_texts(path) if path else [calibration_text()]
    seqs = token_sequences(tok, texts, seq_len, limit)
    if not seqs:
        raise EdgekitError(f"the calibration text ({path or 'shipped default'}) is shorter than one sequence of "
                           f"{seq_len} tokens", "pass more text, or a smaller --seq-len")
    return seqs


def batches(seqs: list, batch_size: int) -> Iterator:
    import torch

    for i in range(0, len(seqs), batch_size):
        yield torch.stack(seqs[i:i + batch_size])


def mean_loss(model, seqs: list, batch_size: int = 4) -> float:
    """Token-averaged next-token cross-entropy (nats) over the sequences."""
    import torch

    total, n = 0.0, 0
    with torch.inference_mode():
        for ids in batches(seqs, batch_size):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            tgt = ids[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                       reduction="sum").item()
            n += tgt.numel()
    return total / n


def perplexity(model, tok, text: str, seq_len: int = 256, max_seqs: int = 64, batch_size: int = 4) -> float:
    """Held-out perplexity over up to max_seqs non-overlapping windows of `text`."""
    import math

    seqs = token_sequences(tok, [text], seq_len, max_seqs)
    return math.exp(mean_loss(model, seqs, batch_size))
