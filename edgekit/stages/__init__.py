"""The stages of `edgekit build`, in their only allowed order (P -> KD -> Q: quantizing before training destroys
trainability, so nothing can reorder them). Each stage module holds one class with:

    name: str
    describe(ctx) -> str             what it will do, for --dry-run and the log
    config(ctx) -> dict              everything that changes its output (hashed into the fingerprint)
    run(ctx, out: Path) -> StageResult   writes only into `out`, a temporary folder renamed on success
"""

from edgekit.stages.bench import BenchStage
from edgekit.stages.distill import DistillStage
from edgekit.stages.export import ExportStage
from edgekit.stages.plan import PlanStage
from edgekit.stages.prune import PruneStage
from edgekit.stages.quantize import QuantizeStage
from edgekit.stages.verify import VerifyStage

STAGES = (PlanStage(), PruneStage(), DistillStage(), QuantizeStage(), ExportStage(), VerifyStage(), BenchStage())

# Stages that change weights by structure or training: all must come before quantize.
WEIGHT_CHANGING = ("prune", "distill")


def check_order(stages) -> None:
    """Refuse a pipeline that quantizes before pruning or distilling (would train a quantized model)."""
    from edgekit.errors import EdgekitError

    names = [s.name for s in stages]
    if "quantize" not in names:
        return
    late = [n for n in WEIGHT_CHANGING if n in names and names.index(n) > names.index("quantize")]
    if late:
        from edgekit.distill.guard import ORDER_REASON

        raise EdgekitError(f"stage order {' -> '.join(names)} puts quantize before {', '.join(late)}; "
                           + ORDER_REASON, "keep the order prune -> distill -> quantize")


check_order(STAGES)
