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
