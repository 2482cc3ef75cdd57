"""The artifact bundle: one uncompressed tar that carries an artifact folder and device_tests/ to a device.

Layout: `bundle.json` (first member: every other member's sha256 and size, plus what the device needs to know, e.g.
the memory budget), `artifact/...`, `device_tests/...`. The host writes it (`make_bundle`); the agent reads it from
an untrusted network (`extract_bundle`), so extraction never trusts the tar: only regular files and folders under
the two known roots, no absolute paths, no '..', no links or devices, every file listed in the manifest with the
size and sha256 it declares, and a cap on the total. Standard library only (the agent imports this).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path, PurePosixPath

from edgekit.errors import EdgekitError

MANIFEST = "bundle.json"
SCHEMA = 1
ROOTS = ("artifact", "device_tests")
MAX_MEMBERS = 10_000


class BundleError(EdgekitError):
    """An upload the agent refuses (HTTP 400)."""


def device_tests_dir() -> Path:
    """The device_tests folder of this edgekit (installed as edgekit.device_tests; at the top of a checkout)."""
    import edgekit.device_tests as dt

    return Path(dt.__file__).parent


def _file_entries(root: Path, prefix: str) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_symlink():
            raise EdgekitError(f"{p} is a symbolic link; bundles carry only regular files",
                               "replace the link with a copy of the file")
        if "__pycache__" in rel.parts or any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append((f"{prefix}/{rel.as_posix()}", p))
    return out


def make_bundle(artifact: Path, out: Path, extra: dict | None = None) -> dict:
    """Write `out` (a .tar) from an artifact folder and this edgekit's device_tests; returns the manifest."""
    from edgekit.fsutil import sha256_file
    from edgekit.runtime import read_artifact

    artifact = Path(artifact)
    meta = read_artifact(artifact)
    entries = _file_entries(artifact, "artifact") + _file_entries(device_tests_dir(), "device_tests")
    manifest = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": meta["backend"],
        "precision": meta["precision"],
        "members": {name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in entries},
        **(extra or {}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(data))
        for name, p in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = p.stat().st_size, int(p.stat().st_mtime), 0o644
            with open(p, "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, out)
    return manifest


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if name.startswith("/") or "\\" in name or p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"bundle member {name!r} has a path that escapes the job folder",
                          "rebuild the bundle with `edgekit bench --device`")
    if p.parts[0] not in ROOTS and name != MANIFEST:
        raise BundleError(f"bundle member {name!r} is outside {'/, '.join(ROOTS)}/",
                          "rebuild the bundle with `edgekit bench --device`")
    return p


def extract_bundle(tar_path: Path, dest: Path, max_bytes: int) -> dict:
    """Validate and extract a bundle into `dest` (which must not exist yet); returns its manifest.

    Raises BundleError, leaving whatever was written for the caller to delete."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    try:
        tar = tarfile.open(tar_path, "r:")  # no compression: nothing to decompress-bomb
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"the upload is not a readable tar ({e})", "resend; the upload may be truncated")
    with tar:
        try:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile() or first.size > 16 << 20:
                raise BundleError(f"the bundle does not start with {MANIFEST}", "rebuild it with `edgekit bench --device`")
            manifest = json.loads(tar.extractfile(first).read())
            members = manifest.get("members")
            if manifest.get("schema") != SCHEMA or not isinstance(members, dict) or len(members) > MAX_MEMBERS:
                raise BundleError(f"{MANIFEST} is not a schema-{SCHEMA} bundle manifest",
                                  "use the same edgekit version on the host and the device")
            declared = 0
            for name, m in members.items():
                _safe_name(name)
                if not (isinstance(m, dict) and isinstance(m.get("size"), int) and m["size"] >= 0
                        and isinstance(m.get("sha256"), str)):
                    raise BundleError(f"{MANIFEST} entry for {name!r} lacks a size and sha256", "rebuild the bundle")
                declared += m["size"]
            if declared > max_bytes:
                raise BundleError(f"the bundle declares {declared} bytes, over this agent's cap of {max_bytes}",
                                  "start the agent with a larger --max-upload-mb")
            seen: set[str] = set()
            total = 0
            for info in tar:
                name = info.name
                if info.offset == first.offset:
                    continue  # the manifest itself (iteration starts over from the first member)
                rel = _safe_name(name)
                if info.isdir():
                    continue
                if not info.isfile():  # symlinks, hard links, devices, fifos
                    raise BundleError(f"bundle member {name!r} is not a regular file", "bundles carry only files")
                if name not in members or name in seen:
                    raise BundleError(f"bundle member {name!r} is not listed once in {MANIFEST}", "rebuild the bundle")
                want = members[name]
                if info.size != want["size"]:
                    raise BundleError(f"bundle member {name!r} is {info.size} bytes, {MANIFEST} says {want['size']}",
                                      "resend the bundle")
                total += info.size
                if total > max_bytes:
                    raise BundleError(f"the bundle is over this agent's cap of {max_bytes} bytes",
                                      "start the agent with a larger --max-upload-mb")
                target = dest.joinpath(*rel.parts)
                if dest.resolve() not in target.resolve().parents:
                    raise BundleError(f"bundle member {name!r} escapes the job folder", "rebuild the bundle")
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                src = tar.extractfile(info)
                with open(target, "xb") as f:
                    while block := src.read(1 << 20):
                        h.update(block)
                        f.write(block)
                if h.hexdigest() != want["sha256"]:
                    raise BundleError(f"bundle member {name!r} does not match its sha256 in {MANIFEST}",
                                      "resend the bundle; it was corrupted or edited")
                seen.add(name)
        except (tarfile.TarError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"the bundle is malformed or truncated ({e})", "resend it")
    missing = sorted(set(members) - seen)
    if missing:
        raise BundleError(f"the bundle lacks {len(missing)} member(s) its manifest lists, e.g. {missing[0]!r}",
                          "resend the bundle; the upload may be truncated")
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if not (dest / "artifact" / "artifact.json").is_file():
        raise BundleError("the bundle carries no artifact/artifact.json", "bundle an artifact folder")
    return manifest
