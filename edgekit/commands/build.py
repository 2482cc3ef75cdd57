from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
stages (in this order, always): plan -> prune -> distill -> quantize -> export -> verify -> bench
Each writes into OUT/NN-stage/ and OUT/manifest.json; rerun the same command to resume or to skip what is done.

examples:
  edgekit build --target x86-cpu                         the embedded SmolLM2-135M, GGUF q8_0 (llama.cpp)
  edgekit build --target x86-cpu --precision int8 ./my-model -o build/int8
  edgekit build --target jetson-orin --dry-run           what would happen, nothing written
  edgekit build --target x86-cpu --backend auto          every backend x precision compared, the winner built
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
    p.add_argument("--backend", "-b", help="override the target's backend; `auto`: run `edgekit bench --matrix` "
                   "into OUT/matrix and build its winner (the fastest that passes its gate and fits)")
    p.add_argument("--precision", "-p", help="override the target's default precision (any case; aliases such as "
                   "f32 or Q4_K_M work)")
    p.add_argument("--context", type=int, help="context length to plan and export for (default: the target's)")
    p.add_argument("--prune-ratio", type=float, help="fraction of parameters to remove (default: the plan's)")
    p.add_argument("--min-decode-tps", type=float, help="decode-speed goal the plan must meet (tokens/s)")
    p.add_argument("--batch", type=int, default=1, help="batch size to plan memory for (default 1)")
    p.add_argument("--distill-steps", type=int, default=0, help="distillation steps after pruning (default 0)")
    p.add_argument("--qat", metavar="SCHEME", help="make distillation quantization-aware for this precision (8da4w, "
                   "int4); the build then exports it on the grid it trained through")
    p.add_argument("--kv-cache", help="KV-cache type (gguf: f32, f16, q8_0; default: the runtime's, "
                   "or q8_0 when only that fits the context)")
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
    import edgekit.api
    from edgekit.ui import print_json

    res = edgekit.api.build(a.model, target=a.target, out=a.out, backend=a.backend, precision=a.precision,
                            context=a.context, prune_ratio=a.prune_ratio, min_decode_tps=a.min_decode_tps,
                            batch=a.batch, distill_steps=a.distill_steps, qat=a.qat, kv_cache=a.kv_cache,
                            accept_gate_failure=a.accept_gate_failure,
                            bench=not a.no_bench, bench_seconds=a.bench_seconds, threads=a.threads, device=a.device,
                            token_file=a.token_file, dry_run=a.dry_run, verbose=True, progress=not a.json)
    if a.json:
        print_json(res.to_dict())
    elif a.dry_run:
        from edgekit.ui import table

        table(f"edgekit build --dry-run: {res.model_source} -> {res.target} ({res.backend} {res.precision}) "
              f"in {res.build_dir}", [(s.stage, s.action) for s in res.stages], ("stage", "will"))
    else:
        print_summary(res.manifest, res.out_dir)
    return 0


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
