"""A failed gate keeps its artifact in rejected/ beside the intended output (nothing under the output's own name),
and a failed `build --json` still prints one JSON object on stdout. The gate is made to fail for real: the GGUF
writer skips llama.cpp's rotary permutation of q/k, so llama.cpp's logits differ from PyTorch's."""

from __future__ import annotations

import json

import pytest

from edgekit.errors import GateFailed


@pytest.fixture
def broken_gguf(monkeypatch):
    import edgekit.exporters.gguf as g

    monkeypatch.setattr(g, "rotary_to_interleaved", lambda w, *a: w)


def test_export_keeps_a_gate_failed_artifact_in_rejected(tiny_models, tmp_path, broken_gguf):
    from edgekit.export import ExportConfig, export_model

    with pytest.raises(GateFailed, match="kept in .*rejected/a") as e:
        export_model(tiny_models["llama"], tmp_path / "a", ExportConfig(backend="gguf", precision="f32"),
                     log=lambda *a: None)
    assert not (tmp_path / "a").exists()
    meta = json.loads((tmp_path / "rejected" / "a" / "artifact.json").read_text())
    assert not meta["gate"]["passed"] and not meta["gate"]["overridden"]
    assert str(tmp_path / "rejected" / "a") in e.value.line()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_failed_build_json_prints_the_error_and_keeps_the_artifact(tiny_models, tmp_path, broken_gguf, capsys):
    from edgekit.cli import main

    rc = main(["build", str(tiny_models["llama"]), "-t", "x86-cpu", "-b", "gguf", "-p", "f32", "-o",
               str(tmp_path / "b"), "--no-bench", "--json"])
    out, err = capsys.readouterr()
    assert rc == 3
    res = json.loads(out)  # the whole of stdout is one JSON object
    assert res["status"] == "failed" and res["exit_code"] == 3 and "fidelity gate" in res["error"]
    assert "--accept-gate-failure" in res["fix"] and err.strip().splitlines()[-1].startswith("edgekit: error: ")
    kept = tmp_path / "b" / "rejected" / "artifact"
    assert str(kept) in res["error"] and (kept / "artifact.json").is_file()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "failed"
