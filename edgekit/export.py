"""Export = backend conversion + reference + fidelity gate, written atomically as one artifact folder.

An artifact folder holds the backend's files, artifact.json (backend, precision, model shape, file hashes, gate
result) and reference.npz (PyTorch's outputs on held-out text, so the device can re-check itself without torch).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgekit import __version__
from edgekit.errors import EdgekitError, GateFailed
from edgekit.extras import require
from edgekit.fsutil import atomic_dir, atomic_write_json, sha256_file
from edgekit.runtime.base import ARTIFACT_FILE, REFERENCE_FILE
from edgekit.ui import status

SCHEMA = 1
# Beside every backend's files: the tokenizer with its chat template, and the model's config and generation
# settings, so peer tools open the artifact as they open a Hugging Face folder (optimum's ORTModelForCausalLM reads
# config.json and generation_config.json; transformers' AutoTokenizer the tokenizer files).
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "config.json")


@dataclass(frozen=True)
class ExportConfig:
    backend: str = "onnxruntime"
    precision: str | None = None  # None: the backend's first (most faithful) precision
    context_length: int | None = None  # None: the model's positions, at most DEFAULT_CONTEXT
    accept_gate_failure: bool = False  # keep an artifact that failed the gate (recorded in artifact.json)
    threads: int | None = None
    target: Any = None  # edgekit.target.Target, for backends tied to the device (tensorrt)
    rejected: Path | None = None  # where an artifact that fails its gate is kept (default: OUT/../rejected/NAME)
    group_size: int | None = None  # weights per quantization scale (ONNX Runtime int4: 32, 64, 128); None: 32
    calibrate: bool = True  # calibrated quantization where the precision has it (GGUF: an importance matrix)
    calibration: Path | None = None  # text to calibrate on (.txt/.jsonl/folder); None: edgekit's shipped text
    # GGUF 4/5-bit: GPTQ re-rounds the codes on llama.cpp's imatrix-chosen blocks; None = wherever an importance
    # matrix is computed (as ExecuTorch 8da4w is GPTQ-calibrated by default), False = the imatrix alone (faster)
    gptq: bool | None = None
    qat: Any = None  # edgekit.qat.QATPlan the model was trained for (read from its qat.json by export_model)
    kv_cache: str | None = None  # KV-cache element type (edgekit.precision.KV_CACHES) where the runtime takes one
    onnx_graph: str | None = None  # ONNX Runtime: "lean" | "optimum"; None: lean where the model allows it
    # ONNX Runtime / ExecuTorch, a VLM's language model: the graph also takes image_embeds, placed at this token's
    # positions
    image_token_id: int | None = None

    def resolved(self) -> "ExportConfig":
        from edgekit.exporters import get

        spec = get(self.backend)
        precision, kv_cache = spec.precision(self.precision), spec.kv_cache(self.kv_cache)
        if self.context_length is not None and self.context_length < 1:
            raise EdgekitError(f"context length must be positive, got {self.context_length}", "pass --context N")
        return replace(self, precision=precision, kv_cache=kv_cache)


DEFAULT_CONTEXT = 2048


def model_context(config: dict, requested: int | None) -> int:
    """The context an artifact serves: what was asked for, refused in one line past the model's positions (never
    clamped in silence; plan and build refuse the same request), or by default the model's, at most DEFAULT_CONTEXT."""
    max_pos = config.get("max_position_embeddings")
    if requested is None:
        return min(DEFAULT_CONTEXT, max_pos or DEFAULT_CONTEXT)
    if max_pos and requested > max_pos:
        raise EdgekitError(f"context {requested} exceeds the model's {max_pos} positions",
                           f"pass --context {max_pos} or less")
    return requested


def model_summary(config: dict) -> dict:
    """The shape facts every runtime and the planner need, read from a Hugging Face config through its family."""
    from edgekit.arch import WIDTHS_KEY, get_family

    fam = get_family(config.get("model_type"))
    heads = config["num_attention_heads"]
    widths = {"layer_widths": config[WIDTHS_KEY]} if config.get(WIDTHS_KEY) else {}
    return {
        "arch": config["model_type"],
        "family": fam.name,
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": fam.head_dim(config),
        "intermediate_size": config["intermediate_size"],
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        "tie_word_embeddings": fam.tied(config),
        "params": fam.geometry(config).params(),
        "sliding_window": fam.sliding_window(config),
        **widths,  # non-uniform pruned model: per-layer intermediate_size / num_attention_heads / num_key_value_heads
    }


