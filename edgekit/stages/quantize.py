from __future__ import annotations

from pathlib import Path

from edgekit.pipeline import BuildContext, StageResult

FULL_PRECISIONS = ("fp32", "f32")


class QuantizeStage:
    """Chooses the weight format. The conversion itself belongs to the backend (ONNX Runtime's dynamic int8, llama.cpp's
    quantizer, torchao's 8da4w, TensorRT's builder), so this stage records the decision and checks the order: it
    runs only after every training stage, and no later stage trains."""

    name = "quantize"

    def describe(self, ctx: BuildContext) -> str:
        if ctx.precision in FULL_PRECISIONS:
            return "keep full precision"
        return f"{ctx.precision} weights, applied by the {ctx.backend} exporter after all training"

    def config(self, ctx: BuildContext) -> dict:
        return {"backend": ctx.backend, "precision": ctx.precision}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        from edgekit.errors import EdgekitError
        from edgekit.exporters import get

        spec = get(ctx.backend)
        if ctx.precision not in spec.precisions:
            raise EdgekitError(f"backend {ctx.backend} cannot produce precision {ctx.precision!r}",
                               f"use one of {', '.join(spec.precisions)}")
        if ctx.precision in FULL_PRECISIONS:
            return StageResult("passed-through", {"reason": "full precision asked", "precision": ctx.precision})
        return StageResult("passed-through", {"reason": f"{ctx.precision} is applied by the {ctx.backend} exporter",
                                              "precision": ctx.precision})
