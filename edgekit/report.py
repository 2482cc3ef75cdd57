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


def _plan_vs_measured(plan: dict, bench: dict) -> dict:
    """The planner's memory and decode estimates beside what the host benchmark measured (None where absent)."""
    c = plan.get("chosen") or {}
    return {"memory_planned_mb": round(c["total_bytes"] / 2**20, 1) if c.get("total_bytes") else None,
            "memory_budget_mb": round(plan["budget_bytes"] / 2**20, 1) if plan.get("budget_bytes") else None,
            "memory_measured_mb": bench.get("peak_rss_mb"),
            "planned_context": (plan.get("request") or {}).get("context"),
            "measured_context": (bench["prompt_tokens"] + bench["new_tokens"]) if "new_tokens" in bench else None,
            "decode_planned_tps": c.get("decode_tps_estimate"),
            "decode_measured_tps": bench.get("decode_tokens_per_s"),
            "target": plan.get("target")}


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
                                                    "greedy_match", "passed", "thresholds", "failures")})
        for k in ("heldout_ppl", "perplexity", "ppl_before", "ppl_after"):
            if k in res:
                entry[k] = res[k]
        if len(entry) > 1:
            fidelity.append(entry)
    devices = [_json(p) for p in sorted(build_dir.glob("**/device-report-*.json"))]
    # widths only when a stage changed the model: a dense build has nothing to compare
    pruned = any((stages.get(n) or {}).get("status") == "done" for n in ("prune", "distill"))
    prune = (stages.get("prune") or {}).get("result") or {}
    distill = (stages.get("distill") or {}).get("result") or {}
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
        "artifact_size_bytes": ((stages.get("export") or {}).get("result") or {}).get("size_bytes"),
        "plan_vs_measured": _plan_vs_measured((stages.get("plan") or {}).get("result") or {}, bench),
        "pruning": {k: prune.get(k) for k in ("params_before", "params_after", "removed_fraction", "uniform",
                                              "dense_search_loss", "pruned_search_loss") if k in prune} | (
            {"heldout_perplexity": distill["heldout_perplexity"]}  # teacher, before and after distillation
            if distill.get("heldout_perplexity") is not None else {}),
        "fidelity": fidelity,
        "bench": {k: v for k, v in bench.items() if k not in ("memory_timeline", "decode_latency_samples_ms")},
        "latency_samples_ms": bench.get("decode_latency_samples_ms", []),
        "memory_timeline": bench.get("memory_timeline", []),
        "phases": bench.get("phases", []),
        "layer_widths": {"before": _layer_widths(src) if pruned else [],
                         "after": _layer_widths(final_model) if pruned and final_model else [],
                         "hidden": _hidden(src, final_model) if pruned else None},
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


PHASE_COLORS = ("#ddeeff", "#ffeedd", "#e5f5e0", "#f2e5f7")


