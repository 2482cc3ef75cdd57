"""Docker images for devices and the workstation: one registry of images, rendered into a build context per target.

There is no Docker engine where edgekit is developed, so the rendered context and the exact `docker buildx build`
command are the product here; `edgekit docker build --print` shows them, and the Dockerfiles pass hadolint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_dir, atomic_write_json
from edgekit.target import Target

IMAGES = {
    "agent-jetson": "the device agent on L4T/JetPack with TensorRT's trtexec (Jetson targets)",
    "agent-cpu": "the device agent with ONNX Runtime and llama.cpp, no torch (Raspberry Pi, arm64/x86 boards)",
    "workstation": "the full edgekit toolchain on x86-64 (builds every backend, ExecuTorch .pte for phones)",
}


def image_for(target: Target) -> str:
    if target.build.backend == "tensorrt" or target.accelerator.kind == "cuda":
        return "agent-jetson"
    if target.build.backend == "executorch":  # phones run the .pte in an app, not a container
        return "workstation"
    return "agent-cpu"


@dataclass(frozen=True)
class DockerBuild:
    image: str
    target: str
    platform: str
    base_image: str
    tag: str
    context: str
    command: list[str]

    def shell(self) -> str:
        import shlex

        return " ".join(shlex.quote(c) for c in self.command)


def _source_root() -> Path | None:
    import edgekit

    root = Path(edgekit.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "exporters").is_dir() else None


def render(target: Target, out: Path, image: str | None = None, tag: str | None = None,
           wheel: Path | None = None) -> DockerBuild:
    """Write a complete build context at `out` (Dockerfile + wheels/ with edgekit's wheel + build.json)."""
    image = image or image_for(target)
    if image not in IMAGES:
        raise EdgekitError(f"unknown image {image!r}; known: {', '.join(IMAGES)}", "pass one of those to --image")
    platform = "linux/amd64" if image == "workstation" else target.docker.platform
    base = "python:3.11-slim-bookworm" if image == "workstation" else target.docker.base_image
    tag = tag or f"edgekit-{image}:{target.name}-{__version__}"
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "Dockerfile").write_text(resources.files("edgekit.docker").joinpath(f"{image}.Dockerfile").read_text())
        (tmp / "wheels").mkdir()
        if wheel:
            if not Path(wheel).is_file():
                raise EdgekitError(f"wheel not found: {wheel}", "pass the edgekit .whl to put in the image")
            shutil.copy(wheel, tmp / "wheels" / Path(wheel).name)
        else:
            src = _source_root()
            if src is None:
                raise EdgekitError("edgekit is not running from a source checkout, so it cannot build its own wheel",
                                   "pass --wheel path/to/edgekit-*.whl")
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", str(tmp / "wheels"), str(src)], capture_output=True, text=True)
            if r.returncode != 0:
                raise EdgekitError(f"building the edgekit wheel failed: {r.stderr.strip().splitlines()[-1:]}",
                                   "check that `pip wheel .` works in the checkout")
        final_ctx = out.resolve()
        cmd = ["docker", "buildx", "build", "--platform", platform, "--build-arg", f"BASE_IMAGE={base}",
               "--build-arg", f"EDGEKIT_VERSION={__version__}", "--tag", tag, "--file",
               str(final_ctx / "Dockerfile"), "--load", str(final_ctx)]
        build = DockerBuild(image=image, target=target.name, platform=platform, base_image=base, tag=tag,
                            context=str(final_ctx), command=cmd)
        atomic_write_json(tmp / "build.json", asdict(build))
    return build


def run(build: DockerBuild) -> None:
    if shutil.which("docker") is None:
        raise EdgekitError("docker is not installed on this machine", "use --print and run the command where "
                           "Docker with buildx is available")
    r = subprocess.run(build.command, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise EdgekitError(f"docker buildx build failed (exit {r.returncode}): {last[0]}",
                           "check that a Docker engine with buildx (and QEMU for other platforms) is running")
