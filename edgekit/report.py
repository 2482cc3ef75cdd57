"""The build report: report.json (schema-versioned, with an environment fingerprint), report.md to read in a terminal
or a pull request, and report.html, self-contained, with plots (latency distribution, memory over time, per-layer
widths, fidelity per stage). Regenerated at the end of every build from the manifest and the stage outputs."""

from __future__ import annotations

import html
import io
import json
import os
import platform
from pathlib import Path

from edgekit.fsutil import atomic_write_json, atomic_write_text, sha256_json

REPORT_SCHEMA = 1


def environment() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"os": f"{platform.system()} {platform.release()}", "machine": platform.machine(), "cpu": cpu,
           "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
           "python": platform.python_version()}
    return env


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _layer_widths(model_dir: Path | None) -> list[dict]:
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        return []
    cfg = _json(Path(model_dir) / "config.json")
    if cfg.get("edgekit_layer_widths"):
        return cfg["edgekit_layer_widths"]
    heads = cfg["num_attention_heads"]
    return [{"intermediate_size": cfg["intermediate_size"], "num_attention_heads": heads,
             "num_key_value_heads": cfg.get("num_key_value_heads") or heads}] * cfg["num_hidden_layers"]


def _hidden(src: Path | None, final: Path | None) -> list | None:
    """[hidden width before, after] when both configs are readable."""
    sizes = [_json(Path(d) / "config.json").get("hidden_size") if d and (Path(d) / "config.json").is_file() else None
             for d in (src, final)]
    return sizes if None not in sizes else None


def collect(build_dir: Path, manifest: dict) -> dict:
    """Everything the report shows, as one JSON-able dict."""
    build_dir = Path(build_dir)
    stages = manifest.get("stages", {})
    outputs = {name: build_dir / rec["output"] for name, rec in stages.items() if rec.get("output")}
    bench = _json(outputs["bench"] / "bench.json") if "bench" in outputs else {}
    final_model = None
    for name, rec in stages.items():
        if rec.get("model_dir") and name in outputs:
            final_model = outputs[name] / rec["model_dir"]
    fidelity = []
    for name, rec in stages.items():
        res = rec.get("result") or {}
        gate = res.get("gate") if isinstance(res.get("gate"), dict) else (res if "top1_agreement" in res else None)
        entry = {"stage": name}
        if gate:
            entry.update({k: gate.get(k) for k in ("top1_agreement", "mean_kl", "max_abs_logit_delta",
                                                    "greedy_match", "passed")})
        for k in ("heldout_ppl", "perplexity", "ppl_before", "ppl_after"):
            if k in res:
                entry[k] = res[k]
        if len(entry) > 1:
            fidelity.append(entry)
    devices = [_json(p) for p in sorted(build_dir.glob("**/device-report-*.json"))]
    src = Path(manifest["model"]["path"]) if manifest.get("model") else None
    env = environment()
    return {
        "schema": REPORT_SCHEMA,
        "edgekit_version": manifest.get("edgekit_version"),
        "environment": env,
        "environment_fingerprint": sha256_json({"env": env, "versions": manifest.get("versions", {})})[:16],
        "versions": manifest.get("versions", {}),
        "target": (manifest.get("target") or {}).get("name"),
        "model": manifest.get("model"),
        "resolved": manifest.get("resolved"),
        "artifact": manifest.get("artifact"),
        "status": manifest.get("status", "incomplete"),
        "stages": {n: {k: r.get(k) for k in ("status", "seconds", "skipped_last_run")} for n, r in stages.items()},
        "plan": (stages.get("plan") or {}).get("result"),
        "fidelity": fidelity,
        "bench": {k: v for k, v in bench.items() if k not in ("memory_timeline", "decode_latency_samples_ms")},
        "latency_samples_ms": bench.get("decode_latency_samples_ms", []),
        "memory_timeline": bench.get("memory_timeline", []),
        "layer_widths": {"before": _layer_widths(src), "after": _layer_widths(final_model) if final_model else [],
                         "hidden": _hidden(src, final_model)},
        "device_reports": devices,
    }


# ---------------------------------------------------------------- plots (inline SVG, so the HTML stands alone)

