"""edgekit.bench(): measure a model with its own runtime in a fresh process. `edgekit bench` is argparse around this
function (and, with --device, around the agent client)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

from edgekit.api.common import api_function, as_path, console
from edgekit.api.results import BenchResult

_RANGES = {"repetitions": (1, 100_000), "warmup": (0, 1000), "seconds": (0, 86400), "max_seconds": (1e-3, 86400),
           "threads": (1, 1024)}


@api_function("bench")
def bench(model: str | Path, *, prompt_tokens: int | Iterable[int] | str | None = None,
          new_tokens: int | Iterable[int] | str | None = None, repetitions: int | None = None,
          warmup: int | None = None, seconds: float | None = None, max_seconds: float | None = None,
          threads: int | None = None, out: str | Path | None = None, reference: str | Path | None = None,
          precision: str | None = None, verbose: bool = False) -> BenchResult:
    """Benchmark `model` on this machine: an artifact folder (has artifact.json) or a plain .gguf, .onnx (with KV
    cache) or .pte file. Every (prompt_tokens, new_tokens) pair is one point (ints or lists, like -p/-n); each runs
    at least `repetitions` times and `seconds` long (defaults: runtime.bench.BenchConfig, llama-bench's).
    With `reference` (a reference.npz) the model is gated first (GateFailed on failure); `precision` picks whose
    thresholds. `out`: a folder that receives bench.json, bench.csv and bench.md. Returns a BenchResult."""
    from edgekit.commands import check_numbers
    from edgekit.errors import EdgekitError, GateFailed
    from edgekit.runtime import read_model
    from edgekit.runtime.bench import BenchConfig, bench_artifact, gate

    d = BenchConfig()
    knobs = SimpleNamespace(repetitions=d.min_runs if repetitions is None else repetitions,
                            warmup=d.warmup if warmup is None else warmup,
                            seconds=d.min_seconds if seconds is None else seconds,
                            max_seconds=d.max_seconds if max_seconds is None else max_seconds, threads=threads)
    check_numbers(knobs, _RANGES)
    model, out, reference = as_path(model), as_path(out), as_path(reference)
    with console(verbose):
        points, notes, cfg = prepare(model, prompt_tokens, new_tokens, knobs)
        g = None
        if reference:
            g = gate(model, reference, precision, threads=threads)
            if not g["passed"]:
                raise GateFailed(f"{model} fails the {g['precision']} gate against {reference}: "
                                 f"{'; '.join(g['failures'])}", "pass --precision for looser thresholds, or fix the "
                                 "model")
        elif precision:
            raise EdgekitError("--precision chooses gate thresholds and needs --reference",
                               "add --reference path/to/reference.npz, or drop --precision")
        report = bench_artifact(model, cfg, points=points if len(points) > 1 else None, reference=reference,
                                timeout=len(points) * (cfg.max_seconds + 120) + 60)
        report["size_bytes"] = model_size(model, read_model(model))
        report["notes"] = notes
        if g:
            report["gate"] = {k: v for k, v in g.items() if k != "thresholds"} | {"thresholds": g["thresholds"]}
        write_outputs(out, report)
    return BenchResult.from_report(report)


def prepare(model: Path, prompt_tokens, new_tokens, knobs) -> tuple[list, list[str], object]:
    """(points, notes, BenchConfig of the first point) for `model`, refused in one line before a process starts."""
    from edgekit.runtime import read_model
    from edgekit.runtime.bench import BenchConfig, fit_points, sweep

    d = BenchConfig()
    prompts, fixed_p = _int_list(prompt_tokens, "prompt_tokens", d.prompt_tokens)
    news, fixed_n = _int_list(new_tokens, "new_tokens", d.new_tokens)
    meta = read_model(model)  # a clear error before a subprocess is spent
    limit = meta.get("max_context") or (meta.get("model") or {}).get("max_position_embeddings")
    points, notes = fit_points(sweep(prompts, news), limit, fixed_p, fixed_n)
    cfg = BenchConfig(prompt_tokens=points[0][0], new_tokens=points[0][1], warmup=knobs.warmup,
                      min_runs=knobs.repetitions, min_seconds=knobs.seconds,
                      max_seconds=max(knobs.max_seconds, knobs.seconds), threads=knobs.threads)
    return points, notes, cfg


def _int_list(value, dest: str, default: int) -> tuple[list[int], bool]:
    """-p/-n as ints (a comma list, an int or a list of them), each finite and >= 1 (one-line refusal otherwise);
    (values, given?)."""
    from edgekit.commands import check_numbers
    from edgekit.errors import EdgekitError

    if value is None:
        return [default], False
    text = value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else \
        ",".join(str(v) for v in value)
    flag = "--" + dest.replace("_", "-")
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise EdgekitError(f"{flag} {text!r} is not a comma list of integers", f"pass e.g. {flag} 128,512")
    for v in values:
        check_numbers(SimpleNamespace(**{dest: v}), {dest: (1, 1 << 20)})
        if v != int(v):
            raise EdgekitError(f"{flag} {v:g} is not a usable value", f"pass whole numbers to {flag}")
    return list(dict.fromkeys(int(v) for v in values)), True


def model_size(path: Path, meta: dict) -> int:
    """Bytes on disk of what the runtime loads: the file, or an artifact's listed files (the reference excluded)."""
    if Path(path).is_file():
        return Path(path).stat().st_size
    files = [Path(path) / n for n in meta.get("files", {}) if n != "reference.npz"]
    return sum(f.stat().st_size for f in files if f.is_file())


def write_outputs(out: Path | None, report: dict) -> None:
    if out is None:
        return
    from edgekit.api.results import to_csv, to_markdown
    from edgekit.errors import EdgekitError
    from edgekit.fsutil import atomic_write_json, atomic_write_text

    if out.exists() and not out.is_dir():
        raise EdgekitError(f"-o {out} is a file", "pass a folder to -o (bench.json, bench.csv, bench.md go there)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.csv", to_csv(report))
    atomic_write_text(out / "bench.md", to_markdown(report))
