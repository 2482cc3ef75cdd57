"""Modality-aware importance (activations on each modality's own tokens; UKMP-style |w * grad| normalized per block
and per modality) against plain activation importance, on a tiny LLaVA trained on the generated shape captions so
that importance means something.

Trains the tiny random LLaVA of edgekit.testing (CLIP tower + projector + Llama) on `--train` generated pairs for
`--steps` steps (caption CE), prunes it by `--ratio` with each criterion through the same split search
(`edgekit vlm prune`), and prints the held-out caption loss (pairs of another seed) of each, without recovery.

    OMP_NUM_THREADS=1 .venv/bin/python bench/vlm_importance.py --steps 300 --ratio 0.3 --seed 0 --cache /tmp/vlm

Results over three seeds, and what wins why: bench/vlm_importance.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--criteria", default="modality,ukmp,activation", help="comma-separated, compared in order")
    ap.add_argument("--splits", type=int, default=4, help="best-ranked splits scored by caption loss (14: every one)")
    ap.add_argument("--cache", type=Path, help="keep the trained model and the pairs here and reuse them (a folder "
                    "per seed / steps / train size), so criteria can be compared without retraining")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.arch import vlm_family_of
    from edgekit.testing import make_tiny_vlm
    from edgekit.vlm.data import batches, encode, generate_pairs, load_pairs
    from edgekit.vlm.prune import VlmPruneConfig, caption_loss, prune_vlm

    root = Path(tempfile.mkdtemp(prefix="edgekit-vlm-bench-"))
    cache = a.cache and a.cache / f"seed{a.seed}-steps{a.steps}-train{a.train}-held{a.held_out}"
    if cache and (cache / "trained" / "config.json").is_file():
        root = cache
    base = make_tiny_vlm("llava", root / "random", seed=a.seed)
    train_dir = generate_pairs(root / "train", a.train, seed=a.seed)
    held_dir = generate_pairs(root / "held", a.held_out, seed=a.seed + 1000)
    cfg = json.loads((base / "config.json").read_text())
    fam = vlm_family_of(cfg)
    tok, _, items = encode(base, load_pairs(train_dir), fam, cfg)
    _, _, held = encode(base, load_pairs(held_dir), fam, cfg)
    pad = tok.pad_token_id
    torch.manual_seed(a.seed)
    trained = root / "trained"
    steps, step, t0 = a.steps, 0, time.perf_counter()
    if root == cache:
        steps = 0
        model = AutoModelForImageTextToText.from_pretrained(trained, dtype=torch.float32)
        print(f"training: cached model {trained}")
    else:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        print(f"training: random caption loss {caption_loss(model.eval(), held, pad):.3f}")
    while step < steps:
        model.train()
        for b in batches(items, 8, pad):
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                        labels=b.labels, use_cache=False)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()
    if root != cache:
        model.save_pretrained(trained)
        for f in base.iterdir():
            if f.suffix in (".json", ".txt") and f.name != "config.json" and not (trained / f.name).exists():
                (trained / f.name).write_bytes(f.read_bytes())
        if cache:  # written whole, then renamed: a run killed mid-way leaves no half cache
            cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(root, cache.with_name(cache.name + ".tmp"), dirs_exist_ok=True)
            cache.with_name(cache.name + ".tmp").rename(cache)
    dense = caption_loss(model, held, pad)
    print(f"training: {steps} steps in {time.perf_counter() - t0:.0f} s; held-out caption loss {dense:.3f}")
    rows = []
    for crit in a.criteria.split(","):
        r = prune_vlm(trained, root / f"pruned-{crit}", VlmPruneConfig(
            ratio=a.ratio, criterion=crit, calibration=train_dir, num_samples=32, search_samples=8,
            evaluate_splits=a.splits), log=lambda *_: None)
        m = AutoModelForImageTextToText.from_pretrained(root / f"pruned-{crit}", dtype=torch.float32).eval()
        rows.append((crit, r["removed_fraction"], r["vision_share"], r["parts_after"], caption_loss(m, held, pad)))
    print(f"\n{'criterion':12} {'removed':>8} {'vision share':>13} {'vision':>8} {'language':>9} "
          f"{'held-out caption loss':>22}")
    print(f"{'dense':12} {0:8.1%} {'-':>13} {r['parts_before']['vision']:8,} {r['parts_before']['language']:9,} "
          f"{dense:22.3f}")
    for crit, frac, share, parts, loss in rows:
        print(f"{crit:12} {frac:8.1%} {share:13.2f} {parts['vision']:8,} {parts['language']:9,} {loss:22.3f}")


if __name__ == "__main__":
    main()
