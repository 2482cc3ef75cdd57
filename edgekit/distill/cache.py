"""The teacher's top-k logits per training block, on disk, so later epochs and resumed runs skip the teacher.

One small safetensors file per block (values float32, indices int32), written atomically; a folder per
fingerprint of (teacher weights, data blocks, k), so a changed teacher or data set never reads stale logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgekit.fsutil import atomic_write_bytes, atomic_write_json


class TopkCache:
    def __init__(self, root: Path, fingerprint: str, k: int, block_size: int):
        self.dir = Path(root) / f"topk{k}-{fingerprint[:16]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.k = k
        meta = self.dir / "meta.json"
        if not meta.exists():
            atomic_write_json(meta, {"fingerprint": fingerprint, "k": k, "block_size": block_size})
        self.hits = 0
        self.misses = 0

    def _path(self, block: int) -> Path:
        return self.dir / f"{block:07d}.safetensors"

    def get(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values (B, T, k), indices (B, T, k)) if every block is cached, else None."""
        from safetensors.torch import load_file

        paths = [self._path(b) for b in blocks]
        if not all(p.exists() for p in paths):
            self.misses += len(blocks)
            return None
        self.hits += len(blocks)
        parts = [load_file(str(p)) for p in paths]
        return torch.stack([p["values"] for p in parts]), torch.stack([p["indices"] for p in parts])

    def put(self, blocks: list[int], values: torch.Tensor, indices: torch.Tensor) -> None:
        from safetensors.torch import save

        for i, b in enumerate(blocks):
            atomic_write_bytes(self._path(b), save({"values": values[i].contiguous().cpu(),
                                                    "indices": indices[i].contiguous().cpu()}))

    def stats(self) -> dict:
        return {"dir": str(self.dir), "hits": self.hits, "misses": self.misses,
                "blocks_on_disk": sum(1 for _ in self.dir.glob("*.safetensors"))}


def read_meta(d: Path) -> dict:
    return json.loads((Path(d) / "meta.json").read_text())
