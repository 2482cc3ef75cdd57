"""The build pipeline: plan -> prune -> distill -> quantize -> export -> verify -> bench, resumable.

Each stage writes into its own folder of the build directory through an atomic rename, and the manifest records
its fingerprint (stage config + the fingerprint of what it consumed, ultimately the input model's sha256). A rerun
skips every stage whose fingerprint is unchanged and whose folder is complete; a build killed mid-stage leaves only a
`.NN-stage.tmp-*` folder, which the rerun removes before redoing that stage.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_dir, atomic_write_json, clean_stale, sha256_json, sha256_tree
from edgekit.models import ModelRef
from edgekit.target import Target

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class BuildOptions:
    """What the user asked for; None means "the target decides"."""

    backend: str | None = None
    precision: str | None = None
    context_length: int | None = None
    prune_ratio: float | None = None  # fraction of parameters to remove; None = the planner decides
    min_decode_tps: float | None = None  # a decode-speed goal for the planner
    batch: int = 1
    distill_steps: int = 0
    qat: str | None = None  # a QAT-able precision: distillation trains through its fake quantization (edgekit/qat.py)
    kv_cache: str | None = None  # KV-cache type (llama.cpp: f32/f16/q8_0); None: the plan's choice
    accept_gate_failure: bool = False
    bench: bool = True
    bench_seconds: float = 2.0
    threads: int | None = None
    device: str | None = None  # an `edgekit agent serve` URL: the bench stage also runs on that device
    token_file: str | None = None
    device_timeout: float = 3600.0


@dataclass
class BuildContext:
    target: Target
    model: ModelRef  # the original model (the teacher)
    options: BuildOptions
    build_dir: Path
    model_sha256: str = ""
    current_model: Path | None = None  # what the next stage consumes: the latest model-producing stage's output
    artifact: Path | None = None  # set by the export stage
    results: dict[str, dict] = field(default_factory=dict)
    log: Callable[[str], None] = print
    _plan: object = None

    @property
    def backend(self) -> str:
        return self.options.backend or self.target.build.backend

    @property
    def context_length(self) -> int:
        from edgekit.plan import default_context

        return self.options.context_length or default_context(self.target, self.model.config)

    @property
    def plan(self):
        """The memory-fit plan (pure arithmetic, so computed up front: later stages' fingerprints depend on it)."""
        if self._plan is None:
            from edgekit.plan import PlanRequest, make_plan

            req = PlanRequest(context=self.context_length, batch=self.options.batch,
                              min_decode_tps=self.options.min_decode_tps, kv_cache=self.options.kv_cache)
            self._plan = make_plan(self.model.config, self.target, req, backend=self.backend,
                                   precision=self.options.precision)
        return self._plan

    @property
    def precision(self) -> str:
        """The canonical name (the user may write Q4_K_M or f32), else the plan's choice."""
        if self.options.precision:
            from edgekit.exporters import get

            return get(self.backend).precision(self.options.precision)
        return self.plan.precision

    @property
    def kv_cache(self) -> str | None:
        """The user's KV-cache type, else the plan's (None: the runtime's default)."""
        if self.options.kv_cache:
            from edgekit.exporters import get

            return get(self.backend).kv_cache(self.options.kv_cache)
        return self.plan.kv_cache

    @property
    def prune_ratio(self) -> float | None:
        """The user's ratio, else the plan's (None when the plan fits without pruning)."""
        return self.options.prune_ratio or (self.plan.prune_ratio or None)


@dataclass
class StageResult:
    status: str  # "done" | "passed-through"
    summary: dict = field(default_factory=dict)
    model_dir: str | None = None  # relative to the stage folder, when the stage produced a new model
    artifact_dir: str | None = None  # relative to the stage folder, when the stage produced an artifact


def stage_dir(ctx: BuildContext, index: int, name: str) -> Path:
    return ctx.build_dir / f"{index:02d}-{name}"


def _read_manifest(build_dir: Path, log=None) -> dict:
    """The build's manifest, {} if none. One that cannot be read (it is only ever replaced atomically, so something
    else wrote it) means starting over: with `log` (a real build), it is kept aside and the user told so."""
    import json

    p = build_dir / MANIFEST
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
        if isinstance(data, dict):
            return data
        why = "it is not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = str(e)
    if log:
        keep = p.with_name(f"{MANIFEST}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        p.replace(keep)
        log(f"build: {p} is unreadable ({why}); it is kept as {keep.name}, and every stage runs again")
    return {}


def plan_stages(ctx: BuildContext) -> list[tuple[object, str, bool]]:
    """(stage, fingerprint, would-skip) for each stage, without running anything (for --dry-run)."""
    from edgekit.stages import STAGES

    old = _read_manifest(ctx.build_dir).get("stages", {})
    prev = ctx.model_sha256
    out = []
    for i, stage in enumerate(STAGES):
        fp = sha256_json({"stage": stage.name, "config": stage.config(ctx), "input": prev})
        rec = old.get(stage.name, {})
        skip = rec.get("status") in ("done", "passed-through") and rec.get("fingerprint") == fp and (
            rec.get("status") == "passed-through" or stage_dir(ctx, i, stage.name).is_dir())
        out.append((stage, fp, skip))
        prev = fp
    return out


def run_build(ctx: BuildContext, progress=None) -> dict:
    """Run every stage in order (skipping finished ones); returns the manifest."""
    from edgekit.export import library_versions
    from edgekit.stages import STAGES

    ctx.build_dir.mkdir(parents=True, exist_ok=True)
    for p in clean_stale(ctx.build_dir):
        ctx.log(f"resume: removed the remains of an interrupted stage ({p.name})")
    if not ctx.model_sha256:
        ctx.model_sha256 = sha256_tree(ctx.model.path)
    manifest = _read_manifest(ctx.build_dir, ctx.log)
    manifest.update({
        "schema": MANIFEST_SCHEMA,
        "edgekit_version": __version__,
        "target": ctx.target.to_dict(),
        "model": {"source": ctx.model.source, "path": str(ctx.model.path), "arch": ctx.model.arch,
                  "sha256": ctx.model_sha256},
        "options": asdict(ctx.options),
        "resolved": {"backend": ctx.backend, "precision": ctx.precision, "context_length": ctx.context_length},
        "versions": library_versions("torch", "transformers", "onnxruntime", "optimum", "gguf",
                                     "llama-cpp-python", "executorch", "torchao"),
    })
    manifest.setdefault("created", _now())
    manifest["status"] = "building"  # until the last stage has finished: a reader never sees a stale "built"
    stages_rec = manifest.setdefault("stages", {})
    ctx.current_model = ctx.model.path
    for i, (stage, fp, skip) in enumerate(plan_stages(ctx)):
        folder = stage_dir(ctx, i, stage.name)
        rec = stages_rec.get(stage.name, {})
        if skip:
            ctx.log(f"[{i + 1}/{len(STAGES)}] {stage.name}: unchanged, skipped")
            res = StageResult(rec["status"], rec.get("result", {}), rec.get("model_dir"), rec.get("artifact_dir"))
            rec["skipped_last_run"] = True
        else:
            ctx.log(f"[{i + 1}/{len(STAGES)}] {stage.name}: {stage.describe(ctx)}")
            rec = {"status": "running", "fingerprint": fp, "started": _now()}
            stages_rec[stage.name] = rec
            manifest["updated"] = _now()
            atomic_write_json(ctx.build_dir / MANIFEST, manifest)
            t0 = time.perf_counter()
            try:
                with atomic_dir(folder) as tmp:
                    res = stage.run(ctx, tmp)
                    if res.status == "passed-through":
                        raise _PassThrough(res)
            except _PassThrough as pt:
                res = pt.result
            except BaseException as e:
                rec.update(status="failed", finished=_now(), seconds=round(time.perf_counter() - t0, 3),
                           error=e.line() if isinstance(e, EdgekitError) else "".join(
                               traceback.format_exception_only(type(e), e)).strip())
                manifest["status"] = "failed"
                manifest["updated"] = _now()
                atomic_write_json(ctx.build_dir / MANIFEST, manifest)
                raise
            rec.update(status=res.status, finished=_now(), seconds=round(time.perf_counter() - t0, 3),
                       result=res.summary, model_dir=res.model_dir, artifact_dir=res.artifact_dir,
                       output=folder.name if res.status == "done" else None)
            if res.status == "passed-through":
                ctx.log(f"    {stage.name}: passed through ({res.summary.get('reason', '')})")
        if res.model_dir:
            ctx.current_model = folder / res.model_dir
        if res.artifact_dir:
            ctx.artifact = folder / res.artifact_dir
        ctx.results[stage.name] = res.summary
        stages_rec[stage.name] = rec
        manifest["updated"] = _now()
        atomic_write_json(ctx.build_dir / MANIFEST, manifest)
        if progress:
            progress()
    manifest["artifact"] = str(ctx.artifact) if ctx.artifact else None
    manifest["status"] = "built"
    atomic_write_json(ctx.build_dir / MANIFEST, manifest)
    from edgekit.report import write_report

    manifest["report"] = {k: str(v) for k, v in write_report(ctx.build_dir, manifest).items()}
    atomic_write_json(ctx.build_dir / MANIFEST, manifest)
    return manifest


class _PassThrough(Exception):
    """Unwinds atomic_dir so a stage that did nothing leaves no folder behind."""

    def __init__(self, result: StageResult):
        self.result = result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
