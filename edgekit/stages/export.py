from __future__ import annotations

from pathlib import Path

from edgekit.pipeline import BuildContext, StageResult


class ExportStage:
    name = "export"

    def describe(self, ctx: BuildContext) -> str:
        kv = f" with a {ctx.kv_cache} KV cache" if ctx.kv_cache else ""
        return f"{ctx.backend} {ctx.precision} artifact{kv}, gated against PyTorch on held-out text"

    def config(self, ctx: BuildContext) -> dict:
        return {"backend": ctx.backend, "precision": ctx.precision, "context": ctx.context_length,
                "accept_gate_failure": ctx.options.accept_gate_failure,
                **({"kv_cache": ctx.kv_cache} if ctx.kv_cache else {})}  # absent: earlier builds stay valid

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        from edgekit.export import ExportConfig, export_model

        cfg = ExportConfig(backend=ctx.backend, precision=ctx.precision, context_length=ctx.context_length,
                           accept_gate_failure=ctx.options.accept_gate_failure, threads=ctx.options.threads,
                           target=ctx.target, rejected=ctx.build_dir / "rejected" / "artifact", kv_cache=ctx.kv_cache)
        meta = export_model(ctx.current_model, out / "artifact", cfg, log=ctx.log)
        size = sum(p.stat().st_size for p in (out / "artifact").iterdir() if p.is_file())
        return StageResult("done", {"backend": ctx.backend, "precision": ctx.precision, "size_bytes": size,
                                    "gate": meta["gate"]}, artifact_dir="artifact")
