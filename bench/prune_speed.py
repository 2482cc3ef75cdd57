"""Does pruning turn into decode speed? SmolLM2-135M dense and pruned (50% of parameters removed, and 25%), through
ONNX Runtime fp32 in both graphs edgekit exports (optimum's, and the lean GroupQueryAttention graph of
onnxruntime-genai's builder) and GGUF (llama.cpp) f16 / q8_0, measured side by side in one run at each thread count,
with each row's roofline fraction and, with --profile, where ONNX Runtime's decode step spends its time (per-op
kernel timings from onnxruntime's profiler).

    PYTHONPATH=. python bench/prune_speed.py --work ~/.cache/edgekit/bench/prune_speed [--threads 1,default]
        [--models dense,p50,p50-a64] [--prompt 64] [--tokens 32] [--rounds 3] [--profile] [--fused]

The work folder holds, per model: `src` (the pruned HF folder; `edgekit prune --ratio R --no-reconstruct [--align
A]`: speed does not depend on the refit), `ort-optimum` / `ort-lean` (`edgekit export --backend onnxruntime
--precision fp32`, the graph forced by ExportConfig.onnx_graph; lean is the default) and `gguf-f16` / `gguf-q8_0`
(`--backend gguf`; q8_0 only where every width is a multiple of 32, which the pruner's default --align 8 does not
give: `p50-a64` is the same budget pruned with --align 64). Missing ones are built through edgekit (each export runs
its gate). With --fused, `ort-fused` is optimum's graph after onnxruntime.transformers' fusions.

Decode tokens/s: the median single-token step after a `--prompt`-token prefill, over `--tokens` steps; every
(model, backend) pair runs once per round, rounds interleave all of them, and the best round is kept (load from
other processes only ever slows a round down). Same thread count for every runtime; `default` leaves it to each
runtime (onnxruntime: one per physical core; llama-cpp-python: half the logical CPUs).

Parameters: every weight of the HF folder, the tied embedding once (SmolLM2 ties its LM head; the embedding is
28.3M of 134.5M, 21%). "50% removed" is edgekit prune's own budget: parameters_after / parameters_before = 0.5,
embedding included (hidden channels are pruned too, so the embedding shrinks with them).

Bytes read per token (the roofline's denominator): every weight the step reads, the tied table once (as the LM
head; the embedding Gather reads one row), plus the KV cache at the mean decode position (fp32 for both runtimes:
edgekit opens f16/f32 GGUF with an f32 cache). Roofline tokens/s = copy bandwidth / bytes per token, with the copy
bandwidth measured by numpy in this run (read + write bytes, same thread count, best of before and after).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_decode import copy_bandwidth  # noqa: E402  (one bandwidth measurement for every bench script)

MODELS = {"dense": (None, None), "p25": (0.25, 8), "p50": (0.5, 8), "p50-a64": (0.5, 64)}  # ratio, --align
ORT = {"ort-optimum": "optimum", "ort-lean": "lean"}
GGUF = {"gguf-f16": "f16", "gguf-q8_0": "q8_0"}


def params_of(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="np") as st:
        return sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys() if k != "lm_head.weight")


def kv_bytes(cfg: dict, positions: float, el: int = 4) -> float:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * hd * el * positions


def widths_of(cfg: dict) -> list[int]:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return [cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * hd]


def build(work: Path, models: list[str], fused: bool) -> dict[str, dict[str, Path]]:
    import edgekit
    from edgekit.export import ExportConfig, export_model
    from edgekit.models import resolve_model

    out = {}
    for name in models:
        ratio, align = MODELS[name]
        d = work / name
        src = resolve_model(None).path if ratio is None else d / "src"
        if ratio is not None and not (src / "config.json").exists():
            edgekit.prune(None, out=src, ratio=ratio, align=align, reconstruct=False)
        arts = {"src": src}
        for key, graph in ORT.items():
            arts[key] = d / key
            if not (arts[key] / "artifact.json").exists():
                export_model(src, arts[key], ExportConfig(precision="fp32", onnx_graph=graph), log=lambda *_: None)
        q8_ok = all(w % 32 == 0 for w in widths_of(json.loads((src / "config.json").read_text())))
        for key, prec in GGUF.items():
            if prec == "q8_0" and not q8_ok:
                continue
            arts[key] = d / key
            if not (arts[key] / "artifact.json").exists():
                edgekit.export(src, backend="gguf", precision=prec, out=arts[key])
        if fused:
            arts["ort-fused"] = fuse(arts["ort-optimum"], d / "ort-fused", json.loads((src / "config.json").read_text()))
        out[name] = arts
    return out


def fuse(src: Path, dst: Path, cfg: dict) -> Path:
    """The artifact's graph after onnxruntime.transformers' fusions, in an artifact folder of its own."""
    import shutil

    from onnxruntime.transformers.optimizer import optimize_model

    if (dst / "artifact.json").exists():
        return dst
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        for f in src.iterdir():
            if f.name != "model.onnx":
                shutil.copy(f, tmp)
        m = optimize_model(str(src / "model.onnx"), model_type="qwen3", num_heads=cfg["num_attention_heads"],
                           hidden_size=cfg["hidden_size"], opt_level=0)
        m.save_model_to_file(str(Path(tmp) / "model.onnx"))
        os.replace(tmp, dst)
        os.makedirs(tmp)  # TemporaryDirectory removes it on exit
    return dst


def open_runner(art: Path, threads: int | None, profile_prefix: str | None = None):
    from edgekit.runtime import open_artifact

    r = open_artifact(art, threads=threads, all_logits=False)
    if profile_prefix:  # same session options plus the profiler
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads = threads or 0
        o.enable_profiling = True
        o.profile_file_prefix = profile_prefix
        r.session = ort.InferenceSession(str(art / "model.onnx"), o, providers=["CPUExecutionProvider"])
    return r


def decode_rate(r, ids: np.ndarray, prompt: int, tokens: int) -> float:
    r.reset()
    r.forward(ids[:prompt])
    steps = []
    for i in range(prompt, prompt + tokens):
        t = time.perf_counter()
        r.forward(ids[i:i + 1])
        steps.append(time.perf_counter() - t)
    return 1.0 / statistics.median(steps)


def profile_ort(art: Path, ids, prompt: int, tokens: int, threads: int | None) -> dict:
    """Per decode step: kernels run, kernel time in MatMul vs everything else, and the busiest other op types."""
    with tempfile.TemporaryDirectory() as tmp:
        r = open_runner(art, threads, f"{tmp}/p")
        r.reset()
        r.forward(ids[:prompt])
        for i in range(prompt, prompt + tokens):
            r.forward(ids[i:i + 1])
        events = json.loads(Path(r.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]  # decode steps only
    t0 = runs[0]["ts"]
    dur, cnt = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            dur[e["args"]["op_name"]] += e["dur"]
            cnt[e["args"]["op_name"]] += 1
    n = len(runs)
    mm = sum(v for k, v in dur.items() if "MatMul" in k)
    return {"kernels_per_step": sum(cnt.values()) / n, "step_ms": sum(e["dur"] for e in runs) / n / 1e3,
            "matmul_ms": mm / n / 1e3, "other_ms": (sum(dur.values()) - mm) / n / 1e3,
            "top_other": [(k, round(v / n / 1e3, 3), cnt[k] / n) for k, v in dur.most_common(12) if "MatMul" not in k]}


def measure(arts, cases, ids, a, threads: int | None) -> dict:
    """Best-of-rounds decode tokens/s of every case at one thread setting, rounds interleaving all cases."""
    runners = {c: open_runner(arts[c[0]][c[1]], threads) for c in cases}
    for r in runners.values():
        decode_rate(r, ids, a.prompt, 4)  # warm-up: weights paged in, kernels prepacked
    best = dict.fromkeys(cases, 0.0)
    for k in range(a.rounds):
        for c, r in runners.items():
            best[c] = max(best[c], decode_rate(r, ids, a.prompt, a.tokens))
        print(f"threads {threads or 'default'} round {k + 1}/{a.rounds}: "
              + ", ".join(f"{m} {b} {best[(m, b)]:.1f}" for m, b in cases), file=sys.stderr, flush=True)
    return best


def gguf_bytes(art: Path) -> int:
    from gguf import GGUFReader

    entry = json.loads((art / "artifact.json").read_text())["entry"]
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(art / entry)).tensors}
    if "output.weight" in tensors:  # a separate LM head: the embedding table is only gathered from
        tensors.pop("token_embd.weight")
    return sum(tensors.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="artifacts live here; missing ones are built")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts; 'default' leaves it to each "
                    "runtime (default 1)")
    ap.add_argument("--models", default="dense,p50,p50-a64", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also profile every ORT decode step (per-op timings)")
    ap.add_argument("--fused", action="store_true", help="also measure optimum's graph after onnxruntime's fusions")
    a = ap.parse_args(argv)
    models = a.models.split(",")
    thread_set = [None if t == "default" else int(t) for t in a.threads.split(",")]
    arts = build(a.work, models, a.fused)
    ids = np.random.default_rng(0).integers(0, 49152, a.prompt + a.tokens).astype(np.int64)
    cases = [(m, b) for m in models for b in (*ORT, *GGUF, *(["ort-fused"] if a.fused else [])) if b in arts[m]]
    pos = a.prompt + a.tokens / 2
    params = {m: params_of(arts[m]["src"]) for m in models}
    cfgs = {m: json.loads((arts[m]["src"] / "config.json").read_text()) for m in models}
    nbytes = {(m, b): (gguf_bytes(arts[m][b]) if b.startswith("gguf") else params[m] * 4) + kv_bytes(cfgs[m], pos)
              for m, b in cases}  # ORT: fp32 weights
    print("parameters: " + ", ".join(f"{m} {params[m] / 1e6:.1f}M (hidden {cfgs[m]['hidden_size']}, ffn "
                                     f"{cfgs[m]['intermediate_size']}, heads {cfgs[m]['num_attention_heads']}/"
                                     f"{cfgs[m]['num_key_value_heads']})" for m in models))
    for threads in thread_set:
        bw = [copy_bandwidth(threads or os.cpu_count())]
        best = measure(arts, cases, ids, a, threads)
        bw.append(copy_bandwidth(threads or os.cpu_count()))
        bandwidth = max(bw)
        print(f"\n### threads: {threads or 'default'}; copy bandwidth (numpy, read+write) {bandwidth / 1e9:.2f} GB/s "
              f"(runs {', '.join(f'{b / 1e9:.2f}' for b in bw)}); load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs\n")
        print("| model | backend | MB read/token | decode tok/s | roofline tok/s | roofline fraction | speedup | "
              "param ratio | speedup / param ratio | bytes ratio | speedup / bytes ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for m, b in cases:
            by, tps = nbytes[(m, b)], best[(m, b)]
            dense = ("dense", b) if ("dense", b) in best else None
            sp = tps / best[dense] if dense else float("nan")
            pr, br = params["dense"] / params[m], (nbytes[dense] / by if dense else float("nan"))
            print(f"| {m} | {b} | {by / 1e6:.1f} | {tps:.1f} | {bandwidth / by:.1f} | {tps * by / bandwidth:.2f} | "
                  f"{sp:.2f} | {pr:.3f} | {sp / pr:.2f} | {br:.3f} | {sp / br:.2f} |")
        if a.profile:
            print("\nONNX Runtime decode step, profiled (kernel times sum the op's threads' wall time):")
            for m, b in cases:
                if b.startswith("ort"):
                    p = profile_ort(arts[m][b], ids, a.prompt, a.tokens, threads)
                    print(f"{m:8} {b:11} {p['kernels_per_step']:.0f} kernels/step, step {p['step_ms']:.2f} ms: "
                          f"MatMul {p['matmul_ms']:.2f} ms, other ops {p['other_ms']:.2f} ms; "
                          + ", ".join(f"{k} {t} ms x{c:.0f}" for k, t, c in p["top_other"][:6]))
    print(f"\nreproduce: PYTHONPATH=. python bench/prune_speed.py --work {a.work} --threads {a.threads} --models "
          f"{a.models} --prompt {a.prompt} --tokens {a.tokens} --rounds {a.rounds}"
          + (" --profile" if a.profile else "") + (" --fused" if a.fused else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
