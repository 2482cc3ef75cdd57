"""Local image+caption pairs: a folder of images with a captions.jsonl, or a JSONL file of {"image", "text"}
lines (image paths relative to the file). `generate_pairs` writes a small deterministic set (coloured shapes with
captions that say what is drawn), which tests and the demo use: no download, no licence question."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError

CAPTIONS = "captions.jsonl"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "black": (20, 20, 20), "purple": (140, 50, 170)}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")


@dataclass(frozen=True)
class Pair:
    image: Path
    text: str


def generate_pairs(out: Path, n: int = 48, size: int = 64, seed: int = 0) -> Path:
    """Write n PNG images and captions.jsonl into out (same seed, same bytes)."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        color, bg = list(COLORS)[rng.integers(len(COLORS))], list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        shape, big = SHAPES[rng.integers(len(SHAPES))], SIZES[rng.integers(len(SIZES))]
        r = size * (0.35 if big == "large" else 0.18)
        cx, cy = (rng.uniform(r, size - r) for _ in range(2))
        img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
        d = ImageDraw.Draw(img)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        name = f"images/{i:04d}.png"
        img.save(out / name, optimize=False)
        where = ("left" if cx < size / 2 else "right")
        lines.append({"image": name, "text": f"a {big} {color} {shape} on the {where} of a {bg} background."})
    (out / CAPTIONS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def load_pairs(path: Path) -> list[Pair]:
    """Pairs from a folder holding captions.jsonl, or from a .jsonl file; every image must exist (checked here,
    decoded later by load_image)."""
    path = Path(path)
    src = path / CAPTIONS if path.is_dir() else path
    if not src.is_file():
        raise EdgekitError(f"{path} holds no image captions ({CAPTIONS} with one {{\"image\": ..., \"text\": ...}} "
                           "per line)", f"point at a folder with {CAPTIONS}, or at such a .jsonl file")
    pairs, missing = [], []
    for n, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            img, text = rec["image"], rec["text"]
        except (ValueError, KeyError, TypeError):
            raise EdgekitError(f"{src}:{n} is not a JSON object with \"image\" and \"text\"",
                               'write one {"image": "path.png", "text": "caption"} per line') from None
        p = Path(img) if Path(img).is_absolute() else src.parent / img
        if not p.is_file():
            missing.append(f"{img} (line {n})")
        pairs.append(Pair(p, str(text)))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EdgekitError(f"{src} names {len(missing)} image(s) that do not exist: {', '.join(missing[:3])}{more}",
                           f"put the images next to {src.name} (paths are relative to it) or drop those lines")
    if not pairs:
        raise EdgekitError(f"{src} has no caption lines", 'add {"image": "path.png", "text": "caption"} lines')
    return pairs


def load_image(path: Path):
    """An RGB PIL image, or one line naming the file that does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EdgekitError(f"image {path} cannot be decoded ({type(e).__name__}: {str(e).splitlines()[0][:80]})",
                           f"replace it with a valid PNG/JPEG or remove its line from {CAPTIONS}") from None


@dataclass
class Batch:
    input_ids: object  # (B, T) long
    attention_mask: object
    labels: object  # caption tokens only (-100 on image tokens, prompt and padding)
    pixel_values: object  # (B, C, H, W)


def encode(model_dir: Path, pairs: list[Pair], fam, cfg: dict, max_text: int = 32):
    """(tokenizer, processor, [Batch of 1]): the family's image prompt (<image> x image_tokens, plus any wrapping
    tokens) then the caption, labels on the caption."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = AutoImageProcessor.from_pretrained(model_dir)
    prompt = fam.image_prompt(tok, cfg)
    items = []
    for p in pairs:
        ids = tok(p.text, add_special_tokens=False)["input_ids"][:max_text]
        pix = proc(images=load_image(p.image), return_tensors="pt")["pixel_values"]
        seq = prompt + ids
        labels = [-100] * len(prompt) + ids
        items.append(Batch(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long), torch.tensor([labels]),
                           pix))
    return tok, proc, items


def collate(items: list[Batch], pad_id: int) -> Batch:
    import torch

    T = max(b.input_ids.shape[1] for b in items)

    def pad(t, v):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)

    return Batch(torch.cat([pad(b.input_ids, pad_id) for b in items]),
                 torch.cat([pad(b.attention_mask, 0) for b in items]),
                 torch.cat([pad(b.labels, -100) for b in items]),
                 torch.cat([b.pixel_values for b in items]))


def batches(items: list[Batch], size: int, pad_id: int):
    for i in range(0, len(items), size):
        yield collate(items[i:i + size], pad_id)
