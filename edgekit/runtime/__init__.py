"""Torch-free runners: load an artifact and run it with numpy and the backend's own runtime.

The host's fidelity gate, `edgekit bench` and the on-device agent all go through these, so what is verified on the
workstation is exactly what runs on the device.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.runtime.base import ARTIFACT_FILE, Runner


def read_artifact(path: Path) -> dict:
    path = Path(path)
    meta_path = path / ARTIFACT_FILE
    if not meta_path.is_file():
        raise EdgekitError(f"{path} is not an edgekit artifact: it has no {ARTIFACT_FILE}",
                           "pass the folder that `edgekit export` or `edgekit build` wrote")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise EdgekitError(f"{meta_path} is corrupt ({e})", "re-export the artifact")


def read_model(path: Path) -> dict:
    """artifact.json of an artifact folder, or the same description read from a plain .gguf/.onnx/.pte file."""
    if Path(path).is_dir():
        return read_artifact(path)
    from edgekit.runtime.files import describe_file

    return describe_file(path)


def open_artifact(path: Path, threads: int | None = None, check: bool = True, all_logits: bool = True,
                  meta: dict | None = None) -> Runner:
    """Load any artifact (or plain model file) with the runner its backend registers; `check` verifies file hashes
    first. `meta` overrides what `read_model` would read (a benchmark sizes a plain file's context to its prompts).

    all_logits=False lets a runner return only the last position's logits (shape (1, vocab)): what generation needs,
    and what a benchmark must use, since keeping every position's logits costs context x vocab x 4 bytes."""
    from edgekit.exporters import get

    path = Path(path)
    meta = meta or read_model(path)
    folder = path if path.is_dir() else path.parent  # a plain file is its own entry (meta["entry"])
    if check:
        verify_files(folder, meta)
    return get(meta["backend"]).load_runtime().load(folder, meta, threads=threads, all_logits=all_logits)


def verify_files(path: Path, meta: dict) -> None:
    from edgekit.fsutil import sha256_file

    for name, digest in meta.get("files", {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise EdgekitError(f"artifact {path} is missing {name}", "re-export or re-send the whole artifact folder")
        if sha256_file(f) != digest:
            raise EdgekitError(f"artifact file {f} does not match its sha256 in {ARTIFACT_FILE} (corrupt or edited)",
                               "re-export or re-send the artifact")
