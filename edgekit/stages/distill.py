from __future__ import annotations

from pathlib import Path

from edgekit.pipeline import BuildContext, StageResult


class DistillStage:
    """Recovers the pruned model's quality by distilling from the original (the teacher = the build's input model).
    Checkpoints live beside the stage folder (BUILD/distill.ckpt), so a killed build resumes mid-training."""

    name = "distill"

    def describe(self, ctx: BuildContext) -> str:
        if ctx.options.distill_steps <= 0:
            return "nothing to recover (no distillation steps asked)"
        qat = f", quantization-aware for {ctx.precision}" if ctx.options.qat else ""
        return f"distill from the original model for {ctx.options.distill_steps} steps{qat}"

    def _config(self, ctx: BuildContext):
        from edgekit.distill.config import DistillConfig

        if ctx.options.qat:  # the build's precision is the QAT scheme (api.build refuses any other)
            return DistillConfig(steps=ctx.options.distill_steps, qat=ctx.precision, qat_backend=ctx.backend)
        return DistillConfig(steps=ctx.options.distill_steps)

    def config(self, ctx: BuildContext) -> dict:
        if ctx.options.distill_steps <= 0:
            return {"steps": 0}
        return self._config(ctx).to_dict()

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        if ctx.options.distill_steps <= 0:
            return StageResult("passed-through", {"reason": "no distillation steps asked"})
        unpruned = ctx.current_model is None or Path(ctx.current_model).resolve() == Path(ctx.model.path).resolve()
        if unpruned and not ctx.options.qat:
            return StageResult("passed-through", {"reason": "nothing was pruned: the student would be the teacher"})
        from edgekit.distill import distill

        # QAT of an unpruned model: the student starts as the teacher and learns its own 4-bit grid
        report = distill(ctx.model.path, ctx.model.path if unpruned else ctx.current_model, out / "model", self._config(ctx),
                         checkpoint_dir=ctx.build_dir / "distill.ckpt", log=ctx.log, progress=False)
        summary = {k: report[k] for k in ("steps", "tokens", "heldout_perplexity", "train_seconds", "tokens_per_s",
                                          "data", "resumed_from_step", "qat")}
        return StageResult("done", summary, model_dir="model")
