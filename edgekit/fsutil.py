"""Atomic writes and content hashes. Nothing is visible under its final name until it is complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename, on failure it is removed.

    A process killed inside the block leaves only a `.name.tmp-*` folder; the next atomic_dir for the same name
    (or `clean_stale` on the parent) removes it.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def keep_rejected(tmp: Path, dest: Path) -> Path:
    """Move atomic_dir's finished temporary folder to `dest` (replacing an earlier one) instead of discarding it:
    an artifact that failed its gate stays inspectable and usable without re-exporting. Returns dest."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        _remove(old)
    os.replace(tmp, dest)  # one rename: dest is complete or absent
    return dest


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def check_output(out: Path, reads: list, marker: str, force: bool = False) -> Path:
    """Refuse an output folder that would destroy something, before any work is done: one that holds (or is) a
    folder the command reads, a file, or a non-empty folder edgekit did not write (no `marker` file in it) unless
    force; and one whose parent cannot be written. Returns the absolute path."""
    from edgekit.errors import EdgekitError

    out = Path(out).absolute()
    for r in reads:
        r = Path(r).absolute()
        if out == r or out in r.parents or r in out.parents:
            raise EdgekitError(f"output folder {out} overlaps the input {r} (writing it would destroy the input)",
                               "write to a new folder outside the input, e.g. -o {}-out".format(r.name))
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"output {out} exists and is a file", "choose a folder name that is not taken")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists() and not force:
        raise EdgekitError(f"output folder {out} exists, is not empty and was not written by edgekit",
                           "choose a new folder, or pass --force to replace it and everything in it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-")
        os.rmdir(probe)
    except OSError as e:
        raise EdgekitError(f"cannot write {out}: {e.strerror or e}", "choose a folder you can write to")
    return out


def clean_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove leftovers of killed atomic writes in `folder` (only those for `name`, when given); return them."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).iterdir():
        if name is not None and not p.name.startswith(f".{name}."):
            continue
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")):
            _remove(p)
            removed.append(p)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(folder: Path) -> str:
    """One digest over every file's relative path and content, in a stable order."""
    h = hashlib.sha256()
    folder = Path(folder)
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        h.update(rel.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
