from __future__ import annotations

from pathlib import Path

from edgekit.pipeline import BuildContext, StageResult


class PruneStage:
    name = "prune"

    def describe(self, ctx: BuildContext) -> str:
        if not ctx.prune_ratio:
            return "nothing to prune (the plan fits without it)"
        return (f"remove {ctx.prune_ratio:.0%} of parameters (widthwise, activation importance, widths "
                f"aligned to {ctx.target.build.width_alignment})")

    def _cfg(self, ctx: BuildContext):
        from edgekit.prune import Budget, PruneConfig

        return PruneConfig(Budget(ratio=ctx.prune_ratio), align=ctx.target.build.width_alignment)

    def config(self, ctx: BuildContext) -> dict:
        if not ctx.prune_ratio:
            return {"ratio": None}
        return self._cfg(ctx).to_dict()

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        if not ctx.prune_ratio:
            return StageResult("passed-through", {"reason": "no pruning requested or needed"})
        from edgekit.prune import prune_model

        report = prune_model(ctx.current_model, out / "model", self._cfg(ctx), log=ctx.log)
        summary = {k: report[k] for k in ("params_before", "params_after", "removed_fraction", "uniform",
                                          "hidden_size", "dense_search_loss", "pruned_search_loss")}
        summary["widths"] = report["layers"][0] if report["uniform"] else report["layers"]
        return StageResult("done", summary, model_dir="model")
