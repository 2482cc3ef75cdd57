"""Benchmark an exported VLM folder (edgekit vlm export): image-encode latency of the vision artifact, time to first
token for an image prompt, and decode tokens/s of the language artifact, each in its own real runtime.

TTFT for an image prompt = encoding the image + prefilling its image prompt and the text prompt. With llama.cpp's
mmproj that is the real prompt (mtmd encodes the image and decodes its embeddings, then the text). On ONNX Runtime and
ExecuTorch it is too: the language graph takes the vision artifact's embeddings at the image-token positions (its
image_embeds input), so the prefill is the family's image prompt (vlm.json image_prompt) + text ids fed those
embeddings. Language artifacts exported before image_embeds take token ids only, so there ids stand in for the image
embeddings during the prefill: the same positions through the same layers, the embedding lookup aside. The report
says which (`ttft_prefill`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError


def _pct(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3), "runs": len(xs)}


def bench_vlm(art: Path, runs: int = 10, prompt_tokens: int = 16, new_tokens: int = 16, threads: int | None = None,
              log=print) -> dict:
    from edgekit.exporters.vision import OPENERS, VisionInputs
    from edgekit.runtime import open_artifact

    art = Path(art)
    if not (art / "vlm.json").is_file():
        raise EdgekitError(f"{art} is not an exported VLM (no vlm.json)", "pass the -o folder of `edgekit vlm export`")
    if runs < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise EdgekitError(f"--runs {runs} / --prompt-tokens {prompt_tokens} / --new-tokens {new_tokens} must be "
                           "positive", "e.g. --runs 10")
    m = json.loads((art / "vlm.json").read_text())
    v = m["vision"]
    ref = np.load(art / v["folder"] / "reference.npz")
    one = VisionInputs(ref["pixel_values"][:1], ref["images"][:1])
    encode = OPENERS[v["backend"]](art / v["folder"], v, threads)
    encode(one)  # warm-up: first-call allocations and kernel selection
    enc_s = []
    for _ in range(runs):
        t = time.perf_counter()
        encode(one)
        enc_s.append(time.perf_counter() - t)
    lm = open_artifact(art / m["language"]["folder"], threads=threads, all_logits=False)
    # an ONNX Runtime / ExecuTorch VLM language graph: the real image prompt, fed the image's embeddings
    spliced = getattr(lm, "takes_image_embeds", False)
    prompt = list(m.get("image_prompt") or [m["image_token_index"]] * m["image_tokens"]) if spliced else []
    n_image = len(prompt) if spliced else m["image_tokens"]
    n_prefill = n_image + prompt_tokens
    if n_prefill + new_tokens > lm.max_context:
        raise EdgekitError(f"{n_prefill + new_tokens} positions exceed the language artifact's context "
                           f"({lm.max_context})", "pass fewer --prompt-tokens / --new-tokens, or export with a "
                           "longer --context")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.vocab_size - 1, n_prefill)  # the last id is <image>: never fed as text
    if spliced:
        text = ids[:prompt_tokens]
        text[text == m["image_token_index"]] = 0  # text never holds <image>: each one takes an embedding row
        ids = np.concatenate([np.asarray(prompt, dtype=np.int64), text])
    mtmd = getattr(encode, "encoder", None)  # llama.cpp: the real image prompt, embeddings decoded by mtmd
    if mtmd is not None:  # real text of prompt_tokens tokens (llama.cpp's own tokenizer)
        words = " ".join(["a red circle on a blue background"] * prompt_tokens)
        toks = mtmd.llm.tokenize(words.encode(), add_bos=False, special=False)[:prompt_tokens]
        prompt_text = mtmd.llm.detokenize(toks).decode("utf-8", "replace")
    ttft_s, decode_tps = [], []
    for i in range(runs):
        lm.reset()
        t = time.perf_counter()
        if mtmd is not None:
            from edgekit.exporters.mmproj import image_prompt_logits

            image_prompt_logits(mtmd, one.images[0], text=prompt_text)
            ttft_s.append(time.perf_counter() - t)
            logits = lm.forward(ids)
        elif spliced:
            logits = lm.forward(ids, image_embeds=encode(one)[0])
            ttft_s.append(time.perf_counter() - t)
        else:
            encode(one)
            logits = lm.forward(ids)
            ttft_s.append(time.perf_counter() - t)
        if i == 0 or i == runs - 1:  # decode speed: two passes are enough for a median on a small artifact
            nxt = int(np.argmax(logits[-1]))
            t = time.perf_counter()
            for _ in range(new_tokens):
                nxt = int(np.argmax(lm.forward(np.array([nxt]))[-1]))
            decode_tps.append(new_tokens / (time.perf_counter() - t))
    enc = getattr(encode, "encoder", None)
    if enc is not None:
        enc.close()
    r = {"vision": {"backend": v["backend"], "precision": v["precision"]},
         "language": {"backend": m["language"]["backend"], "precision": m["language"]["precision"]},
         "image_tokens": m["image_tokens"], "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
         "image_encode_ms": _pct(enc_s), "ttft_ms": _pct(ttft_s),
         "ttft_prefill": f"{n_prefill} positions ({n_image} image + {prompt_tokens} text); " + (
             "the image prompt itself, run by llama.cpp's mtmd (image encoded and its embeddings decoded)"
             if mtmd is not None else "the image prompt itself, the image's embeddings fed to the language graph's "
             "image_embeds input" if spliced else "token ids stand in for the image embeddings (the language "
             "artifact takes ids)"),
         "decode_tokens_per_s": round(float(np.median(decode_tps)), 2), "threads": threads}
    log(f"bench: image encode p50 {r['image_encode_ms']['p50']:.2f} ms, TTFT (image prompt) p50 "
        f"{r['ttft_ms']['p50']:.2f} ms, decode {r['decode_tokens_per_s']:.1f} tok/s")
    return r
