from __future__ import annotations

from pathlib import Path

from edgekit.fsutil import atomic_write_json
from edgekit.pipeline import BuildContext, StageResult


class PlanStage:
    name = "plan"

    def describe(self, ctx: BuildContext) -> str:
        p = ctx.plan
        prune = f" + prune {p.prune_ratio:.0%}" if p.prune_ratio else ""
        return (f"{ctx.target.name}: {ctx.backend} {p.precision}{prune} at context {ctx.context_length} "
                f"({p.chosen['total_bytes'] / 2**30:.2f} of {p.budget_bytes / 2**30:.2f} GiB; {p.reason})")

    def config(self, ctx: BuildContext) -> dict:
        return {"plan": ctx.plan.to_dict()}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        plan = ctx.plan.to_dict()
        atomic_write_json(out / "plan.json", plan)
        return StageResult("done", plan)
