from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
images:
  agent-jetson   device agent on L4T/JetPack with trtexec   (Jetson targets)
  agent-cpu      device agent with ONNX Runtime + llama.cpp (Raspberry Pi, arm64/x86 boards)
  workstation    the whole toolchain on x86-64              (android-arm64: the .pte is built here)
Containers run the agent as a non-root user (uid 10001); mount the token file at /run/edgekit/token.

examples:
  edgekit docker build --target jetson-orin --print
  edgekit docker build --target raspberry-pi-5 -o ctx/rpi5 --tag me/edgekit-agent:rpi5
"""


def register(sub) -> None:
    p = sub.add_parser("docker", help="render (and build) the Docker image for a target",
                       description="Write a Docker build context for a target and run, or print, the "
                       "`docker buildx build --platform ...` command for it.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["build"])
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--image", help="override the image chosen for the target")
    p.add_argument("-o", "--out", type=Path, help="build context folder (default: docker-build/TARGET-IMAGE)")
    p.add_argument("--tag", help="image tag (default: edgekit-IMAGE:TARGET-VERSION)")
    p.add_argument("--wheel", type=Path, help="edgekit wheel to install (default: built from this checkout)")
    p.add_argument("--print", dest="print_only", action="store_true", help="write the context, print the command")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    from dataclasses import asdict

    from edgekit.images import image_for, render, run as docker_run
    from edgekit.target import get_target
    from edgekit.ui import print_json

    target = get_target(a.target)
    image = a.image or image_for(target)
    out = a.out or Path("docker-build") / f"{target.name}-{image}"
    build = render(target, out, image=image, tag=a.tag, wheel=a.wheel)
    if a.json:
        print_json(asdict(build))
    else:
        print(f"# context: {build.context} ({build.image} for {build.target}, {build.platform})")
        print(build.shell())
    if not a.print_only:
        docker_run(build)
    return 0
