"""edgekit.build(): plan -> prune -> distill -> quantize -> export -> verify -> bench for a target, resumably.
`edgekit build` is argparse around this function."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from edgekit.api.common import api_function, as_path, console
from edgekit.api.results import BuildPlan, BuildResult, StagePlan

if TYPE_CHECKING:
    from edgekit.pipeline import BuildOptions
    from edgekit.target import Target

# {BuildOptions field: the keyword (and CLI flag) that sets it}, where the two names differ
_KEYWORD = {"context_length": "context"}
_RANGES = {"context": (1, None), "prune_ratio": (0, 1), "min_decode_tps": (1e-6, None), "batch": (1, None),
           "distill_steps": (0, None), "bench_seconds": (0, 3600), "threads": (1, 1024)}


@api_function("build")
def build(model: str | Path | None = None, *, target: str | Path | Target, out: str | Path | None = None,
          backend: str | None = None, precision: str | None = None, context: int | None = None,
          prune_ratio: float | None = None, min_decode_tps: float | None = None, batch: int = 1,
          distill_steps: int = 0, qat: str | None = None, kv_cache: str | None = None,
          accept_gate_failure: bool = False, bench: bool = True, bench_seconds: float = 2.0,
          threads: int | None = None, device: str | None = None,
          token_file: str | Path | None = None, options: BuildOptions | None = None, dry_run: bool = False,
          verbose: bool = False, progress: bool | None = None) -> BuildResult | BuildPlan:
    """Build a verified artifact of `model` (a Hugging Face folder or .gguf; None: the embedded SmolLM2-135M) for
    `target` (a name, an alias, a .toml path or a Target) in `out` (default edgekit-build/TARGET).

    The keywords are `edgekit build`'s flags (`bench=False` is --no-bench); `options` (a pipeline.BuildOptions) may
    carry them instead, and a keyword left at its default does not override it. Precision and target names take
    the CLI's aliases (f32, Q4_K_M, rpi5). Rerunning with the same inputs skips every finished stage.
    Returns a BuildResult, or with dry_run=True a BuildPlan (nothing written). Raises EdgekitError (GateFailed
    when the artifact fails its fidelity gate and accept_gate_failure is False).
    verbose=True prints the CLI's log lines and progress on stderr; progress (default: verbose) the stage bar."""
    from edgekit.commands import check_numbers
    from edgekit.models import resolve_model
    from edgekit.pipeline import BuildContext, BuildOptions, plan_stages, run_build
    from edgekit.stages.prune import PruneStage
    from edgekit.target import Target, get_target

    given = {"backend": backend, "precision": precision, "context_length": context, "prune_ratio": prune_ratio,
             "min_decode_tps": min_decode_tps, "batch": batch, "distill_steps": distill_steps, "qat": qat,
             "kv_cache": kv_cache, "accept_gate_failure": accept_gate_failure, "bench": bench,
             "bench_seconds": bench_seconds, "threads": threads, "device": device,
             "token_file": None if token_file is None else str(token_file)}
    base = options or BuildOptions()
    defaults = BuildOptions()
    opts = replace(base, **{k: v for k, v in given.items() if v != getattr(defaults, k)})
    check_numbers(SimpleNamespace(**{_KEYWORD.get(f.name, f.name): getattr(opts, f.name) for f in fields(opts)}),
                  _RANGES)
    with console(verbose) as log:
        t = target if isinstance(target, Target) else get_target(str(target))
        if opts.backend == "auto":  # the matrix's winner: the fastest row that passes its gate and fits
            opts = _auto_backend(model, t, opts, as_path(out) or Path("edgekit-build") / t.name, dry_run, verbose)
        opts = _check_options(opts, t)
        ref = resolve_model(None if model is None else str(model))
        out_dir = as_path(out) or Path("edgekit-build") / t.name
        if not dry_run:
            from edgekit.fsutil import check_output
            from edgekit.pipeline import MANIFEST

            # stage folders go inside the build directory (it is never wiped, so other files there are safe), but
            # not inside the model: that would change the model's hash and with it every resume decision
            check_output(out_dir, [ref.path], MANIFEST, force=True)
        ctx = BuildContext(target=t, model=ref, options=opts, build_dir=out_dir, log=log)
        ctx.plan  # the plan's refusals (a context beyond the model, nothing fits) come before anything is written
        PruneStage().check(ctx)
        if dry_run:
            from edgekit.fsutil import sha256_tree

            ctx.model_sha256 = sha256_tree(ref.path)
            rows = tuple(StagePlan(s.name, "skip (unchanged)" if skip else s.describe(ctx), fp[:12])
                         for s, fp, skip in plan_stages(ctx))
            return BuildPlan(build_dir=out_dir, target=t.name, model=ref.path,
                             model_source=ref.source, backend=ctx.backend,
                             precision=ctx.precision, context_length=ctx.context_length, stages=rows)
        from edgekit.exporters import get
        from edgekit.extras import require
        from edgekit.stages import STAGES
        from edgekit.ui import progress as bar

        require(get(ctx.backend).requires, f"building for {ctx.backend}")  # one line now, not a traceback at export
        with bar(f"build {t.name}", total=len(STAGES), enabled=verbose if progress is None else progress) as advance:
            manifest = run_build(ctx, progress=advance)
    return BuildResult.from_manifest(out_dir, manifest)


