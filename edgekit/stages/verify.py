from __future__ import annotations

from pathlib import Path

from edgekit.fsutil import atomic_write_json
from edgekit.pipeline import BuildContext, StageResult


class VerifyStage:
    """Re-opens the artifact from disk the way a device will (hashes checked, no torch) and re-runs the gate against
    the reference that ships with it."""

    name = "verify"

    def describe(self, ctx: BuildContext) -> str:
        return "reload the artifact torch-free, check its hashes and re-run the gate from its shipped reference"

    def config(self, ctx: BuildContext) -> dict:
        return {}

    def run(self, ctx: BuildContext, out: Path) -> StageResult:
        from edgekit.errors import GateFailed
        from edgekit.verify import check_against_reference

        res = check_against_reference(ctx.artifact, threads=ctx.options.threads)
        atomic_write_json(out / "verify.json", res)
        if not res["passed"] and not ctx.options.accept_gate_failure:
            raise GateFailed(f"the artifact reloaded from disk fails its gate: {'; '.join(res['failures'])}",
                             "re-export; pass --accept-gate-failure to keep it anyway (recorded)")
        return StageResult("done", res)
