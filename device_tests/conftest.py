"""Options and shared fixtures for the device tests. The artifact defaults to ../artifact (the bundle layout);
--artifact / EDGEKIT_ARTIFACT and --budget-mb / EDGEKIT_BUDGET_MB override."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# The reference check in a fresh process, so its peak RSS is the artifact's alone (not pytest's), and a runtime
# that crashes fails a test instead of the whole session.
CHECK = """
import json, sys
from edgekit.exporters import get
from edgekit.runtime import read_artifact
art = sys.argv[1]
rt = get(read_artifact(art)["backend"]).load_runtime()
check = getattr(rt, "check_reference", None)  # backends without a per-token runner check themselves
if check is None:
    from edgekit.verify import check_against_reference as check
print(json.dumps(check(art)))
"""


def pytest_addoption(parser):
    g = parser.getgroup("edgekit device tests")
    g.addoption("--artifact", default=os.environ.get("EDGEKIT_ARTIFACT"), help="artifact folder (default ../artifact)")
    g.addoption("--budget-mb", type=float, default=float(os.environ.get("EDGEKIT_BUDGET_MB") or 0) or None,
                help="peak memory the artifact may use, in MB (the target's RAM less its OS reserve)")
    g.addoption("--check-timeout", type=float, default=1800.0)


@pytest.fixture(scope="session")
def artifact(request) -> Path:
    path = request.config.getoption("--artifact") or Path(__file__).resolve().parent.parent / "artifact"
    path = Path(path)
    if not (path / "artifact.json").is_file():
        pytest.fail(f"{path} is not an artifact folder (no artifact.json); pass --artifact DIR")
    return path


@pytest.fixture(scope="session")
def meta(artifact) -> dict:
    return json.loads((artifact / "artifact.json").read_text())


@pytest.fixture(scope="session")
def budget_mb(request):
    return request.config.getoption("--budget-mb")


@pytest.fixture(scope="session")
def reference_check(artifact, request) -> dict:
    """{"ok", "result" (the gate's comparison), "memory" (peak RSS, swap growth, timeline), "error"}."""
    from edgekit.runtime.bench import measure_subprocess

    return measure_subprocess([sys.executable, "-c", CHECK, str(artifact)],
                              timeout=request.config.getoption("--check-timeout"))
