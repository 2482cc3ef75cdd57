"""On the device: the artifact is intact and loads, its outputs match the host's PyTorch reference within the
gate's thresholds, and its peak memory stays within the target's budget."""

from __future__ import annotations

import numpy as np
import pytest


def test_files_match_their_hashes(artifact, meta):
    from edgekit.runtime import verify_files

    assert meta.get("files"), "artifact.json lists no files"
    verify_files(artifact, meta)


def test_loads_and_runs(artifact, meta):
    if meta["backend"] == "tensorrt":  # no per-token runner: loading means building/deserializing the engine
        from edgekit.runtime.tensorrt import ensure_engine

        assert ensure_engine(artifact).is_file()
        return
    from edgekit.runtime import open_artifact

    runner = open_artifact(artifact)
    assert runner.vocab_size == meta["model"]["vocab_size"]
    logits = runner.forward(np.array([1, 2, 3, 4], dtype=np.int64))
    assert logits.shape == (4, runner.vocab_size)
    assert np.isfinite(logits).all()


def test_outputs_match_reference(reference_check):
    assert reference_check["ok"], f"the reference check could not run: {reference_check.get('error')}"
    res = reference_check["result"]
    assert res["passed"], "outputs differ from the host reference: " + "; ".join(res["failures"])


def test_peak_memory_within_budget(reference_check, budget_mb):
    if not budget_mb:
        pytest.skip("no memory budget given (--budget-mb or EDGEKIT_BUDGET_MB; the agent passes the target's)")
    assert reference_check["ok"], f"the reference check could not run: {reference_check.get('error')}"
    peak = reference_check["memory"]["peak_rss_mb"]
    assert peak <= budget_mb, f"peak RSS {peak:.0f} MB is over the budget of {budget_mb:.0f} MB"