def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def widths_svg(before: list[dict], after: list[dict], predicted: list[dict] | None = None,
               hidden: tuple[int, int] | None = None) -> str | None:
    """Per-layer MLP width, query heads and KV groups, original (grey) under pruned (blue); the hidden width
    (before, after) in the title; the non-uniform allocation's predicted loss per layer as a third panel when given.
    None without layers or matplotlib."""
    if not before:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, axes = plt.subplots(1, 3 if predicted else 2, figsize=(12 if predicted else 8, 3.4))
    xs = list(range(len(before)))
    for ax, (key, title) in zip(axes, [("intermediate_size", "MLP width"), ("num_attention_heads", "attention")]):
        name = "query heads, " if key == "num_attention_heads" else ""
        ax.bar(xs, [w[key] for w in before], color="#bbbbbb", label=f"{name}original")
        if after:
            ax.bar(xs, [w[key] for w in after], color="#4477aa", width=0.6, label=f"{name}pruned")
        if key == "num_attention_heads":  # KV groups: where a whole group (with its query heads) went
            ax.plot(xs, [w["num_key_value_heads"] for w in before], "_", color="#555555", ms=10, mew=2,
                    label="KV groups, original")
            if after:
                ax.plot(xs, [w["num_key_value_heads"] for w in after], "o", color="#ee6677", ms=3,
                        label="KV groups, pruned")
        ax.set(xlabel="layer", title=title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    if predicted:
        ax = axes[2]
        mlp = [p["mlp"] for p in predicted]
        ax.bar(xs, mlp, color="#4477aa", label="MLP")
        ax.bar(xs, [p["attention"] for p in predicted], bottom=mlp, color="#ee6677", label="attention")
        ax.set(xlabel="layer", ylabel="nats", title="predicted loss increase")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    title = "Per-layer widths after pruning"
    if hidden:
        title += f" (hidden width {hidden[0]} -> {hidden[1]})" if hidden[0] != hidden[1] else \
            f" (hidden width {hidden[0]}, kept)"
    fig.subplots_adjust(wspace=0.3)
    fig.suptitle(title, y=1.02)
    return _svg(fig)


def plots(data: dict) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return {}
    out = {}
    lat = data["latency_samples_ms"]
    if lat:
        fig, ax = plt.subplots(figsize=(6, 3))
        import numpy as np

        hi = float(np.percentile(lat, 99.5)) * 1.2  # a few scheduler hiccups would squash the histogram
        ax.hist([x for x in lat if x <= hi], bins=40, color="#4477aa")
        b = data["bench"].get("decode_latency_ms", {})
        for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            if q in b:
                ax.axvline(b[q], color="#cc3311", linestyle=style, label=f"{q} {b[q]:.2f} ms")
        ax.set(xlabel="decode step latency (ms)", ylabel="steps", title="Decode latency distribution")
        ax.legend()
        out["latency"] = _svg(fig)
    mem = [m for m in data["memory_timeline"] if m[1] > 0]  # the last sample can catch the exiting process
    if mem:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([m[0] for m in mem], [m[1] for m in mem], color="#228833", label="RSS")
        if any(m[2] for m in mem):
            ax.plot([m[0] for m in mem], [m[2] for m in mem], color="#ee6677", label="swap growth")
        ax.set(xlabel="time (s)", ylabel="MB", title="Memory over the benchmark")
        ax.legend()
        out["memory"] = _svg(fig)
    widths = widths_svg(data["layer_widths"]["before"], data["layer_widths"]["after"],
                        hidden=data["layer_widths"].get("hidden"))
    if widths:
        out["widths"] = widths
    fid = [f for f in data["fidelity"] if f.get("top1_agreement") is not None]
    if fid:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([f["stage"] for f in fid], [f["top1_agreement"] for f in fid], color="#66ccee")
        for i, f in enumerate(fid):
            ax.text(i, f["top1_agreement"], f"KL {f['mean_kl']:.2g}", ha="center", va="bottom", fontsize=8)
        ax.set(ylim=(0, 1.1), ylabel="top-1 agreement with PyTorch", title="Fidelity per stage")
        out["fidelity"] = _svg(fig)
    return out


# ---------------------------------------------------------------- markdown and HTML

def _rows(data: dict) -> list[tuple[str, list[tuple]]]:
    """(section title, rows of (name, value)) shared by the Markdown and the HTML."""
    gib = 2**30
    sections = [("Build", [("target", data["target"]), ("model", (data["model"] or {}).get("source")),
                           ("backend / precision", "{backend} / {precision}".format(**(data["resolved"] or
                                                                                       {"backend": "?",
                                                                                        "precision": "?"}))),
                           ("artifact", data["artifact"]), ("status", data["status"]),
                           ("environment", f"{data['environment']['cpu']}, {data['environment']['cores']} cores, "
                                           f"{data['environment']['ram_gb']} GB "
                                           f"(fingerprint {data['environment_fingerprint']})")])]
    sections.append(("Stages", [(n, f"{s['status']}" + (f", {s['seconds']:.1f} s" if s.get("seconds") else "") +
                                 (", skipped (unchanged)" if s.get("skipped_last_run") else ""))
                                for n, s in data["stages"].items()]))
    p = data.get("plan") or {}
    if p.get("chosen"):
        c = p["chosen"]
        sections.append(("Plan", [("choice", f"{p['precision']}" + (f" + prune {p['prune_ratio']:.0%}"
                                                                     if p["prune_ratio"] else "")),
                                  ("why", p.get("reason")),
                                  ("weights / KV / activations / runtime",
                                   " / ".join(f"{c[k] / gib:.3f} GiB" for k in ("weights_bytes", "kv_cache_bytes",
                                                                                "activations_bytes",
                                                                                "runtime_overhead_bytes"))),
                                  ("total vs budget", f"{c['total_bytes'] / gib:.3f} of {p['budget_bytes'] / gib:.2f} GiB"),
                                  ("decode estimate", f"{c['decode_tps_estimate']} tokens/s")]))
    for f in data["fidelity"]:
        rows = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in f.items() if k != "stage"]
        sections.append((f"Fidelity: {f['stage']}", rows))
    b = data["bench"]
    if b.get("decode_tokens_per_s"):
        lat = b["decode_latency_ms"]
        sections.append(("Host benchmark", [
            ("load", f"{b['load_s']:.3f} s"), ("time to first token p50", f"{b['ttft_ms']['p50']:.2f} ms"),
            ("prefill", f"{b['prefill_tokens_per_s']:.1f} tokens/s"),
            ("decode", f"{b['decode_tokens_per_s']:.1f} tokens/s"),
            ("decode latency p50 / p90 / p99", f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} ms"),
            ("peak RSS", f"{b.get('peak_rss_mb', 0):.0f} MB"), ("swap growth", f"{b.get('swap_growth_mb', 0):.0f} MB"),
            ("valid", b.get("valid"))]))
    for d in data["device_reports"]:
        dev, b, tests = d.get("device") or {}, d.get("bench") or {}, d.get("device_tests") or {}
        rows = [("device", f"{dev.get('hostname', '?')} ({dev.get('machine', '?')})"), ("job", d.get("job")),
                ("device_tests", "passed" if tests.get("passed_all") else "FAILED")]
        if b:
            lat = b.get("decode_latency_ms") or {}
            rows += [("decode", f"{b.get('decode_tokens_per_s', 0):.1f} tokens/s"),
                     ("time to first token p50", f"{(b.get('ttft_ms') or {}).get('p50', 0):.2f} ms"),
                     ("decode latency p50 / p90 / p99",
                      f"{lat.get('p50', 0):.2f} / {lat.get('p90', 0):.2f} / {lat.get('p99', 0):.2f} ms"),
                     ("peak RSS", f"{b.get('peak_rss_mb', 0):.0f} MB"),
                     ("swap growth", f"{b.get('swap_growth_mb', 0):.0f} MB")]
        rows += [("within budget", d.get("within_budget")), ("errors", "; ".join(d.get("errors") or []) or "none")]
        sections.append((f"Device report: {dev.get('hostname', '?')}", rows))
    return sections


