from __future__ import annotations

from pathlib import Path

from edgekit.fsutil import atomic_write_json
from edgekit.pipeline import BuildContext, StageResult


class PlanStage:
    name = "plan"

    def describe(self, ctx: BuildContext) -> str:
        return (f"memory budget of {ctx.target.name} for {ctx.backend} {ctx.precision} at context "
                f"{ctx.context_length}")

    def config(self, ctx: BuildContext) -> dict:
        return {"target": ctx.target.to_dict(), "backend": ctx.backend, "precision": ctx.precision,
                "context": ctx.context_length, "prune_ratio": ctx.options.prune_ratio}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        from edgekit.plan import estimate

        est = estimate(ctx.model.config, ctx.target, ctx.backend, ctx.precision, ctx.context_length)
        atomic_write_json(out / "plan.json", est)
        return StageResult("done", est)
