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
MAX_HEADER_BYTES = 64 << 10  # a PAX / GNU long-name header is read into memory whole: refused above this
MAX_NAME_BYTES = 255  # per path component (NAME_MAX on Linux, macOS and most filesystems)
MAX_PATH_BYTES = 1024


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


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-12:])


def _safe_name(name) -> PurePosixPath:
    if not isinstance(name, str) or not name:
        raise BundleError(f"bundle member name {name!r:.80} is not a path", "rebuild the bundle")
    p = PurePosixPath(name)
    if name.startswith("/") or "\\" in name or p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"bundle member {_shown(name)} has a path that escapes the job folder",
                          "rebuild the bundle with `edgekit bench --device`")
    if name.split("/") != list(p.parts) or any(ord(c) < 32 or c == "\x7f" for c in name):
        # 'artifact/./x', 'artifact//x', 'x/' would alias another member's file on disk
        raise BundleError(f"bundle member {_shown(name)} is not a canonical relative path (no '.', '//', "
                          "trailing '/' or control characters)", "rebuild the bundle with `edgekit bench --device`")
    try:
        encoded = [part.encode() for part in p.parts]
    except UnicodeEncodeError:
        raise BundleError(f"bundle member {_shown(name)} is not valid UTF-8", "rebuild the bundle")
    if any(len(b) > MAX_NAME_BYTES for b in encoded) or len(name.encode()) > MAX_PATH_BYTES:
        raise BundleError(f"bundle member {_shown(name)} has a name component over {MAX_NAME_BYTES} bytes or a "
                          f"path over {MAX_PATH_BYTES} bytes", "use shorter file names")
    if p.parts[0] not in ROOTS and name != MANIFEST:
        raise BundleError(f"bundle member {_shown(name)} is outside {'/, '.join(ROOTS)}/",
                          "rebuild the bundle with `edgekit bench --device`")
    return p


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads them into memory, PAX and GNU long-name headers over MAX_HEADER_BYTES, and
    sparse members (a few KB of tar that expand to gigabytes on disk)."""

    def _proc_member(self, tf):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER_BYTES:
            raise BundleError(f"the bundle has a {self.size}-byte extended (PAX / long name) header, over the "
                              f"{MAX_HEADER_BYTES >> 10} KB this agent reads", "rebuild it with `edgekit bench --device`")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BundleError("the bundle has a sparse member", "bundles carry only regular files")
        return super()._proc_member(tf)


def _load_json(data: bytes, what: str) -> dict:
    def constant(c):
        raise ValueError(f"{c} is not a JSON number")

    try:
        obj = json.loads(data, parse_constant=constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN / Infinity, bad UTF-8, deep nesting
        raise BundleError(f"{what} is not valid JSON ({str(e)[:120]})", "rebuild the bundle")
    if not isinstance(obj, dict):
        raise BundleError(f"{what} is a JSON {type(obj).__name__}, not an object", "rebuild the bundle")
    return obj


def extract_bundle(tar_path: Path, dest: Path, max_bytes: int) -> dict:
    """Validate and extract a bundle into `dest` (which must not exist yet); returns its manifest.

    Raises BundleError, leaving whatever was written for the caller to delete."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    try:
        tar = tarfile.open(tar_path, "r:", tarinfo=_BoundedTarInfo)  # no compression: nothing to decompress-bomb
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"the upload is not a readable tar ({e})", "resend; the upload may be truncated")
    with tar:
        try:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile() or first.size > 16 << 20:
                raise BundleError(f"the bundle does not start with {MANIFEST}", "rebuild it with `edgekit bench --device`")
            manifest = _load_json(tar.extractfile(first).read(), MANIFEST)
            members = manifest.get("members")
            if manifest.get("schema") != SCHEMA or not isinstance(members, dict) or len(members) > MAX_MEMBERS:
                raise BundleError(f"{MANIFEST} is not a schema-{SCHEMA} bundle manifest",
                                  "use the same edgekit version on the host and the device")
            for key in ("backend", "precision"):
                if not isinstance(manifest.get(key), str) or len(manifest[key]) > 64:
                    raise BundleError(f"{MANIFEST} {key} is not a short string", "rebuild the bundle")
            if not isinstance(manifest.get("job", {}), (dict, type(None))):
                raise BundleError(f"{MANIFEST} job options are not a JSON object", "rebuild the bundle")
            declared = 0
            for name, m in members.items():
                _safe_name(name)
                if name == MANIFEST:
                    raise BundleError(f"{MANIFEST} lists itself as a member", "rebuild the bundle")
                if not (isinstance(m, dict) and type(m.get("size")) is int and m["size"] >= 0
                        and isinstance(m.get("sha256"), str)):
                    raise BundleError(f"{MANIFEST} entry for {_shown(name)} lacks a size and sha256",
                                      "rebuild the bundle")
                declared += m["size"]
            folders = {str(parent) for name in members for parent in PurePosixPath(name).parents}
            clash = sorted(set(members) & folders)
            if clash:
                raise BundleError(f"bundle member {_shown(clash[0])} is both a file and a folder", "rebuild the bundle")
            if declared > max_bytes:
                raise BundleError(f"the bundle declares {declared} bytes, over this agent's cap of {max_bytes}",
                                  "start the agent with a larger --max-upload-mb")
            uploaded = os.path.getsize(tar_path)
            if declared > uploaded:  # every byte of a regular member is in the tar: no sparse, no compression
                raise BundleError(f"the bundle declares {declared} bytes of files but the upload is only {uploaded} "
                                  "bytes", "resend the bundle; it was truncated or edited")
            count = 0
            seen: set[str] = set()
            total = 0
            for info in tar:
                name = info.name
                if info.offset == first.offset:
                    continue  # the manifest itself (iteration starts over from the first member)
                count += 1
                if count > 2 * MAX_MEMBERS:  # tarfile keeps every member's header: bound the folder entries too
                    raise BundleError(f"the bundle has over {2 * MAX_MEMBERS} members", "bundle fewer files")
                rel = _safe_name(name)
                if info.sparse is not None:
                    raise BundleError(f"bundle member {_shown(name)} is sparse", "bundles carry only regular files")
                if info.isdir():
                    continue
                if not info.isfile():  # symlinks, hard links, devices, fifos
                    raise BundleError(f"bundle member {_shown(name)} is not a regular file", "bundles carry only files")
                if name not in members or name in seen:
                    raise BundleError(f"bundle member {_shown(name)} is not listed once in {MANIFEST}", "rebuild the bundle")
                want = members[name]
                if info.size != want["size"]:
                    raise BundleError(f"bundle member {_shown(name)} is {info.size} bytes, {MANIFEST} says {want['size']}",
                                      "resend the bundle")
                total += info.size
                if total > min(max_bytes, declared):
                    raise BundleError(f"the bundle is over this agent's cap of {max_bytes} bytes",
                                      "start the agent with a larger --max-upload-mb")
                target = dest.joinpath(*rel.parts)
                if dest.resolve() not in target.resolve().parents:
                    raise BundleError(f"bundle member {_shown(name)} escapes the job folder", "rebuild the bundle")
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                src = tar.extractfile(info)
                with open(target, "xb") as f:
                    while block := src.read(1 << 20):
                        h.update(block)
                        f.write(block)
                if h.hexdigest() != want["sha256"]:
                    raise BundleError(f"bundle member {_shown(name)} does not match its sha256 in {MANIFEST}",
                                      "resend the bundle; it was corrupted or edited")
                seen.add(name)
        except (tarfile.TarError, EOFError, UnicodeError, ValueError) as e:
            raise BundleError(f"the bundle is malformed or truncated ({str(e)[:200]})", "resend it")
    missing = sorted(set(members) - seen)
    if missing:
        raise BundleError(f"the bundle lacks {len(missing)} member(s) its manifest lists, e.g. {missing[0]!r}",
                          "resend the bundle; the upload may be truncated")
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if not (dest / "artifact" / "artifact.json").is_file():
        raise BundleError("the bundle carries no artifact/artifact.json", "bundle an artifact folder")
    return manifest
