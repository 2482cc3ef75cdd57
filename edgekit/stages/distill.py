from __future__ import annotations

from pathlib import Path

from edgekit.pipeline import BuildContext, StageResult


class DistillStage:
    name = "distill"

    def describe(self, ctx: BuildContext) -> str:
        if ctx.options.distill_steps <= 0:
            return "nothing to recover (no distillation steps asked)"
        return f"distill from the original model for {ctx.options.distill_steps} steps"

    def config(self, ctx: BuildContext) -> dict:
        return {"steps": ctx.options.distill_steps}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        if ctx.options.distill_steps <= 0:
            return StageResult("passed-through", {"reason": "no distillation steps asked"})
        from edgekit.errors import EdgekitError

        raise EdgekitError("distillation is not built yet in this version", "build with --distill-steps 0")
