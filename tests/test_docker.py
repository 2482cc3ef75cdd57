"""Docker build contexts and commands per target; every Dockerfile passes hadolint (a real linter)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgekit.images import IMAGES, image_for, render
from edgekit.target import builtin_targets, get_target

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).parent / "hadolint"


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--config", str(ROOT / "docker" / ".hadolint.yaml"), str(path)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_templates_pass_hadolint(image):
    r = lint(ROOT / "docker" / f"{image}.Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp && pip install numpy\n")
    r = lint(bad)
    assert r.returncode != 0 and "DL3007" in r.stdout  # :latest is flagged


def test_image_choice_per_target():
    ts = builtin_targets()
    assert image_for(ts["jetson-orin-nano-8gb"]) == image_for(ts["jetson-nano-4gb"]) == "agent-jetson"
    assert image_for(ts["raspberry-pi-5-8gb"]) == image_for(ts["x86-cpu"]) == "agent-cpu"
    assert image_for(ts["android-arm64"]) == "workstation"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, cli=None):
    """The edgekit wheel the CLI builds into the first context."""
    out = tmp_path_factory.mktemp("ctx") / "jetson"
    p = subprocess.run([sys.executable, "-m", "edgekit", "docker", "build", "--target", "jetson-orin", "-o", str(out),
                        "--print", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    build = json.loads(p.stdout)
    wheels = list((out / "wheels").glob("edgekit-*.whl"))
    assert len(wheels) == 1
    return wheels[0], out, build


def test_cli_context_for_jetson(wheel):
    whl, out, build = wheel
    assert build["platform"] == "linux/arm64" and build["base_image"] == "nvcr.io/nvidia/l4t-jetpack:r36.4.0"
    cmd = build["command"]
    assert cmd[:3] == ["docker", "buildx", "build"] and cmd[cmd.index("--platform") + 1] == "linux/arm64"
    assert f"BASE_IMAGE={build['base_image']}" in cmd and cmd[-1] == str(out.resolve())
    assert json.loads((out / "build.json").read_text()) == build
    names = zipfile.ZipFile(whl).namelist()
    assert "edgekit/targets/jetson-orin-nano-8gb.toml" in names and "edgekit/exporters/__init__.py" in names
    assert lint(out / "Dockerfile").returncode == 0


@pytest.mark.parametrize("name", sorted(builtin_targets()))
def test_every_target_renders_a_linted_non_root_context(wheel, tmp_path, name):
    t = get_target(name)
    b = render(t, tmp_path / name, wheel=wheel[0])
    df = (tmp_path / name / "Dockerfile").read_text()
    assert b.platform == ("linux/amd64" if b.image == "workstation" else t.docker.platform)
    assert "USER 10001" in df and "useradd" in df  # the agent never runs as root
    assert (tmp_path / name / "wheels" / wheel[0].name).is_file()
    r = lint(tmp_path / name / "Dockerfile")
    assert r.returncode == 0, r.stdout


def test_no_docker_engine_is_a_clear_error(wheel, tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgekit", "docker", "build", "--target", "rpi5", "-o",
                        str(tmp_path / "c"), "--wheel", str(wheel[0])], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2
    assert p.stderr.startswith("edgekit: error: docker") and "(fix: " in p.stderr
    assert (tmp_path / "c" / "Dockerfile").is_file()  # the context is kept for a machine that has Docker
