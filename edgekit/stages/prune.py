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

    def check(self, ctx: BuildContext) -> None:
        """Refuse, before anything is written and in build's own flags, a ratio the target's width alignment cannot
        reach (prune_model's refusal names prune's --ratio and --align, which build does not have)."""
        if not ctx.prune_ratio:
            return
        from edgekit.arch import family_of
        from edgekit.errors import EdgekitError
        from edgekit.prune.allocate import max_uniform_ratio

        align = ctx.target.build.width_alignment
        most = max_uniform_ratio(family_of(ctx.model.config).geometry(ctx.model.config), align)
        if ctx.prune_ratio <= most:
            return
        asked = (f"--prune-ratio {ctx.prune_ratio:g}" if ctx.options.prune_ratio else
                 f"the plan's pruning ratio {ctx.prune_ratio:g} (needed to fit {ctx.target.name})")
        profile = f"a --target .toml profile whose [build] width_alignment is below {align}"
        fix = (f"pass --prune-ratio {most:g} or less, or {profile}" if ctx.options.prune_ratio and most > 0 else
               f"pass {profile}" + ("" if ctx.options.prune_ratio else ", or a --target with more memory"))
        raise EdgekitError(f"{asked} cannot be reached at {ctx.target.name}'s width alignment {align}: every width "
                           f"stays a multiple of {align}, so a uniform cut of this model removes at most {most:g}", fix)

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
