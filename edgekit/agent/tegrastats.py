"""tegrastats (Jetson): parse its one-line samples tolerantly and sample it in the background.

Field names differ between boards and releases (Nano: `POM_5V_IN 2004/2004`, `GR3D_FREQ 0%@921`; Orin Nano:
`VDD_IN 4541mW/4541mW`, `GR3D_FREQ 0%`; AGX Orin: `GR3D_FREQ 0%@[0,0]`, `VDD_GPU_SOC 2412mW/2412mW`), so the parser
reads what it recognises and ignores the rest rather than failing. RAM includes GPU memory (one shared pool).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

_UNIT_MB = {"kB": 1 / 1024, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
_RAM = re.compile(r"\bRAM (\d+)/(\d+)(kB|KB|MB|GB)")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)(kB|KB|MB|GB)")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}
_INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")  # the board's total input, where the board reports one


def input_power_mw(rec: dict) -> int | None:
    rails = rec.get("power_mw", {})
    return next((rails[k] for k in _INPUT_RAILS if k in rails), None)


def parse_line(line: str) -> dict | None:
    """One tegrastats line -> {ram_used_mb, ram_total_mb, swap_used_mb, swap_total_mb, cpu_load [%|None per core],
    gpu_load_pct, emc_load_pct, temps_c {name: C}, power_mw {rail: instant mW}}; None when it has no RAM field."""
    m = _RAM.search(line)
    if not m:
        return None
    unit = _UNIT_MB[m.group(3)]
    out: dict = {"ram_used_mb": round(int(m.group(1)) * unit, 2), "ram_total_mb": round(int(m.group(2)) * unit, 2)}
    if s := _SWAP.search(line):
        u = _UNIT_MB[s.group(3)]
        out["swap_used_mb"], out["swap_total_mb"] = round(int(s.group(1)) * u, 2), round(int(s.group(2)) * u, 2)
    if c := _CPU.search(line):
        loads = []
        for core in c.group(1).split(","):
            pm = re.match(r"\s*(\d+)%", core)
            loads.append(int(pm.group(1)) if pm else None)  # "off" cores
        out["cpu_load"] = loads
    if g := _GR3D.search(line):
        out["gpu_load_pct"] = int(g.group(1))
    if e := _EMC.search(line):
        out["emc_load_pct"] = int(e.group(1))
    temps = {n: float(v) for n, v in _TEMP.findall(line)}
    if temps:
        out["temps_c"] = temps
    rails = {n: int(cur) for n, cur, _avg in _RAIL.findall(line) if n not in _NOT_RAILS}
    if rails:
        out["power_mw"] = rails
    return out


def available() -> bool:
    return shutil.which("tegrastats") is not None


class TegrastatsSampler:
    """Runs `tegrastats --interval MS` while the block runs; `summary()` gives peaks and a timeline."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, dict]] = []
        self.proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self):
        exe = shutil.which("tegrastats")
        if exe:
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            rec = parse_line(line)
            if rec:
                self.samples.append((round(time.perf_counter() - self.t0, 3), rec))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._thread.join(timeout=5)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        recs = [r for _, r in self.samples]
        first = recs[0]
        out = {"samples": len(recs),
               "peak_ram_used_mb": max(r["ram_used_mb"] for r in recs),
               "ram_total_mb": first["ram_total_mb"]}
        if "swap_used_mb" in first:
            out["swap_growth_mb"] = round(max(0.0, max(r.get("swap_used_mb", 0) for r in recs)
                                              - first["swap_used_mb"]), 2)
        gpu = [r["gpu_load_pct"] for r in recs if "gpu_load_pct" in r]
        if gpu:
            out["gpu_load_pct"] = {"max": max(gpu), "mean": round(sum(gpu) / len(gpu), 1)}
        rails = sorted({k for r in recs for k in r.get("power_mw", {})})
        out["power_mw"] = {k: {"max": max(r["power_mw"].get(k, 0) for r in recs if "power_mw" in r),
                               "mean": round(sum(r["power_mw"].get(k, 0) for r in recs if "power_mw" in r)
                                             / max(1, sum("power_mw" in r for r in recs)), 1)} for k in rails}
        step = max(1, len(self.samples) // 200)
        out["timeline"] = [[t, r["ram_used_mb"], r.get("swap_used_mb"), r.get("gpu_load_pct"),
                            input_power_mw(r)] for t, r in self.samples[::step]]
        out["timeline_columns"] = ["t_s", "ram_used_mb", "swap_used_mb", "gpu_load_pct", "power_in_mw"]
        return out
