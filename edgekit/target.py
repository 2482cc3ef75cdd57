"""Target profiles: one TOML file per device in targets/ (installed as the data package edgekit.targets); the
folder is the registry, this module reads it.

A target says what the device has (memory, CPU, accelerator, runtime stack) and what edgekit should build for it
(default backend, precisions, width alignment, context length, Docker platform). `--target` takes a name, an alias or
a path to a TOML file of the same shape.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6's): the same parser, from PyPI
    import tomli as tomllib

GiB = 1 << 30


@dataclass(frozen=True)
class Memory:
    ram_gb: float
    os_reserve_gb: float
    swap_gb: float = 0.0
    bandwidth_gbps: float = 10.0  # sustained DRAM bandwidth: decode speed is bound by it
    shared_with_gpu: bool = False  # Jetson: one LPDDR pool for CPU and GPU

    @property
    def usable_bytes(self) -> int:
        return int((self.ram_gb - self.os_reserve_gb) * GiB)


@dataclass(frozen=True)
class Cpu:
    arch: str  # x86_64 | aarch64
    cores: int
    name: str = ""


@dataclass(frozen=True)
class Accelerator:
    kind: str = "none"  # none | cuda | npu | gpu
    name: str = ""
    compute_capability: str = ""  # CUDA SM, e.g. "8.7" on Orin


@dataclass(frozen=True)
class Runtime:
    os: str = ""
    jetpack: str = ""
    l4t: str = ""
    cuda: str = ""
    tensorrt: str = ""
    python: str = ""


@dataclass(frozen=True)
class Build:
    backend: str
    precisions: tuple[str, ...]
    precision: str  # the default, one of precisions
    width_alignment: int = 8
    context_length: int = 2048
    # other backends the device runs, beside `backend`: `edgekit bench --matrix` builds each of them at every precision
    # of `precisions` it declares (the planner and a plain build still use `backend` alone)
    backends: tuple[str, ...] = ()

    @property
    def matrix_backends(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.backend, *self.backends)))


@dataclass(frozen=True)
class Docker:
    platform: str
    base_image: str


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    memory: Memory
    cpu: Cpu
    build: Build
    docker: Docker
    accelerator: Accelerator = field(default_factory=Accelerator)
    runtime: Runtime = field(default_factory=Runtime)
    aliases: tuple[str, ...] = ()
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The profile as a TOML file that --target reads back to an equal Target (defaults written out): a starting
        point for a custom device."""
        d = self.to_dict()
        del d["source"]
        lines = [f"{k} = {_toml_value(d.pop(k))}" for k in ("name", "description", "aliases")]
        for section, values in d.items():
            lines += ["", f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items())]
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # 16.0, 8, inf and nan are all TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v)).replace("\x7f", "\\u007f")  # a JSON string is a TOML basic string, but for DEL


_SECTIONS = {"memory": Memory, "cpu": Cpu, "accelerator": Accelerator, "runtime": Runtime, "build": Build,
             "docker": Docker}
_CPU_ARCHES = ("x86_64", "aarch64", "armv7l")
_ACCEL_KINDS = ("none", "cuda", "npu", "gpu")


def _bad(src: str, msg: str) -> EdgekitError:
    return EdgekitError(f"invalid target {src}: {msg}",
                        "correct the TOML; `edgekit targets show x86-cpu --toml` prints a valid one")


