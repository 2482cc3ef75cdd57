"""Text shipped with edgekit (Python documentation extracts, see data/NOTICE.txt) and user text files."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator

from edgekit.errors import EdgekitError


@lru_cache(maxsize=None)
def _packaged(name: str) -> str:
    return resources.files("edgekit").joinpath("data", name).read_text()


def calibration_text() -> str:
    return _packaged("calibration.txt")


def heldout_text() -> str:
    return _packaged("heldout.txt")


def iter_texts(path: Path) -> Iterator[str]:
    """Documents from a .txt file, a .jsonl file (a "text" field per line), or a folder of those, in sorted order."""
    path = Path(path)
    if not path.exists():
        raise EdgekitError(f"data path not found: {path}", "pass a .txt or .jsonl file or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise EdgekitError(f"{path} holds no .txt or .jsonl files", "pass a .txt or .jsonl file or a folder of them")
    def read(f: Path) -> str:
        try:
            return f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EdgekitError(f"{f} is not UTF-8 text (byte {e.start}: {e.reason})",
                               "convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out") from e

    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(read(f).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EdgekitError(f"{f}:{n} is not valid JSON ({e})", "one JSON object per line") from e
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise EdgekitError(f"{f}:{n} has no string field 'text'", 'write lines like {"text": "..."}')
                yield text
        elif f.suffix == ".txt":
            yield read(f)
        else:
            raise EdgekitError(f"{f} is neither .txt nor .jsonl", "pass a .txt or .jsonl file or a folder of them")
