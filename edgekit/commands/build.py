from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
stages (in this order, always): plan -> prune -> distill -> quantize -> export -> verify -> bench
Each writes into OUT/NN-stage/ and OUT/manifest.json; rerun the same command to resume or to skip what is done.

examples:
  edgekit build --target x86-cpu                         the embedded SmolLM2-135M, ONNX Runtime fp32
  edgekit build --target x86-cpu --precision int8 ./my-model -o build/int8
  edgekit build --target jetson-orin --dry-run           what would happen, nothing written
  edgekit build --target my-board.toml model.gguf --json
  edgekit build --target jetson-orin --device http://jetson.local:8765 --token-file token
"""


def register(sub) -> None:
    p = sub.add_parser("build", help="plan, prune, distill, quantize, export, verify and bench for a target",
                       description="Build a verified artifact of MODEL for a device target, resumably.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="Hugging Face folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--target", "-t", required=True, help="target name, alias, or path to a .toml profile")
    p.add_argument("-o", "--out", type=Path, help="build directory (default: edgekit-build/TARGET)")
    p.add_argument("--backend", "-b", help="override the target's backend")
    p.add_argument("--precision", "-p", help="override the target's default precision (any case; aliases such as "
                   "f32 or Q4_K_M work)")
    p.add_argument("--context", type=int, help="context length to plan and export for (default: the target's)")
    p.add_argument("--prune-ratio", type=float, help="fraction of parameters to remove (default: the plan's)")
    p.add_argument("--min-decode-tps", type=float, help="decode-speed goal the plan must meet (tokens/s)")
    p.add_argument("--batch", type=int, default=1, help="batch size to plan memory for (default 1)")
    p.add_argument("--distill-steps", type=int, default=0, help="distillation steps after pruning (default 0)")
    p.add_argument("--accept-gate-failure", action="store_true",
                   help="keep an artifact that fails the fidelity gate (recorded in the manifest)")
    p.add_argument("--no-bench", action="store_true", help="skip the host benchmark")
    p.add_argument("--bench-seconds", type=float, default=2.0, help="least benchmark duration (default 2)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's choice)")
    p.add_argument("--device", metavar="URL", help="also benchmark on a device running `edgekit agent serve`")
    p.add_argument("--token-file", help="file holding the device agent's token (with --device)")
    p.add_argument("--dry-run", action="store_true", help="print what each stage would do; write nothing")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    p.set_defaults(func=run)


def run(a) -> int:
    from edgekit.errors import EdgekitError

    try:
        return _run(a)
    except EdgekitError as e:  # --json: stdout still gets one JSON object, saying what failed (exit code unchanged)
        if a.json:
            from edgekit.ui import print_json

            print_json({"status": "failed", "error": e.problem, "fix": e.fix, "exit_code": e.exit_code})
        raise


def _run(a) -> int:
    from edgekit.commands import check_numbers

    check_numbers(a, {"context": (1, None), "prune_ratio": (0, 1), "min_decode_tps": (1e-6, None), "batch": (1, None), "distill_steps": (0, None), "bench_seconds": (0, 3600), "threads": (1, 1024)})
    from edgekit.models import resolve_model
    from edgekit.pipeline import BuildContext, BuildOptions, plan_stages, run_build
    from edgekit.stages.prune import PruneStage
    from edgekit.target import get_target
    from edgekit.ui import log, print_json, progress

    target = get_target(a.target)
    opts = BuildOptions(backend=a.backend, precision=a.precision, context_length=a.context,
                        prune_ratio=a.prune_ratio, distill_steps=a.distill_steps,
                        min_decode_tps=a.min_decode_tps, batch=a.batch,
                        accept_gate_failure=a.accept_gate_failure, bench=not a.no_bench,
                        bench_seconds=a.bench_seconds, threads=a.threads, device=a.device,
                        token_file=a.token_file)
    _check_options(opts, target)
    model = resolve_model(a.model)
    out = a.out or Path("edgekit-build") / target.name
    if not a.dry_run:
        from edgekit.fsutil import check_output
        from edgekit.pipeline import MANIFEST

        # stage folders go inside the build directory (it is never wiped, so other files there are safe), but not
        # inside the model: that would change the model's hash and with it every resume decision
        check_output(out, [model.path], MANIFEST, force=True)
    ctx = BuildContext(target=target, model=model, options=opts, build_dir=out, log=log)
    ctx.plan  # the plan's refusals (a context beyond the model, nothing fits) come before anything is written
    PruneStage().check(ctx)
    if a.dry_run:
        from edgekit.fsutil import sha256_tree

        ctx.model_sha256 = sha256_tree(model.path)
        rows = [{"stage": s.name, "action": "skip (unchanged)" if skip else s.describe(ctx), "fingerprint": fp[:12]}
                for s, fp, skip in plan_stages(ctx)]
        if a.json:
            print_json({"dry_run": True, "build_dir": str(out), "target": target.name, "model": str(model.path),
                        "resolved": {"backend": ctx.backend, "precision": ctx.precision,
                                     "context_length": ctx.context_length}, "stages": rows})
        else:
            from edgekit.ui import table

            table(f"edgekit build --dry-run: {model.source} -> {target.name} ({ctx.backend} {ctx.precision}) "
                  f"in {out}", [(r["stage"], r["action"]) for r in rows], ("stage", "will"))
        return 0
    from edgekit.exporters import get
    from edgekit.extras import require
    from edgekit.stages import STAGES

    require(get(ctx.backend).requires, f"building for {ctx.backend}")  # one line now, not a traceback at export
    with progress(f"build {target.name}", total=len(STAGES), enabled=not a.json) as advance:
        manifest = run_build(ctx, progress=advance)
    if a.json:
        print_json(manifest)
    else:
        print_summary(manifest, out)
    return 0


def _check_options(opts, target) -> None:
    from edgekit.errors import EdgekitError
    from edgekit.exporters import get

    if opts.prune_ratio is not None and not 0 < opts.prune_ratio < 1:
        raise EdgekitError(f"--prune-ratio must be between 0 and 1 (exclusive), got {opts.prune_ratio}",
                           "e.g. --prune-ratio 0.3 removes 30% of parameters")
    backend = get(opts.backend or target.build.backend)
    if opts.precision:  # else the planner chooses among what this backend declares
        backend.precision(opts.precision)


def print_summary(manifest: dict, out: Path) -> None:
    from edgekit.ui import table

    st = manifest["stages"]
    rows = [(name, rec["status"], f"{rec.get('seconds', 0):.1f}s" if rec.get("seconds") is not None else "",
             "yes" if rec.get("skipped_last_run") else "") for name, rec in st.items()]
    table(f"build {out} ({manifest['resolved']['backend']} {manifest['resolved']['precision']})", rows,
          ("stage", "status", "time", "skipped (resumed)"))
    gate = st.get("verify", {}).get("result") or st.get("export", {}).get("result", {}).get("gate", {})
    if gate:
        table("fidelity vs PyTorch (held-out text)", [
            ("max |delta logit|", f"{gate['max_abs_logit_delta']:.3g}"),
            ("top-1 agreement", f"{gate['top1_agreement']:.3f}"),
            ("mean KL (nats)", f"{gate['mean_kl']:.3g}"),
            ("32-token greedy identical", gate["greedy_match"]),
            ("gate", "PASSED" if gate["passed"] else "FAILED (accepted by flag)")], ("metric", "value"))
    b = st.get("bench", {}).get("result") or {}
    if b.get("decode_tokens_per_s"):
        from edgekit.commands.bench import bench_rows

        table("host benchmark", bench_rows(b), ("metric", "value"))
    from edgekit import ui

    print(f"artifact: {manifest.get('artifact')}")
    if ui.VERBOSITY >= 0:  # -q: the artifact is the one-line result
        print(f"report:   {manifest['report']['html']} (and report.md, report.json)")