def _section(src: str, cls: type, raw: Any, name: str):
    if not isinstance(raw, dict):
        raise _bad(src, f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise _bad(src, f"unknown key(s) {unknown} in [{name}]; known: {sorted(fields)}")
    kwargs = {}
    for k, f in fields.items():
        if k not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _bad(src, f"[{name}] needs '{k}'")
            continue
        v = raw[k]
        want = f.type
        if want in ("float",) and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = float(v)
        elif want == "int" and not (isinstance(v, int) and not isinstance(v, bool)):
            raise _bad(src, f"[{name}].{k} must be an integer, got {v!r}")
        elif want == "bool" and not isinstance(v, bool):
            raise _bad(src, f"[{name}].{k} must be true or false, got {v!r}")
        elif want == "str" and not isinstance(v, str):
            raise _bad(src, f"[{name}].{k} must be a string, got {v!r}")
        elif want == "float" and not isinstance(v, float):
            raise _bad(src, f"[{name}].{k} must be a number, got {v!r}")
        elif want.startswith("tuple"):
            if not (isinstance(v, list) and (v or f.default == ()) and all(isinstance(x, str) for x in v)):
                raise _bad(src, f"[{name}].{k} must be a non-empty list of strings, got {v!r}")
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def parse_target(data: dict[str, Any], src: str) -> Target:
    top = {"name", "description", "aliases", *_SECTIONS}
    unknown = sorted(set(data) - top)
    if unknown:
        raise _bad(src, f"unknown key(s) {unknown}; known: {sorted(top)}")
    for key in ("name", "description", "memory", "cpu", "build", "docker"):
        if key not in data:
            raise _bad(src, f"missing '{key}'")
    if not isinstance(data["name"], str) or not data["name"]:
        raise _bad(src, "'name' must be a non-empty string")
    aliases = data.get("aliases", [])
    if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
        raise _bad(src, "'aliases' must be a list of strings")
    sections = {k: _section(src, cls, data.get(k, {}), k) for k, cls in _SECTIONS.items()}
    sections["build"] = _canonical_precisions(sections["build"], src)
    t = Target(name=data["name"], description=str(data["description"]), aliases=tuple(aliases), source=src,
               **sections)
    _validate(t, src)
    return t


def _canonical_precisions(b: Build, src: str) -> Build:
    """Precision names as the registry spells them (a profile may write F16 or f32)."""
    from edgekit.precision import lookup

    unknown = [p for p in (*b.precisions, b.precision) if lookup(p) is None]
    if unknown:
        from edgekit.precision import PRECISIONS

        raise _bad(src, f"build precision(s) {unknown} unknown; known: {list(PRECISIONS)}")
    return dataclasses.replace(b, precisions=tuple(dict.fromkeys(lookup(p).name for p in b.precisions)),
                               precision=lookup(b.precision).name)


def _validate(t: Target, src: str) -> None:
    from edgekit.exporters import REGISTRY

    m = t.memory
    if m.ram_gb <= 0 or m.os_reserve_gb < 0 or m.swap_gb < 0 or m.bandwidth_gbps <= 0:
        raise _bad(src, "memory sizes must be positive (ram_gb, bandwidth_gbps > 0; os_reserve_gb, swap_gb >= 0)")
    if m.os_reserve_gb >= m.ram_gb:
        raise _bad(src, f"os_reserve_gb ({m.os_reserve_gb}) must be below ram_gb ({m.ram_gb})")
    if t.cpu.arch not in _CPU_ARCHES:
        raise _bad(src, f"cpu.arch {t.cpu.arch!r} is not one of {list(_CPU_ARCHES)}")
    if t.cpu.cores < 1:
        raise _bad(src, "cpu.cores must be at least 1")
    if t.accelerator.kind not in _ACCEL_KINDS:
        raise _bad(src, f"accelerator.kind {t.accelerator.kind!r} is not one of {list(_ACCEL_KINDS)}")
    b = t.build
    if b.backend not in REGISTRY:
        raise _bad(src, f"build.backend {b.backend!r} is not one of {sorted(REGISTRY)}")
    unknown = [x for x in b.backends if x not in REGISTRY]
    if unknown:
        raise _bad(src, f"build.backends {unknown} are not among {sorted(REGISTRY)}")
    supported = [p for x in b.matrix_backends for p in REGISTRY[x].precisions]
    bad = [p for p in b.precisions if p not in supported]
    if bad:
        raise _bad(src, f"build.precisions {bad} are not supported by {' or '.join(b.matrix_backends)} (it supports "
                        f"{list(dict.fromkeys(supported))})")
    if b.precision not in REGISTRY[b.backend].precisions:
        raise _bad(src, f"build.precision {b.precision!r} is not one {b.backend} builds "
                        f"({list(REGISTRY[b.backend].precisions)})")
    if b.precision not in b.precisions:
        raise _bad(src, f"build.precision {b.precision!r} is not in build.precisions {list(b.precisions)}")
    if b.width_alignment < 1 or b.context_length < 1:
        raise _bad(src, "build.width_alignment and build.context_length must be positive")
    if b.backend == "tensorrt" and not t.accelerator.compute_capability:
        raise _bad(src, "a tensorrt target needs accelerator.compute_capability (e.g. \"8.7\")")


def load_target_file(path: Path) -> Target:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EdgekitError(f"target file not found: {path}", "check the path, or use a name from `edgekit targets`")
    except tomllib.TOMLDecodeError as e:
        raise EdgekitError(f"malformed target TOML {path}: {e}",
                           "fix the TOML syntax; `edgekit targets show x86-cpu --toml` prints a valid profile")
    return parse_target(data, str(path))


def builtin_targets() -> dict[str, Target]:
    """Every shipped target by name (aliases not included)."""
    out = {}
    for entry in sorted(resources.files("edgekit.targets").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            t = parse_target(tomllib.loads(entry.read_text()), f"edgekit.targets/{entry.name}")
            out[t.name] = t
    return out


def get_target(spec: str) -> Target:
    """Resolve a target name, alias, or path to a .toml file."""
    if spec.endswith(".toml") or "/" in spec or Path(spec).is_file():
        return load_target_file(Path(spec))
    targets = builtin_targets()
    if spec in targets:
        return targets[spec]
    for t in targets.values():
        if spec in t.aliases:
            return t
    names = sorted(targets) + sorted(a for t in targets.values() for a in t.aliases)
    raise EdgekitError(f"unknown target {spec!r}; known: {', '.join(names)}",
                       "pick one of those, or the path of a .toml profile (`edgekit targets show "
                       "x86-cpu --toml` prints one to edit)")
