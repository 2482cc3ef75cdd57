"""A non-editable `pip install .` works from outside the checkout, ships targets/exporters/device_tests inside the
edgekit namespace, and installs no top-level `exporters` module (PyPI has an unrelated package of that name)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("src")
    # Copy the tracked tree so the build never writes into the checkout (egg-info, build/).
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            dst = build / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(build)], check=True, capture_output=True, text=True)
    return target


def _run(site, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_installed_package_layout(installed, tmp_path):
    assert (installed / "edgekit" / "exporters" / "__init__.py").is_file()
    assert (installed / "edgekit" / "targets" / "x86-cpu.toml").is_file()
    assert (installed / "edgekit" / "data" / "calibration.txt").is_file()
    assert not (installed / "exporters").exists()
    code = ("import edgekit, edgekit.exporters as e, edgekit.target as t, importlib.util as u;"
            "print(edgekit.__file__); print(sorted(t.builtin_targets())); print(u.find_spec('exporters'))")
    p = _run(installed, "-c", code, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    path, names, exporters_spec = p.stdout.strip().splitlines()
    assert path.startswith(str(installed))
    assert "jetson-orin-nano-8gb" in names and exporters_spec == "None"


def test_installed_console_script(installed, tmp_path):
    script = installed / "bin" / "edgekit"
    assert script.is_file()
    p = _run(installed, str(script), "targets", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "x86-cpu" in {t["name"] for t in json.loads(p.stdout)}


def test_import_is_light(tmp_path):
    """Importing edgekit and its registries must not import torch or any runtime."""
    code = ("import sys, edgekit, edgekit.exporters, edgekit.target, edgekit.cli, edgekit.runtime;"
            "edgekit.cli.build_parser();"
            "print([m for m in ('torch','transformers','onnxruntime','llama_cpp','executorch') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_every_registered_exporter_imports():
    """The registry cannot rot: each entry's modules exist (imported lazily elsewhere)."""
    import importlib.util

    from edgekit.exporters import REGISTRY

    for spec in REGISTRY.values():
        assert importlib.util.find_spec(spec.module), spec.module
        assert importlib.util.find_spec(spec.runtime), spec.runtime


def test_every_package_is_declared():
    """A new folder with __init__.py under edgekit/ must be listed in pyproject, or the wheel silently lacks it."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgekit").rglob("__init__.py")}
    assert found <= declared, f"add to pyproject packages: {sorted(found - declared)}"


def test_installed_tree_matches_checkout(installed):
    """Every module of the checkout is in the non-editable install (mapped folders included)."""
    mapping = {"edgekit": "edgekit", "exporters": "edgekit/exporters", "targets": "edgekit/targets",
               "device_tests": "edgekit/device_tests", "docker": "edgekit/docker"}
    for src, dst in mapping.items():
        for f in (ROOT / src).glob("**/*.py"):
            rel = f.relative_to(ROOT / src)
            if src == "edgekit" and rel.parts[0] in mapping.values():
                continue
            assert (installed / dst / rel).is_file(), f"{src}/{rel} missing from the installed package"