def _auto_backend(model, target, opts, out_dir: Path, dry_run: bool, verbose: bool):
    """Run `edgekit bench --matrix` into OUT/matrix and take its winner. The winner's row is a finished build with
    the same options, so OUT starts as a copy of it (hard links) and the pipeline skips every unchanged stage."""
    import shutil

    from edgekit.api.matrix import bench_matrix
    from edgekit.errors import EdgekitError
    from edgekit.pipeline import MANIFEST

    if dry_run:
        raise EdgekitError("--backend auto builds and benchmarks every backend to choose one, which --dry-run cannot",
                           "drop --dry-run, or pass --backend NAME")
    m = bench_matrix(model, target=target, out=out_dir / "matrix", precisions=opts.precision,
                     context=opts.context_length, prune_ratio=opts.prune_ratio, distill_steps=opts.distill_steps,
                     bench_seconds=opts.bench_seconds, threads=opts.threads, verbose=verbose)
    w = m.winner
    if w is None:
        raise EdgekitError(f"no backend x precision of {target.name} passed its gate and fits its memory budget "
                           f"(table: {out_dir / 'matrix' / 'matrix.md'})",
                           "pass --backend NAME --precision P, with --accept-gate-failure to keep a failing one")
    row = Path(w.record["build_dir"])
    if not (out_dir / MANIFEST).exists() and (row / MANIFEST).is_file():
        for p in row.iterdir():
            if p.name.startswith("row") and p.suffix == ".json":
                continue
            dest = out_dir / p.name
            if p.is_dir():
                shutil.copytree(p, dest, copy_function=_link, dirs_exist_ok=True)
            elif not dest.exists():
                _link(p, dest)
    if verbose:
        from edgekit.ui import log

        log(f"build: --backend auto chose {w.backend} {w.precision} ({w.decode_tps_p50:.1f} tokens/s p50, "
            f"gate passed, fits): {m.winner_rule}")
    return replace(opts, backend=w.backend, precision=w.precision)


def _link(src, dst) -> None:
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def _check_options(opts, target):
    from edgekit.errors import EdgekitError
    from edgekit.exporters import get

    if opts.prune_ratio is not None and not 0 < opts.prune_ratio < 1:
        raise EdgekitError(f"--prune-ratio must be between 0 and 1 (exclusive), got {opts.prune_ratio}",
                           "e.g. --prune-ratio 0.3 removes 30% of parameters")
    if opts.qat and not opts.backend:  # the target's backend that lowers the scheme (x86-cpu: --qat int4 -> ORT)
        from edgekit.precision import get_precision

        scheme = get_precision(opts.qat).name
        able = [b for b in target.build.matrix_backends if scheme in get(b).precisions]
        if able and able[0] != target.build.backend:
            opts = replace(opts, backend=able[0])
    backend = get(opts.backend or target.build.backend)
    if opts.precision:  # else the planner chooses among what this backend declares
        backend.precision(opts.precision)
    if opts.qat:  # QAT is the last training step: the build then exports exactly the scheme it trained for
        from edgekit.precision import get_precision
        from edgekit.qat import resolve

        plan = resolve(opts.qat, backend.name)
        if opts.precision and get_precision(opts.precision).name != plan.scheme:
            raise EdgekitError(f"--qat {plan.scheme} trains for {plan.scheme}, but --precision asks for "
                               f"{get_precision(opts.precision).name}", f"drop --precision or pass -p {plan.scheme}")
        if opts.distill_steps <= 0:
            raise EdgekitError("--qat trains by distillation, but no distillation steps are asked",
                               "add --distill-steps N (e.g. 200)")
        opts = replace(opts, qat=plan.scheme, precision=plan.scheme)
    return opts
