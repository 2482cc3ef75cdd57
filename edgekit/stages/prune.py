from __future__ import annotations

from pathlib import Path

from edgekit.pipeline import BuildContext, StageResult


class PruneStage:
    name = "prune"

    def describe(self, ctx: BuildContext) -> str:
        if not ctx.prune_ratio:
            return "nothing to prune (the plan fits without it)"
        return f"remove {ctx.prune_ratio:.0%} of parameters (widthwise)"

    def config(self, ctx: BuildContext) -> dict:
        return {"ratio": ctx.prune_ratio, "align": ctx.target.build.width_alignment}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        if not ctx.prune_ratio:
            return StageResult("passed-through", {"reason": "no pruning requested or needed"})
        from edgekit.errors import EdgekitError

        raise EdgekitError("pruning is not built yet in this version", "build without --prune-ratio")