def memory_svg(mem: list, phases: list[dict], pvm: dict) -> str:
    """RSS over the benchmark with its phases shaded (load, warmup, each measured point), the planner's estimate and
    the target's memory budget as horizontal lines (log scale when the budget dwarfs the curve)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, ph in enumerate(phases):
        ax.axvspan(ph["start_s"], ph["end_s"], color=PHASE_COLORS[i % len(PHASE_COLORS)], zorder=0)
        ax.text((ph["start_s"] + ph["end_s"]) / 2, 0.02, ph["name"], transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=6, rotation=90, color="#444444")
    ax.plot([m[0] for m in mem], [m[1] for m in mem], color="#228833", label="RSS (this host)", zorder=3)
    if any(m[2] for m in mem):
        ax.plot([m[0] for m in mem], [m[2] for m in mem], color="#ee6677", label="swap growth", zorder=3)
    peak = max(m[1] for m in mem)
    target = f" ({pvm['target']})" if pvm.get("target") else ""
    if pvm.get("memory_planned_mb"):
        ax.axhline(pvm["memory_planned_mb"], color="#4477aa", linestyle="--",
                   label=f"planned {pvm['memory_planned_mb']:.0f} MB{target}")
    if pvm.get("memory_budget_mb"):
        ax.axhline(pvm["memory_budget_mb"], color="#cc3311", linestyle="-", linewidth=1.5,
                   label=f"budget {pvm['memory_budget_mb']:.0f} MB{target}")
        if pvm["memory_budget_mb"] > 8 * peak:
            ax.set_yscale("log")
    ax.set(xlabel="time (s)", ylabel="MB", title="Memory over the benchmark")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return _svg(fig)


def fidelity_svg(fid: list[dict]) -> str:
    """Per gated stage: top-1 agreement against its least allowed value, mean KL against its largest allowed."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7, 3))
    xs = list(range(len(fid)))
    names = [f["stage"] for f in fid]
    a1.bar(xs, [f["top1_agreement"] for f in fid], color="#66ccee", zorder=2)
    a2.bar(xs, [max(f.get("mean_kl") or 0.0, 1e-12) for f in fid], color="#66ccee", zorder=2)
    for i, f in enumerate(fid):
        th = f.get("thresholds") or {}
        if th.get("top1") is not None:
            a1.hlines(th["top1"], i - 0.45, i + 0.45, color="#cc3311", linewidth=2, zorder=3,
                      label="threshold (at least)" if i == 0 else None)
        if th.get("mean_kl") is not None:
            a2.hlines(th["mean_kl"], i - 0.45, i + 0.45, color="#cc3311", linewidth=2, zorder=3,
                      label="threshold (at most)" if i == 0 else None)
        a1.text(i, f["top1_agreement"], f"{f['top1_agreement']:.1%}", ha="center", va="bottom", fontsize=7)
    a1.set(ylim=(0, 1.12), ylabel="top-1 agreement with PyTorch", title="Top-1 agreement")
    a2.set(yscale="log", ylabel="mean KL (nats)", title="Mean KL divergence")
    for ax in (a1, a2):
        ax.set_xticks(xs, names)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Fidelity per stage", y=1.02)
    fig.subplots_adjust(wspace=0.4)
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
        out["memory"] = memory_svg(mem, data.get("phases") or [], data.get("plan_vs_measured") or {})
    widths = widths_svg(data["layer_widths"]["before"], data["layer_widths"]["after"],
                        hidden=data["layer_widths"].get("hidden"))
    if widths:
        out["widths"] = widths
    fid = [f for f in data["fidelity"] if f.get("top1_agreement") is not None]
    if fid:
        out["fidelity"] = fidelity_svg(fid)
    return out


# ---------------------------------------------------------------- markdown and HTML

