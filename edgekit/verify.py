"""The fidelity gate: an artifact is called built only when its runtime reproduces PyTorch on real text.

PyTorch computes the reference once, at export (`make_reference`); the reference travels with the artifact
(reference.npz) so the device can check itself later with no torch (`check_against_reference`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgekit.precision import PRECISIONS, Thresholds, get_precision
from edgekit.runtime.base import Runner, greedy

GATE_TOKENS = 64  # positions compared
DECODE_TAIL = 16  # of which the last ones go through the cache one token at a time
GREEDY_PROMPT = 16
GREEDY_NEW = 32


def thresholds_for(precision: str, kv_cache: str | None = None) -> Thresholds:
    """The gate of a precision (any alias), from the precision registry. A quantized KV cache moves logits like
    weights of its format, so the artifact is gated by whichever of the two is coarser (fp32 weights + q8_0 cache:
    q8_0's gate)."""
    from edgekit.precision import get_kv_cache, lookup

    p = get_precision(precision)
    kv = lookup(kv_cache) if kv_cache and get_kv_cache(kv_cache).quantized else None
    return kv.gate if kv is not None and kv.bits < p.bits else p.gate


def gate_ids(tokenizer, vocab_size: int) -> tuple[np.ndarray, str]:
    """GATE_TOKENS ids of held-out text; a model saved without a tokenizer gets seeded random ids instead."""
    if tokenizer is not None:
        from edgekit.data import heldout_text

        ids = tokenizer(heldout_text()[:20_000], add_special_tokens=False)["input_ids"][:GATE_TOKENS]
        if len(ids) == GATE_TOKENS and max(ids) < vocab_size:
            return np.array(ids, dtype=np.int64), "held-out text (Python FAQ)"
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, GATE_TOKENS, dtype=np.int64), "seeded random ids (no tokenizer)"


def make_reference(model, tokenizer) -> dict[str, np.ndarray]:
    """PyTorch's logits over real text and its greedy continuation, for the gate and for device_tests."""
    import torch

    vocab = model.config.vocab_size
    ids, _ = gate_ids(tokenizer, vocab)
    with torch.inference_mode():
        logits = model(torch.from_numpy(ids)[None], use_cache=False).logits[0].float().numpy()
        seq = torch.from_numpy(ids[:GREEDY_PROMPT])[None]
        for _ in range(GREEDY_NEW):  # full recompute each step: the reference must not share the cache's bugs
            nxt = model(seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return {
        "input_ids": ids,
        "top1": logits.argmax(-1).astype(np.int64),
        "logits_tail": logits[-DECODE_TAIL:].astype(np.float32),
        "logits": logits.astype(np.float32),
        "greedy_prompt": ids[:GREEDY_PROMPT],
        "greedy_ids": seq[0, GREEDY_PROMPT:].numpy().astype(np.int64),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Mean over positions of KL(reference || artifact) of the next-token distributions."""
    p_log, q_log = _log_softmax(ref_logits), _log_softmax(got_logits)
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


def _perplexity(log_probs: np.ndarray, ids: np.ndarray) -> float:
    return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))


def compare(ref: dict[str, np.ndarray], runner: Runner, th: Thresholds) -> dict:
    """Run the artifact on the reference's inputs and score it against the thresholds."""
    ids = ref["input_ids"]
    n_prefill = len(ids) - DECODE_TAIL
    runner.reset()
    got = np.concatenate([runner.forward(ids[:n_prefill])] +
                         [runner.forward(ids[i:i + 1]) for i in range(n_prefill, len(ids))], axis=0)
    tail = got[-DECODE_TAIL:]
    top1 = float((got.argmax(-1) == ref["top1"]).mean())
    res = {"positions": int(len(ids)), "top1_agreement": top1}
    if "logits" in ref:
        full = ref["logits"]
        res["max_abs_logit_delta"] = float(np.abs(got - full).max())
        # next-token perplexity of the gate text under the artifact and under PyTorch: the quality the matrix compares
        res["perplexity"] = _perplexity(_log_softmax(got), ids)
        res["reference_perplexity"] = _perplexity(_log_softmax(full), ids)
        res["mean_kl"] = mean_kl(full, got)
    else:  # on the device only the tail travels
        res["max_abs_logit_delta"] = float(np.abs(tail - ref["logits_tail"]).max())
        res["mean_kl"] = mean_kl(ref["logits_tail"], tail)
    new = greedy(runner, ref["greedy_prompt"], len(ref["greedy_ids"]))
    same = new == ref["greedy_ids"]
    res["greedy_match"] = bool(same.all())
    res["greedy_first_divergence"] = None if same.all() else int(np.argmin(same))
    failures = judge(res, th)
    res.update(thresholds=asdict(th), failures=failures, passed=not failures)
    return res


def judge(res: dict, th: Thresholds) -> list[str]:
    """The thresholds a result breaks, as readable lines (empty: passed). A None greedy_match is not checked."""
    failures = []
    if th.max_abs is not None and res["max_abs_logit_delta"] > th.max_abs:
        failures.append(f"max |delta logit| {res['max_abs_logit_delta']:.3g} > {th.max_abs:g}")
    if res["top1_agreement"] < th.top1:
        failures.append(f"top-1 agreement {res['top1_agreement']:.3f} < {th.top1:g}")
    if th.mean_kl is not None and res["mean_kl"] > th.mean_kl:
        failures.append(f"mean KL {res['mean_kl']:.3g} > {th.mean_kl:g}")
    if th.greedy_exact and res.get("greedy_match") is False:
        failures.append(f"greedy continuation diverges at token {res['greedy_first_divergence']}")
    return failures


def save_reference(path: Path, ref: dict[str, np.ndarray]) -> None:
    """What ships in the artifact: everything but the full logits (the tail is enough on the device)."""
    from edgekit.fsutil import atomic_write_bytes
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: v for k, v in ref.items() if k != "logits"})
    atomic_write_bytes(path, buf.getvalue())


def load_reference(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:  # never unpickle what may have crossed a network
        return {k: z[k] for k in z.files}


def check_against_reference(artifact: Path, threads: int | None = None) -> dict:
    """The gate without torch, from the shipped reference (used by device_tests and the agent)."""
    from edgekit.runtime import open_artifact, read_artifact
    from edgekit.runtime.base import REFERENCE_FILE

    meta = read_artifact(artifact)
    from edgekit.exporters import get

    spec = get(meta["backend"])
    if not spec.host_runtime:  # no runner on this machine (TensorRT): the runtime checks what it can here
        return spec.load_runtime().host_check(artifact, threads=threads)
    runner = open_artifact(artifact, threads=threads)
    return compare(load_reference(Path(artifact) / REFERENCE_FILE), runner,
                   thresholds_for(meta["precision"], meta.get("kv_cache")))


THRESHOLDS = {name: p.gate for name, p in PRECISIONS.items()}  # the gate table, as docs and tests read it

__all__ = ["THRESHOLDS", "Thresholds", "make_reference", "compare", "check_against_reference", "judge"]
