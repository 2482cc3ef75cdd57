"""edgekit's Python API: the four verbs of the CLI as functions returning typed, frozen results.

    import edgekit

    res = edgekit.build("my-llama", target="x86-cpu", precision="int8", out="build/int8")
    print(res.artifact, res.gate.passed, res.bench["decode_tokens_per_s"])

The CLI commands are argparse around these functions, and their --json output is the result's to_dict(). Importing
this package is cheap (no torch): each function imports its stage code when called. Errors are EdgekitError (one line:
problem and fix; GateFailed for a failed fidelity gate). Quiet unless verbose=True. docs/api.md has the details.
"""

from edgekit.api.benchmarking import bench
from edgekit.api.building import build
from edgekit.api.exporting import export
from edgekit.api.matrix import bench_matrix
from edgekit.api.pruning import prune
from edgekit.api.results import (BenchPoint, BenchResult, BuildPlan, BuildResult, ExportResult, GateResult,
                                 LayerWidths, MatrixResult, MatrixRow, PruneResult, StagePlan)

__all__ = ["build", "prune", "export", "bench", "bench_matrix", "MatrixResult", "MatrixRow", "BuildResult", "BuildPlan", "StagePlan", "PruneResult",
           "LayerWidths", "ExportResult", "BenchResult", "BenchPoint", "GateResult"]
