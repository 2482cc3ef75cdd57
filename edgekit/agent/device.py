"""What the device is: CPU, RAM, swap, OS, runtime versions, and on a Jetson L4T / JetPack / TensorRT / GPU SM.

Read from the system (psutil, /proc, /etc, dpkg); every probe is optional, so a missing file means a missing key,
never a failure. `root` lets tests point the Jetson probes at a fake filesystem tree.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RUNTIME_PACKAGES = ("onnxruntime", "llama_cpp_python", "executorch", "numpy", "psutil", "tensorrt")
# Jetson module families -> CUDA compute capability (SM), by the device-tree model string.
_SM_BY_MODEL = (("orin", "8.7"), ("xavier", "7.2"), ("tx2", "6.2"), ("nano", "5.3"), ("tx1", "5.3"))
# L4T release -> JetPack, for boards where the nvidia-jetpack package is not installed.
_JETPACK_BY_L4T = (("36.4.3", "6.2"), ("36.4", "6.1"), ("36.3", "6.0"), ("35.6", "5.1.4"), ("35.5", "5.1.3"),
                   ("35.4", "5.1.2"), ("35.3", "5.1.1"), ("35.2", "5.1"), ("35.1", "5.0.2"), ("32.7", "4.6"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _dpkg_version(pkg: str) -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    try:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


def parse_l4t(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' -> '36.4.3'."""
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_for_l4t(l4t: str) -> str | None:
    return next((jp for prefix, jp in _JETPACK_BY_L4T if l4t == prefix or l4t.startswith(prefix + ".")), None)


def jetson_info(root: Path = Path("/")) -> dict | None:
    """L4T, JetPack, TensorRT, GPU SM on a Jetson; None elsewhere."""
    release = _read(root / "etc/nv_tegra_release")
    model = _read(root / "proc/device-tree/model")
    if release is None and not (model and "jetson" in model.lower()):
        return None
    info: dict = {"model": model}
    l4t = parse_l4t(release or "")
    info["l4t"] = l4t
    jp = _dpkg_version("nvidia-jetpack") if root == Path("/") else None
    info["jetpack"] = (jp.split("+")[0].split("-")[0] if jp else None) or (jetpack_for_l4t(l4t) if l4t else None)
    info["tensorrt"] = tensorrt_version(root)
    low = (model or "").lower()
    info["gpu_sm"] = next((sm for key, sm in _SM_BY_MODEL if key in low), None)
    info["tegrastats"] = shutil.which("tegrastats") is not None
    return info


def tensorrt_version(root: Path = Path("/")) -> str | None:
    """From the Python bindings, dpkg, or the libnvinfer file name; None when TensorRT is not installed."""
    try:
        return version("tensorrt")
    except PackageNotFoundError:
        pass
    if root == Path("/"):
        v = _dpkg_version("tensorrt") or _dpkg_version("libnvinfer-bin")
        if v:
            return v.split("-")[0].split("+")[0]
    for libdir in ("usr/lib/aarch64-linux-gnu", "usr/lib/x86_64-linux-gnu", "usr/local/tensorrt/lib"):
        d = root / libdir
        if d.is_dir():
            for f in sorted(d.glob("libnvinfer.so.*.*")):
                return f.name.split("libnvinfer.so.", 1)[1]
    return None


def device_info() -> dict:
    import psutil

    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    cpu_model = None
    cpuinfo = _read(Path("/proc/cpuinfo")) or ""
    for key in ("model name", "Model", "Hardware"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            cpu_model = m.group(1).strip()
            break
    osrel = _read(Path("/etc/os-release")) or ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', osrel, re.M)
    runtimes = {}
    for pkg in RUNTIME_PACKAGES:
        try:
            runtimes[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    from edgekit import __version__

    return {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "cpu": {"model": cpu_model, "cores_logical": psutil.cpu_count(), "cores_physical": psutil.cpu_count(False),
                "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
        "memory": {"ram_total_mb": round(vm.total / 2**20, 1), "ram_available_mb": round(vm.available / 2**20, 1),
                   "swap_total_mb": round(sw.total / 2**20, 1), "swap_used_mb": round(sw.used / 2**20, 1)},
        "os": {"name": m.group(1) if m else platform.system(), "kernel": platform.release()},
        "python": platform.python_version(),
        "edgekit": __version__,
        "runtimes": runtimes,
        "trtexec": shutil.which("trtexec") or _jetson_trtexec(),
        "jetson": jetson_info(),
    }


def _jetson_trtexec() -> str | None:
    p = Path("/usr/src/tensorrt/bin/trtexec")  # where JetPack installs it, off PATH
    return str(p) if p.is_file() else None