def markdown(data: dict) -> str:
    lines = [f"# edgekit build report: {data['target']}", ""]
    for title, rows in _rows(data):
        lines += [f"## {title}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
        lines.append("")
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
h1{font-size:1.5em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td{padding:.2em .8em;border-bottom:1px solid #eee;vertical-align:top}
td:first-child{color:#555;white-space:nowrap}.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}.plot{flex:1 1 440px;max-width:480px}.plot svg{width:100%;height:auto}"""


def html_report(data: dict, svgs: dict[str, str]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>edgekit report: {e(str(data['target']))}"
             f"</title><style>{CSS}</style></head><body><h1>edgekit build report: {e(str(data['target']))}</h1>"]
    for i, (title, rows) in enumerate(_rows(data)):
        parts.append(f"<h2>{e(title)}</h2><table>")
        parts += [f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in rows]
        parts.append("</table>")
        if i == 0 and svgs:  # the summary first, then the pictures, then the details
            parts.append("<h2>Plots</h2><div class=plots>")
            parts += [f"<figure class=plot id=plot-{k}>{v}</figure>" for k, v in svgs.items()]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(build_dir: Path, manifest: dict) -> dict[str, Path]:
    data = collect(build_dir, manifest)
    svgs = plots(data)
    data["plots"] = sorted(svgs)
    paths = {"json": Path(build_dir) / "report.json", "md": Path(build_dir) / "report.md",
             "html": Path(build_dir) / "report.html"}
    atomic_write_json(paths["json"], data)
    atomic_write_text(paths["md"], markdown(data))
    atomic_write_text(paths["html"], html_report(data, svgs))
    return paths
