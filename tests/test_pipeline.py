"""`edgekit build` end to end: stages, manifest, resume after SIGKILL, dry run, and bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli_env


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_build_then_rerun_skips_everything(cli, tiny_models, tmp_path):
    out = tmp_path / "b"
    m = json.loads(cli("build", "--target", "x86-cpu", "-b", "onnxruntime", tiny_models["qwen2"], "-o", out, "--bench-seconds", "0.3",
                       "--json", check=0).stdout)
    st = m["stages"]
    assert list(st) == ["plan", "prune", "distill", "quantize", "export", "verify", "bench"]
    assert st["prune"]["status"] == st["distill"]["status"] == "passed-through"
    assert st["export"]["result"]["gate"]["passed"] and st["verify"]["result"]["greedy_match"]
    assert st["bench"]["result"]["decode_tokens_per_s"] > 0
    assert len(m["model"]["sha256"]) == 64 and m["versions"]["onnxruntime"] == "1.32.0"
    assert (out / "04-export" / "artifact" / "model.onnx").is_file()
    m2 = json.loads(cli("build", "--target", "x86-cpu", "-b", "onnxruntime", tiny_models["qwen2"], "-o", out, "--bench-seconds", "0.3",
                        "--json", check=0).stdout)
    assert all(r.get("skipped_last_run") for r in m2["stages"].values())
    # A changed option re-runs from the first stage it affects, and only from there.
    m3 = json.loads(cli("build", "--target", "x86-cpu", "-b", "onnxruntime", tiny_models["qwen2"], "-o", out, "--precision", "int8",
                        "--bench-seconds", "0.3", "--json", check=0).stdout)
    assert m3["stages"]["export"]["result"]["precision"] == "int8"
    assert not m3["stages"]["plan"].get("skipped_last_run") and not m3["stages"]["export"].get("skipped_last_run")


def test_sigkill_during_export_resumes(tiny_models, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "edgekit", "build", "--target", "x86-cpu", str(tiny_models["llama"]), "-o",
            str(out), "--bench-seconds", "0.3"]
    p = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if any(d.name.startswith(".04-export.tmp-") for d in out.glob(".*")):
            break
        time.sleep(0.05)
    assert p.poll() is None, "build ended before the export stage could be interrupted"
    time.sleep(0.5)  # well inside the conversion
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    m = _manifest(out)
    assert m["stages"]["export"]["status"] == "running" and m["status"] == "building"
    assert not (out / "04-export").exists()  # nothing half-written under the final name
    r = subprocess.run(argv + ["--json"], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["status"] == "built"
    assert m["stages"]["plan"]["skipped_last_run"] and not m["stages"]["export"].get("skipped_last_run")
    assert m["stages"]["verify"]["result"]["passed"] and m["stages"]["verify"]["result"]["greedy_match"]
    assert not [d for d in out.iterdir() if ".tmp-" in d.name]
    assert "resume: removed the remains of an interrupted stage" in r.stderr


def test_dry_run_writes_nothing(cli, tiny_models, tmp_path):
    out = tmp_path / "dry"
    r = json.loads(cli("build", "--target", "raspberry-pi-5", tiny_models["llama"], "-o", out, "--dry-run", "--json",
                       check=0).stdout)
    assert [s["stage"] for s in r["stages"]][0] == "plan" and r["target"] == "raspberry-pi-5-8gb"
    assert "gguf q4_k_m" in r["stages"][4]["action"]
    assert not out.exists()


def _one_error_line(p, needle):
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error: ") and needle in lines[0] and "(fix: " in lines[0]


def test_bad_inputs(cli, tiny_models, tmp_path):
    out = tmp_path / "out"
    _one_error_line(cli("build", "--target", "x86-cpu", tmp_path / "nope", "-o", out), "model path not found")
    (tmp_path / "empty").mkdir()
    _one_error_line(cli("build", "--target", "x86-cpu", tmp_path / "empty", "-o", out), "is not a model folder")
    _one_error_line(cli("build", "--target", "pdp-11", tiny_models["llama"], "-o", out), "unknown target 'pdp-11'")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = 'x'\n[memory\nram_gb = 1\n")
    _one_error_line(cli("build", "--target", bad_toml, tiny_models["llama"], "-o", out), "malformed target TOML")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    _one_error_line(cli("build", "--target", "x86-cpu", gpt2, "-o", out), "unsupported model family 'gpt2'")
    _one_error_line(cli("build", "--target", "x86-cpu", tiny_models["llama"], "-o", out, "-b", "onnxruntime",
                        "--precision", "q4_k_m"),
                    "cannot produce precision 'q4_k_m'")
    _one_error_line(cli("build", "--target", "x86-cpu", tiny_models["llama"], "-o", out, "--prune-ratio", "1.5"),
                    "--prune-ratio 1.5 is not a usable value")
    assert not out.exists()  # no bad input left anything behind


@pytest.mark.smollm2
def test_smollm2_build_x86(cli, smollm2, tmp_path):
    """README command 1: the embedded default model, built for x86-cpu, with fidelity and benchmark figures."""
    out = tmp_path / "smol"
    p = cli("build", "--target", "x86-cpu", "-o", out, "--bench-seconds", "1", check=0)
    assert "fidelity vs PyTorch" in p.stdout and "host benchmark" in p.stdout and "PASSED" in p.stdout
    m = _manifest(out)
    assert m["model"]["source"].startswith("SmolLM2-135M-Instruct")
    assert m["stages"]["verify"]["result"]["greedy_match"]
    assert m["stages"]["bench"]["result"]["decode_tokens_per_s"] > 5


def test_a_corrupt_manifest_is_reported_and_kept_before_starting_over(tmp_path):
    from edgekit.pipeline import MANIFEST, _read_manifest

    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        (tmp_path / MANIFEST).write_bytes(content)
        said = []
        assert _read_manifest(tmp_path, said.append) == {}
        assert len(said) == 1 and "is unreadable" in said[0] and "every stage runs again" in said[0]
        kept = sorted(tmp_path.glob(MANIFEST + ".corrupt-*"))
        assert kept and kept[-1].read_bytes() == content and not (tmp_path / MANIFEST).exists()
        for k in kept:
            k.unlink()
    (tmp_path / MANIFEST).write_bytes(b"{not json")
    assert _read_manifest(tmp_path) == {} and (tmp_path / MANIFEST).exists()  # --dry-run only reads
