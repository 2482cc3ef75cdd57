import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "qwen2", "mistral")


def cli_env(**extra) -> dict:
    """Subprocesses run the edgekit of this checkout, whatever is installed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    return env


@pytest.fixture(scope="session")
def cli():
    def run(*args, check=None, timeout=900, **env):
        p = subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=cli_env(**env))
        if check is not None:
            assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        return p

    return run


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: folder} of tiny random GQA models with a trained BPE tokenizer, built once per session."""
    from edgekit.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_model(a, root / a, seed=i) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def declared_artifact(tiny_models, tmp_path_factory):
    """`get(backend, precision)` -> (artifact folder, artifact.json) of the tiny Llama at context 128, exported once
    per session with the gate recorded, not enforced (the backend-contract test and per-backend tests share it)."""
    from edgekit.export import ExportConfig, export_model
    from edgekit.target import get_target

    root, cache = tmp_path_factory.mktemp("declared"), {}

    def get(backend: str, precision: str):
        if (backend, precision) not in cache:
            out = root / f"{backend}-{precision}"
            target = get_target("jetson-orin") if backend == "tensorrt" else None
            meta = export_model(tiny_models["llama"], out, ExportConfig(
                backend=backend, precision=precision, context_length=128, accept_gate_failure=True,
                target=target), log=lambda *_: None)
            cache[backend, precision] = out, meta
        return cache[backend, precision]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct HF folder (converted once into the edgekit cache)."""
    from edgekit.models import resolve_model

    return resolve_model(None).path


@pytest.fixture(scope="session")
def vlm_models(tmp_path_factory):
    """{family: folder} of a tiny random model of every registered VLM family (the VLM tests share them)."""
    from edgekit.arch import VLM_FAMILIES
    from edgekit.testing import make_tiny_vlm

    root = tmp_path_factory.mktemp("vlm")
    return {f: make_tiny_vlm(f, root / f, seed=i) for i, f in enumerate(sorted(VLM_FAMILIES))}


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """24 generated image+caption pairs (calibration and distillation data of the VLM tests)."""
    from edgekit.vlm.data import generate_pairs

    return generate_pairs(tmp_path_factory.mktemp("pairs"), n=24)
