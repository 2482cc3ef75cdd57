from __future__ import annotations

from pathlib import Path

from edgekit.pipeline import BuildContext, StageResult


class QuantizeStage:
    """Chooses the weight format. The conversion itself belongs to the backend (ONNX Runtime's MatMulNBits, llama.cpp's
    quantizer, torchao's 8da4w, TensorRT's builder), so this stage records the decision and checks the order: it
    runs only after every training stage, and no later stage trains."""

    name = "quantize"

    def describe(self, ctx: BuildContext) -> str:
        from edgekit.precision import get_precision

        if not get_precision(ctx.precision).quantized:
            return f"keep {ctx.precision} weights"
        return f"{ctx.precision} weights, applied by the {ctx.backend} exporter after all training"

    def config(self, ctx: BuildContext) -> dict:
        return {"backend": ctx.backend, "precision": ctx.precision}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        from edgekit.exporters import get
        from edgekit.precision import get_precision

        p = get_precision(get(ctx.backend).precision(ctx.precision))
        if not p.quantized:
            return StageResult("passed-through", {"reason": f"{p.name} is not quantized", "precision": p.name})
        return StageResult("passed-through", {"reason": f"{p.name} is applied by the {ctx.backend} exporter",
                                              "precision": p.name})