def library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "edgekit": __version__}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def export_model(model_dir: Path, out: Path, cfg: ExportConfig, log=print) -> dict:
    """Convert, gate and write one artifact folder at `out` (all or nothing). Returns artifact.json's content."""
    from edgekit.exporters import get
    from edgekit.models import load_torch_model
    from edgekit.runtime import open_artifact
    from edgekit.verify import compare, make_reference, save_reference, thresholds_for

    from edgekit import qat

    plan = qat.read(model_dir)
    if plan is not None:  # a QAT-trained folder: lower the scheme it trained for, on the grid it trained through
        cfg = replace(cfg, **qat.export_settings(plan, cfg.backend, cfg.precision, cfg.group_size))
        if cfg.qat is not None:
            log(f"export: {plan.scheme} on the QAT grid recorded in {qat.QAT_FILE} (round-to-nearest, group "
                f"{plan.group_size}; calibrated rounding would leave the grid QAT trained for)")
    cfg = cfg.resolved()
    spec = get(cfg.backend)
    backend = spec.load()
    require(spec.requires, f"backend {spec.name!r}")  # before any work: torch-less installs get one line too
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = replace(cfg, context_length=model_context(config, cfg.context_length))
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        log(f"export: converting to {cfg.backend} {cfg.precision}")
        with status(f"export: converting to {cfg.backend} {cfg.precision}"):  # lowering can take minutes
            extra = backend.export(Path(model_dir), tmp, cfg)
        for name in COMPANIONS:
            if (Path(model_dir) / name).is_file() and not (tmp / name).exists():
                shutil.copy(Path(model_dir) / name, tmp / name)
        t_convert = time.perf_counter() - t0
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "schema": SCHEMA,
            "backend": cfg.backend,
            "precision": cfg.precision,
            "model": model_summary(config),
            "max_context": cfg.context_length,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": library_versions("torch", "transformers", *spec.libraries),
            **({"qat": cfg.qat.to_dict()} if cfg.qat is not None else {}),
            **extra,
        }
        atomic_write_json(tmp / ARTIFACT_FILE, meta)
        log("verify: PyTorch reference on held-out text")
        model, tok = load_torch_model(model_dir)
        if cfg.qat is not None:  # the model QAT trained (and distill scored) is the fake-quantized one: gate the
            # runtime against it, on the scales it trained with; its float weights are an intermediate never run
            qat.prepare(model, cfg.qat, qat.load_scales(model_dir, cfg.qat))
            meta["gate_reference"] = "fake-quantized eager model (QAT)"
        ref = make_reference(model, tok)
        del model
        save_reference(tmp / REFERENCE_FILE, ref)
        if spec.host_gate:  # a backend that can't run here is gated on its source graph
            import importlib

            runner = importlib.import_module(spec.host_gate).load(tmp, meta, threads=cfg.threads)
        else:
            runner = open_artifact(tmp, threads=cfg.threads)
        with status(f"verify: {cfg.backend} against the PyTorch reference"):
            gate = compare(ref, runner, thresholds_for(cfg.precision, cfg.kv_cache))
        gate["runtime"] = spec.host_gate or spec.runtime
        del runner
        gate["overridden"] = bool(cfg.accept_gate_failure and not gate["passed"])
        meta["gate"] = gate
        meta["timings_s"] = {"convert": round(t_convert, 3), "total": round(time.perf_counter() - t0, 3)}
        atomic_write_json(tmp / ARTIFACT_FILE, meta)
        if not gate["passed"] and not cfg.accept_gate_failure:
            from edgekit.fsutil import keep_rejected

            kept = keep_rejected(tmp, cfg.rejected or Path(out).absolute().parent / "rejected" / Path(out).name)
            raise GateFailed(f"{cfg.backend} {cfg.precision} artifact failed the fidelity gate: "
                             f"{'; '.join(gate['failures'])}; it is kept in {kept} (its artifact.json records the "
                             "failed gate)", "try a more faithful precision, use the kept artifact as it is, or pass "
                             "--accept-gate-failure to write it to the output (recorded)")
    return meta


__all__ = ["ExportConfig", "export_model", "model_summary"]

# `edgekit.export(...)` is the API verb (edgekit/api/exporting.py); this module stays importable as before
import sys as _sys  # noqa: E402

from edgekit import _CallableModule  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