def _rows(data: dict) -> list[tuple[str, list[tuple]]]:
    """(section title, rows of (name, value)) shared by the Markdown and the HTML."""
    gib = 2**30
    sections = [("Build", [("target", data["target"]), ("model", (data["model"] or {}).get("source")),
                           ("backend / precision", "{backend} / {precision}".format(**(data["resolved"] or
                                                                                       {"backend": "?",
                                                                                        "precision": "?"}))),
                           ("artifact", data["artifact"]),
                           ("artifact size", _mib(data.get("artifact_size_bytes"))), ("status", data["status"]),
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
    pv = data.get("plan_vs_measured") or {}
    if pv.get("memory_planned_mb") or pv.get("decode_planned_tps"):
        on = f" on {pv['target']}" if pv.get("target") else ""
        rows = []
        if pv.get("memory_planned_mb"):
            rows.append(("memory: planned / measured",
                         f"{pv['memory_planned_mb']:.0f} MB{on} at {pv.get('planned_context')} tokens / "
                         + (f"{pv['memory_measured_mb']:.0f} MB peak RSS on this host at "
                            f"{pv.get('measured_context')} tokens" if pv.get("memory_measured_mb") else "not measured")))
        if pv.get("memory_budget_mb"):
            rows.append(("memory budget", f"{pv['memory_budget_mb']:.0f} MB{on}"))
        if pv.get("decode_planned_tps"):
            rows.append(("decode: planned / measured",
                         f"{pv['decode_planned_tps']:g} tokens/s{on} / " + (
                             f"{pv['decode_measured_tps']:.1f} tokens/s on this host"
                             if pv.get("decode_measured_tps") else "not measured")))
        sections.append(("Plan vs measured", rows))
    pr = data.get("pruning") or {}
    if pr.get("params_before"):
        rows = [("parameters", f"{pr['params_before']:,} -> {pr['params_after']:,} "
                               f"({pr.get('removed_fraction', 0):.1%} removed, "
                               f"{'uniform' if pr.get('uniform') else 'per-layer'} widths)")]
        if pr.get("dense_search_loss") is not None:
            rows.append(("calibration loss before / after pruning",
                         f"{pr['dense_search_loss']:.4f} / {pr['pruned_search_loss']:.4f} nats "
                         f"(+{pr['pruned_search_loss'] - pr['dense_search_loss']:.4f})"))
        if pr.get("heldout_perplexity"):
            ppl = pr["heldout_perplexity"]
            rows.append(("held-out perplexity: teacher / pruned / distilled",
                         f"{ppl['teacher']:.2f} / {ppl['before']:.2f} / {ppl['after']:.2f}"))
        sections.append(("Pruning cost", rows))
    for f in data["fidelity"]:
        sections.append((f"Fidelity: {f['stage']}", fidelity_rows(f)))
    b = data["bench"]
    if b.get("decode_tokens_per_s"):
        lat = b["decode_latency_ms"]
        sd = lambda k: f" ± {b[k + '_sd']:.1f}" if b.get(k + "_sd") is not None else ""  # noqa: E731
        sections.append(("Host benchmark", [
            ("lengths", f"{b.get('prompt_tokens')} prompt + {b.get('new_tokens', '?')} new tokens, "
                        f"{b.get('runs')} runs in {b.get('duration_s', 0):.1f} s"),
            ("load", f"{b['load_s']:.3f} s"), ("time to first token p50", f"{b['ttft_ms']['p50']:.2f} ms"),
            ("prefill", f"{b['prefill_tokens_per_s']:.1f}{sd('prefill_tokens_per_s')} tokens/s"),
            ("decode", f"{b['decode_tokens_per_s']:.1f}{sd('decode_tokens_per_s')} tokens/s"),
            ("decode latency p50 / p90 / p99", f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} ms"),
            ("peak RSS", f"{b.get('peak_rss_mb', 0):.0f} MB"), ("swap growth", f"{b.get('swap_growth_mb', 0):.0f} MB"),
            ("valid", "yes" if b.get("valid") else f"NO: {b.get('invalid_reason')}"),
            *[("note", n) for n in b.get("notes") or []]]))
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


def _mib(n) -> str:
    return f"{n / 2**20:.1f} MiB ({n:,} bytes)" if n else "unknown"


def fidelity_rows(f: dict) -> list[tuple]:
    """A gate result in words, each figure beside the threshold it had to meet."""
    th = f.get("thresholds") or {}
    need = lambda cmp, v, fmt: f" (needs {cmp} {format(v, fmt)})" if v is not None else ""  # noqa: E731
    rows = []
    if f.get("passed") is not None:
        rows.append(("gate", "passed" if f["passed"] else "FAILED: " + "; ".join(f.get("failures") or [])))
    if f.get("top1_agreement") is not None:
        rows.append(("top-1 agreement with PyTorch", f"{f['top1_agreement']:.1%}" + need(">=", th.get("top1"), ".0%")))
    if f.get("mean_kl") is not None:
        rows.append(("mean KL divergence", f"{f['mean_kl']:.3g} nats" + need("<=", th.get("mean_kl"), "g")))
    if f.get("max_abs_logit_delta") is not None:
        rows.append(("largest logit difference", f"{f['max_abs_logit_delta']:.3g}" +
                     need("<=", th.get("max_abs"), "g")))
    if f.get("greedy_match") is not None:
        rows.append(("greedy continuation", ("identical" if f["greedy_match"] else "differs") +
                     (" (must be identical)" if th.get("greedy_exact") else " (not gated)")))
    labels = {"heldout_ppl": "held-out perplexity", "perplexity": "perplexity", "ppl_before": "perplexity before",
              "ppl_after": "perplexity after"}
    rows += [(labels[k], f"{f[k]:.4g}") for k in labels if f.get(k) is not None]
    return rows


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


# ---------------------------------------------------------------- the matrix (edgekit bench --matrix)

MATRIX_HEADERS = ("device", "backend", "precision", "size MB", "peak RSS / budget MB", "TTFT ms", "prefill t/s",
                  "decode t/s p50 / p99", "KL", "top-1", "ppl / fp32", "gate", "roofline", "result")


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def matrix_table(data: dict) -> list[tuple]:
    """One row of MATRIX_HEADERS per matrix row (terminal, Markdown and HTML show the same cells)."""
    winners = set(v for v in (data.get("winners") or {}).values() if v)
    out = []
    for r in data["rows"]:
        if r["status"] == "error" and r.get("size_bytes") is None:
            out.append((r["device"], r["backend"], r.get("precision") or "-", *["-"] * 10,
                        "ERROR: " + (r.get("error") or "?")))
            continue
        rss = r.get("peak_rss_mb")
        fits = {True: "fits", False: "OVER", None: "?"}[r.get("fits")]
        mem = (f"{rss:.0f} / {r['budget_mb']:.0f} {fits}" if rss is not None else
               f"plan {r['planned_mb']:.0f} / {r['budget_mb']:.0f} {fits}" if r.get("planned_mb") is not None
               else "-")  # a row that failed its gate was never benchmarked
        gate = {True: "passed", False: "FAILED", None: "-"}[r.get("gate_passed")]
        result = ("WINNER" if r["id"] in winners else "") + (" (skipped: done earlier)" if r.get("skipped") else "")
        if r.get("error"):
            result = (result + " " + r["error"]).strip()
        elif r.get("note"):
            result = (result + " " + r["note"]).strip()
        out.append((r["device"], r["backend"], r["precision"], _f((r.get("size_bytes") or 0) / 2**20, ".1f"), mem,
                    _f(r.get("ttft_ms"), ".1f"), _f(r.get("prefill_tokens_per_s"), ".0f"),
                    f"{_f(r.get('decode_tps_p50'), '.1f')} / {_f(r.get('decode_tps_p99'), '.1f')}",
                    _f(r.get("mean_kl"), ".3g"), _f(r.get("top1_agreement"), ".1%"),
                    _f(r.get("perplexity_ratio"), ".3f"), gate, _f(r.get("roofline_fraction"), ".2f"),
                    result or ""))
    return out


def _matrix_notes(data: dict) -> list[str]:
    bw = data["bandwidth"]
    win = data.get("winner")
    return [f"winner: {win or 'none (no row passed its gate and fits)'}",
            f"winner rule: {data['winner_rule']}",
            f"memory budget: {data['budget_mb']:.0f} MB ({data['target']}); fits = peak RSS of the benchmark "
            "(host rows: on this host) within it, or the plan's estimate where no benchmark ran",
            f"roofline = decode tokens/s x bytes read per token / bandwidth; host bandwidth "
            f"{(bw.get('host_bytes_per_s') or 0) / 1e9:.1f} GB/s ({bw['method']}), devices "
            f"{bw['device_bytes_per_s'] / 1e9:.1f} GB/s ({bw['device_method']})",
            "KL, top-1 and perplexity are against the fp32 PyTorch model on the gate's held-out text; decode p99 is "
            "the slowest 1% of steps, as tokens/s"]


def matrix_markdown(data: dict) -> str:
    lines = [f"# edgekit matrix: {data['target']} ({(data.get('model') or {}).get('source')})", ""]
    lines += ["| " + " | ".join(MATRIX_HEADERS) + " |", "|" + "---|" * len(MATRIX_HEADERS)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in matrix_table(data)]
    lines += [""] + [f"- {n}" for n in _matrix_notes(data)] + [""]
    return "\n".join(lines)


def matrix_svgs(data: dict) -> dict[str, str]:
    """Quality against speed (marker area = file size, hollow = failed its gate) and peak memory against the
    budget, one bar per row."""
    if not any(r.get("decode_tps_p50") or r.get("peak_rss_mb") or r.get("planned_mb") for r in data["rows"]):
        return {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return {}
    rows = [r for r in data["rows"] if r.get("decode_tps_p50") and r.get("mean_kl") is not None]
    out = {}
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        big = max(r.get("size_bytes") or 1 for r in rows)
        for r in rows:
            ok = bool(r.get("gate_passed")) and r.get("fits") is not False
            ax.scatter(r["decode_tps_p50"], max(r["mean_kl"], 1e-7), s=40 + 400 * (r.get("size_bytes") or 0) / big,
                       facecolors="#4477aa" if ok else "none", edgecolors="#4477aa" if ok else "#cc3311", zorder=3)
            ax.annotate(f"{r['backend']} {r['precision']}" + ("" if r["device"] == "host" else f" @{r['device']}"),
                        (r["decode_tps_p50"], max(r["mean_kl"], 1e-7)), fontsize=6, xytext=(4, 4),
                        textcoords="offset points")
        ax.set(xlabel="decode tokens/s (p50)", ylabel="mean KL vs fp32 (nats, lower is better)", yscale="log",
               title="Quality / speed / size (area = file size; hollow = fails gate or budget)")
        out["quality_speed"] = _svg(fig)
    mem = [r for r in data["rows"] if r.get("peak_rss_mb") is not None or r.get("planned_mb") is not None]
    if mem:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * len(mem)))
        ys = list(range(len(mem)))
        vals = [r["peak_rss_mb"] if r.get("peak_rss_mb") is not None else r["planned_mb"] for r in mem]
        ax.barh(ys, vals, color=["#228833" if r.get("fits") else "#cc3311" for r in mem], zorder=2)
        ax.axvline(data["budget_mb"], color="#cc3311", linestyle="--", label=f"budget {data['budget_mb']:.0f} MB")
        ax.set_yticks(ys, [f"{r['device']} {r['backend']} {r['precision']}" for r in mem], fontsize=7)
        ax.set(xlabel="peak RSS (MB; planned where not measured)", title=f"Memory against {data['target']}'s budget")
        ax.legend(fontsize=7)
        out["memory_budget"] = _svg(fig)
    return out


def matrix_html(data: dict, svgs: dict[str, str]) -> str:
    e = html.escape
    title = f"edgekit matrix: {data['target']}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title><style>{CSS}"
             "th{text-align:left;padding:.2em .8em;border-bottom:2px solid #ccc}body{max-width:1400px}</style>"
             f"</head><body><h1>{e(title)}</h1><table><tr>"]
    parts += [f"<th>{e(h)}</th>" for h in MATRIX_HEADERS]
    parts.append("</tr>")
    for row in matrix_table(data):
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</table><ul>" + "".join(f"<li>{e(n)}</li>" for n in _matrix_notes(data)) + "</ul>")
    if svgs:
        parts.append("<h2>Plots</h2><div class=plots>")
        parts += [f"<figure class=plot id=plot-{k}>{v}</figure>" for k, v in svgs.items()]
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_matrix_report(out: Path, data: dict) -> dict[str, Path]:
    """matrix.md and matrix.html beside matrix.json (which the caller writes last, with these paths in it)."""
    svgs = matrix_svgs(data)
    paths = {"json": Path(out) / "matrix.json", "md": Path(out) / "matrix.md", "html": Path(out) / "matrix.html"}
    atomic_write_text(paths["md"], matrix_markdown(data))
    atomic_write_text(paths["html"], matrix_html(data, svgs))
    return paths
