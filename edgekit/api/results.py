"""The typed results of edgekit's Python API (frozen dataclasses, torch-free).

Each result keeps the JSON record it was read from (`to_dict()`): the build manifest, the artifact's artifact.json,
the prune report, the bench report. The CLI's `--json` prints exactly that dict, and every typed field is read from
it here, so the API and the JSON cannot disagree.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path


def _plain(record: dict) -> dict:
    """A record as its JSON reads back (tuples become lists, paths strings): what --json prints, the files hold."""
    return json.loads(json.dumps(record, default=str))


@dataclass(frozen=True)
class GateResult:
    """The fidelity gate: the artifact against PyTorch on held-out text (edgekit/verify.py)."""

    passed: bool
    overridden: bool  # failed, but kept by accept_gate_failure
    max_abs_logit_delta: float
    top1_agreement: float
    mean_kl: float
    greedy_match: bool
    failures: tuple[str, ...]
    metrics: dict = field(repr=False)  # the whole gate record (thresholds, runtime, divergence, ...)

    @classmethod
    def from_dict(cls, g: dict) -> "GateResult":
        return cls(passed=bool(g["passed"]), overridden=bool(g.get("overridden", False)),
                   max_abs_logit_delta=g["max_abs_logit_delta"], top1_agreement=g["top1_agreement"],
                   mean_kl=g["mean_kl"], greedy_match=bool(g["greedy_match"]),
                   failures=tuple(g.get("failures") or ()), metrics=g)


@dataclass(frozen=True)
class BenchPoint:
    """One measured (prompt, new tokens) point: throughput as mean and sample sd over the repetitions."""

    prompt_tokens: int
    new_tokens: int
    runs: int
    duration_s: float
    valid: bool
    invalid_reason: str | None
    prefill_tokens_per_s: float
    prefill_tokens_per_s_sd: float
    decode_tokens_per_s: float
    decode_tokens_per_s_sd: float
    ttft_p50_ms: float
    decode_p50_ms: float
    decode_p90_ms: float
    decode_p99_ms: float


def point_records(report: dict) -> list[dict]:
    """One flat record per (prompt, new) point of a bench report (the columns of `edgekit bench --format csv`)."""
    out = []
    for r in report.get("results") or [report]:
        lat = r["decode_latency_ms"]
        out.append({"model": report.get("model"), "backend": report["backend"], "precision": report["precision"],
                    "size_bytes": report.get("size_bytes"), "threads": report["config"].get("threads"),
                    **{k: r.get(k) for k in ("prompt_tokens", "new_tokens", "runs", "duration_s", "valid",
                                             "prefill_tokens_per_s", "prefill_tokens_per_s_sd",
                                             "decode_tokens_per_s", "decode_tokens_per_s_sd", "invalid_reason")},
                    "ttft_p50_ms": r["ttft_ms"]["p50"], "decode_p50_ms": lat["p50"], "decode_p90_ms": lat["p90"],
                    "decode_p99_ms": lat["p99"], "load_s": report["load_s"], "peak_rss_mb": report["peak_rss_mb"]})
    return out


_POINT_FIELDS = tuple(BenchPoint.__dataclass_fields__)


CSV_COLUMNS = ("model", "backend", "precision", "size_bytes", "threads", "prompt_tokens", "new_tokens", "runs",
               "duration_s", "valid", "prefill_tokens_per_s", "prefill_tokens_per_s_sd", "decode_tokens_per_s",
               "decode_tokens_per_s_sd", "ttft_p50_ms", "decode_p50_ms", "decode_p90_ms", "decode_p99_ms", "load_s",
               "peak_rss_mb", "invalid_reason")


def to_csv(report: dict) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(point_records(report))
    return buf.getvalue()


def to_markdown(report: dict) -> str:
    """llama-bench's layout: one row per point, throughput as mean ± sd over the repetitions."""
    size = report.get("size_bytes")
    head = ("| model | size | backend | precision | threads | prompt | new | prefill t/s | decode t/s | ttft p50 ms "
            "| runs | valid |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in point_records(report):
        lines.append("| " + " | ".join(str(x) for x in (
            Path(str(r["model"])).name, f"{size / 2**20:.1f} MiB" if size else "?", r["backend"], r["precision"],
            r["threads"] or "default", r["prompt_tokens"], r["new_tokens"],
            f"{r['prefill_tokens_per_s']:.2f} ± {r['prefill_tokens_per_s_sd']:.2f}",
            f"{r['decode_tokens_per_s']:.2f} ± {r['decode_tokens_per_s_sd']:.2f}", f"{r['ttft_p50_ms']:.2f}",
            r["runs"], "yes" if r["valid"] else "NO")) + " |")
    notes = [f"peak RSS {report['peak_rss_mb']:.0f} MB, load {report['load_s']:.3f} s, prompt: "
             f"{report.get('prompt_source', 'reference text')}"] + list(report.get("notes") or [])
    if report.get("gate"):
        g = report["gate"]
        notes.append(f"gate ({g['precision']}): {'passed' if g['passed'] else 'FAILED'}, top-1 "
                     f"{g['top1_agreement']:.3f}, mean KL {g['mean_kl']:.3g}")
    if not report["valid"]:
        notes.append(f"INVALID: {report['invalid_reason']} (rule: {report.get('validity_rule')})")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"




@dataclass(frozen=True)
class BenchResult:
    """`edgekit.bench(...)`: measured in a fresh process by the artifact's own runtime."""

    model: Path
    backend: str
    precision: str
    size_bytes: int | None
    valid: bool  # every point met the validity rule (enough runs, long enough)
    points: tuple[BenchPoint, ...]
    load_s: float
    peak_rss_mb: float
    gate: GateResult | None  # only when a reference was given
    notes: tuple[str, ...]
    report: dict = field(repr=False)

    @property
    def decode_tokens_per_s(self) -> float:
        """The first point's decode throughput (mean over the repetitions)."""
        return self.points[0].decode_tokens_per_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.points[0].prefill_tokens_per_s

    @classmethod
    def from_report(cls, report: dict) -> "BenchResult":
        report = _plain(report)
        points = tuple(BenchPoint(**{k: r[k] for k in _POINT_FIELDS}) for r in point_records(report))
        g = report.get("gate")
        return cls(model=Path(report["model"]), backend=report["backend"], precision=report["precision"],
                   size_bytes=report.get("size_bytes"), valid=bool(report["valid"]), points=points,
                   load_s=report["load_s"], peak_rss_mb=report["peak_rss_mb"],
                   gate=GateResult.from_dict(g) if g else None, notes=tuple(report.get("notes") or ()),
                   report=report)

    def to_dict(self) -> dict:
        """The bench report, as `edgekit bench --json` prints it and bench.json holds it."""
        return copy.deepcopy(self.report)

    def to_csv(self) -> str:
        """One row per point (`edgekit bench --format csv`, bench.csv)."""
        return to_csv(self.report)

    def to_markdown(self) -> str:
        """llama-bench's Markdown table (`edgekit bench --format md`, bench.md)."""
        return to_markdown(self.report)


@dataclass(frozen=True)
class ExportResult:
    """`edgekit.export(...)`: one gated artifact folder."""

    artifact: Path  # the folder (artifact.json, reference.npz and the backend's files)
    backend: str
    precision: str
    max_context: int
    files: tuple[str, ...]
    gate: GateResult
    meta: dict = field(repr=False)  # artifact.json

    @classmethod
    def from_meta(cls, artifact: Path, meta: dict) -> "ExportResult":
        meta = _plain(meta)
        return cls(artifact=Path(artifact), backend=meta["backend"], precision=meta["precision"],
                   max_context=meta["max_context"], files=tuple(meta.get("files") or ()),
                   gate=GateResult.from_dict(meta["gate"]), meta=meta)

    def to_dict(self) -> dict:
        """artifact.json, as `edgekit export --json` prints it."""
        return copy.deepcopy(self.meta)


@dataclass(frozen=True)
class LayerWidths:
    """One decoder layer's widths after pruning."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class PruneResult:
    """`edgekit.prune(...)`: a plain Hugging Face folder (`from_pretrained` loads it) and its report."""

    out_dir: Path
    arch: str
    uniform: bool
    params_before: int
    params_after: int
    removed_fraction: float
    hidden_size: int  # after pruning
    widths: tuple[LayerWidths, ...]  # per layer, after pruning
    dense_loss: float  # calibration loss on held-out calibration windows, before and after
    pruned_loss: float
    report: dict = field(repr=False)  # edgekit-prune.json

    @classmethod
    def from_report(cls, out_dir: Path, report: dict) -> "PruneResult":
        report = _plain(report)
        widths = tuple(LayerWidths(intermediate_size=l["intermediate"][1], num_attention_heads=l["heads"][1],
                                   num_key_value_heads=l["kv_heads"][1]) for l in report["layers"])
        return cls(out_dir=Path(out_dir), arch=report["arch"], uniform=bool(report["uniform"]),
                   params_before=report["params_before"], params_after=report["params_after"],
                   removed_fraction=report["removed_fraction"], hidden_size=report["hidden_size"]["after"],
                   widths=widths, dense_loss=report["dense_search_loss"], pruned_loss=report["pruned_search_loss"],
                   report=report)

    def to_dict(self) -> dict:
        """The prune report, as `edgekit prune --json` prints it and edgekit-prune.json holds it."""
        return copy.deepcopy(self.report)


@dataclass(frozen=True)
class StagePlan:
    stage: str
    action: str  # what it would do, or "skip (unchanged)"
    fingerprint: str  # its first 12 hex digits


@dataclass(frozen=True)
class BuildPlan:
    """`edgekit.build(..., dry_run=True)`: what each stage would do; nothing is written."""

    build_dir: Path
    target: str
    model: Path
    model_source: str  # what was asked for (a path, or the embedded default's name)
    backend: str
    precision: str
    context_length: int
    stages: tuple[StagePlan, ...]

    def to_dict(self) -> dict:
        """As `edgekit build --dry-run --json` prints it."""
        return {"dry_run": True, "build_dir": str(self.build_dir), "target": self.target, "model": str(self.model),
                "resolved": {"backend": self.backend, "precision": self.precision,
                             "context_length": self.context_length},
                "stages": [{"stage": s.stage, "action": s.action, "fingerprint": s.fingerprint} for s in self.stages]}


@dataclass(frozen=True)
class BuildResult:
    """`edgekit.build(...)`: the build directory, its verified artifact and the manifest recording every stage."""

    out_dir: Path
    artifact: Path | None
    backend: str
    precision: str
    context_length: int
    gate: GateResult | None  # the verify stage's gate (else the export's)
    bench: dict | None = field(repr=False)  # the host benchmark's headline figures (None with bench=False)
    report: Path | None  # report.html
    manifest: dict = field(repr=False)  # manifest.json

    @property
    def passed(self) -> bool:
        """The artifact passed its fidelity gate (not merely kept by accept_gate_failure)."""
        return bool(self.gate and self.gate.passed)

    @classmethod
    def from_manifest(cls, out_dir: Path, manifest: dict) -> "BuildResult":
        manifest = _plain(manifest)
        st = manifest.get("stages", {})
        g = (st.get("verify", {}).get("result") or st.get("export", {}).get("result", {}).get("gate") or {})
        if "passed" in g and "overridden" not in g:  # the verify stage's record: a build that failed it was kept
            g = {**g, "overridden": not g["passed"]}  # only because accept_gate_failure was set
        b = st.get("bench", {}).get("result") or {}
        res = manifest["resolved"]
        return cls(out_dir=Path(out_dir), artifact=Path(manifest["artifact"]) if manifest.get("artifact") else None,
                   backend=res["backend"], precision=res["precision"], context_length=res["context_length"],
                   gate=GateResult.from_dict(g) if "passed" in g else None,
                   bench=b if b.get("decode_tokens_per_s") else None,
                   report=Path(manifest["report"]["html"]) if manifest.get("report") else None, manifest=manifest)

    def to_dict(self) -> dict:
        """manifest.json, as `edgekit build --json` prints it."""
        return copy.deepcopy(self.manifest)


@dataclass(frozen=True)
class MatrixRow:
    """One backend x precision on one device (`host` or an agent's host:port) of `edgekit.bench_matrix`."""

    id: str  # DEVICE:BACKEND/PRECISION
    device: str
    backend: str
    precision: str | None
    status: str  # "ok" | "gate-failed" | "error"
    error: str | None  # one line, for a row that could not be built, gated or benchmarked
    skipped: bool  # finished by an earlier run, read back
    size_bytes: int | None
    peak_rss_mb: float | None
    budget_mb: float | None
    fits: bool | None
    ttft_ms: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None  # mean over the runs
    decode_tps_p50: float | None  # 1000 / the median decode step latency
    decode_tps_p99: float | None  # 1000 / the 99th-percentile step latency (the slow tail)
    mean_kl: float | None
    top1_agreement: float | None
    perplexity_ratio: float | None  # perplexity on the gate text over PyTorch fp32's
    gate_passed: bool | None
    roofline_fraction: float | None
    artifact: Path | None
    record: dict = field(repr=False)

    @classmethod
    def from_dict(cls, r: dict) -> "MatrixRow":
        names = [f for f in cls.__dataclass_fields__ if f not in ("record", "artifact")]
        return cls(**{k: r.get(k) for k in names}, artifact=Path(r["artifact"]) if r.get("artifact") else None,
                   record=r)


@dataclass(frozen=True)
class MatrixResult:
    """`edgekit.bench_matrix(...)`: every row, the winner by `winner_rule`, and the table's files."""

    out_dir: Path
    target: str
    rows: tuple[MatrixRow, ...]
    winner: MatrixRow | None  # the first device's winner when devices ran, else the host's
    winners: dict  # {device: row id or None}
    winner_rule: str
    report: dict = field(repr=False)  # matrix.json

    @classmethod
    def from_dict(cls, data: dict) -> "MatrixResult":
        data = _plain(data)
        rows = tuple(MatrixRow.from_dict(r) for r in data["rows"])
        win = next((r for r in rows if r.id == data.get("winner")), None)
        return cls(out_dir=Path(data["out_dir"]), target=data["target"], rows=rows, winner=win,
                   winners=dict(data.get("winners") or {}), winner_rule=data["winner_rule"], report=data)

    def to_dict(self) -> dict:
        """matrix.json, as `edgekit bench --matrix --json` prints it."""
        return copy.deepcopy(self.report)
