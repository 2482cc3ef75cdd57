"""Does pruning turn into decode speed? SmolLM2-135M dense and pruned by 25% / 50% of parameters, through ONNX
Runtime fp32 and GGUF (llama.cpp) f16, measured side by side in one run, with each row's roofline fraction and, with
--profile, where ONNX Runtime's decode step spends its time (per-op kernel timings from onnxruntime's profiler).

    PYTHONPATH=. python bench/prune_speed.py --work ~/.cache/edgekit/bench/prune_speed [--threads 1] [--prompt 64]
        [--tokens 32] [--rounds 3] [--profile] [--fused]

The work folder holds, per model (dense, p25, p50): `src` (the pruned HF folder; `edgekit prune --ratio R
--no-reconstruct`: speed does not depend on the refit), `ort` (`edgekit export --backend onnxruntime --precision
fp32`) and `gguf` (`--backend gguf --precision f16`: q8_0 needs widths that are multiples of 32, which the pruner's
default --align 8 does not give). Missing ones are built through edgekit's API (each export runs its gate).
With --fused, `ort-fused` is the same graph after onnxruntime.transformers' fusions (RotaryEmbedding,
SkipSimplifiedLayerNormalization), measured as a third ORT variant.

Decode tokens/s: the median single-token step after a `--prompt`-token prefill, over `--tokens` steps; every
(model, backend) pair runs once per round, rounds interleave all of them, and the best round is kept (load from
other processes only ever slows a round down). Same thread count for every runtime.

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

MODELS = {"dense": None, "p25": 0.25, "p50": 0.5}


def params_of(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="np") as st:
        return sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys() if k != "lm_head.weight")


def kv_bytes(cfg: dict, positions: float, el: int = 4) -> float:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * hd * el * positions


def build(work: Path, fused: bool) -> dict[str, dict[str, Path]]:
    import edgekit
    from edgekit.models import resolve_model

    out = {}
    for name, ratio in MODELS.items():
        d = work / name
        src = resolve_model(None).path if ratio is None else d / "src"
        if ratio is not None and not (src / "config.json").exists():
            edgekit.prune(None, out=src, ratio=ratio, reconstruct=False)
        arts = {"src": src, "ort": d / "ort", "gguf": d / "gguf"}
        for key, backend, prec in (("ort", "onnxruntime", "fp32"), ("gguf", "gguf", "f16")):
            if not (arts[key] / "artifact.json").exists():
                edgekit.export(src, backend=backend, precision=prec, out=arts[key])
        if fused:
            arts["ort-fused"] = fuse(arts["ort"], d / "ort-fused", json.loads((src / "config.json").read_text()))
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


def open_runner(art: Path, threads: int, profile_prefix: str | None = None):
    from edgekit.runtime import open_artifact

    r = open_artifact(art, threads=threads, all_logits=False)
    if profile_prefix:  # same session options plus the profiler
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
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


def profile_ort(art: Path, ids, prompt: int, tokens: int, threads: int) -> dict:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="artifacts live here; missing ones are built")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also profile every ORT decode step (per-op timings)")
    ap.add_argument("--fused", action="store_true", help="also measure the ORT graph after onnxruntime's fusions")
    a = ap.parse_args(argv)
    arts = build(a.work, a.fused)
    backends = ["ort", "gguf"] + (["ort-fused"] if a.fused else [])
    ids = np.random.default_rng(0).integers(0, 49152, a.prompt + a.tokens).astype(np.int64)
    bw = [copy_bandwidth(a.threads)]
    cases = [(m, b) for m in MODELS for b in backends]
    runners = {c: open_runner(arts[c[0]][c[1]], a.threads) for c in cases}
    for r in runners.values():
        decode_rate(r, ids, a.prompt, 4)  # warm-up: weights paged in, kernels prepacked
    best = dict.fromkeys(cases, 0.0)
    for k in range(a.rounds):
        for c, r in runners.items():
            best[c] = max(best[c], decode_rate(r, ids, a.prompt, a.tokens))
        print(f"round {k + 1}/{a.rounds}: " + ", ".join(f"{m} {b} {best[(m, b)]:.1f}" for m, b in cases),
              file=sys.stderr, flush=True)
    del runners
    bw.append(copy_bandwidth(a.threads))
    bandwidth = max(bw)
    load = os.getloadavg()[0]
    pos = a.prompt + a.tokens / 2
    params = {m: params_of(arts[m]["src"]) for m in MODELS}
    cfgs = {m: json.loads((arts[m]["src"] / "config.json").read_text()) for m in MODELS}
    bpt = {m: params[m] * 4 + kv_bytes(cfgs[m], pos) for m in MODELS}  # ORT fp32 weights
    bpt_gguf = {}
    for m in MODELS:
        from gguf import GGUFReader

        entry = json.loads((arts[m]["gguf"] / "artifact.json").read_text())["entry"]
        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(arts[m]["gguf"] / entry)).tensors}
        if "output.weight" in tensors:  # a separate LM head: the embedding table is only gathered from
            tensors.pop("token_embd.weight")
        w = sum(tensors.values())
        bpt_gguf[m] = w + kv_bytes(cfgs[m], pos)
    print(f"\ncopy bandwidth (numpy, {a.threads} thread(s), read+write): {bandwidth / 1e9:.2f} GB/s (runs "
          f"{', '.join(f'{b / 1e9:.2f}' for b in bw)}); load average {load:.1f} on {os.cpu_count()} CPUs")
    print("parameters: " + ", ".join(f"{m} {params[m] / 1e6:.1f}M (hidden {cfgs[m]['hidden_size']}, ffn "
                                     f"{cfgs[m]['intermediate_size']}, heads {cfgs[m]['num_attention_heads']}/"
                                     f"{cfgs[m]['num_key_value_heads']})" for m in MODELS))
    print(f"\n| model | backend | MB read/token | decode tok/s | roofline tok/s | roofline fraction | speedup | "
          f"param ratio | speedup / param ratio | bytes ratio | speedup / bytes ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, b in cases:
        by = (bpt_gguf if b == "gguf" else bpt)[m]
        dense_by = (bpt_gguf if b == "gguf" else bpt)["dense"]
        tps = best[(m, b)]
        sp = tps / best[("dense", b)]
        pr, br = params["dense"] / params[m], dense_by / by
        print(f"| {m} | {b} | {by / 1e6:.1f} | {tps:.1f} | {bandwidth / by:.1f} | {tps * by / bandwidth:.2f} | "
              f"{sp:.2f} | {pr:.3f} | {sp / pr:.2f} | {br:.3f} | {sp / br:.2f} |")
    if a.profile:
        print("\nONNX Runtime decode step, profiled (kernel times sum the op's threads' wall time):")
        for m in MODELS:
            for b in [x for x in backends if x.startswith("ort")]:
                p = profile_ort(arts[m][b], ids, a.prompt, a.tokens, a.threads)
                print(f"{m:6} {b:9} {p['kernels_per_step']:.0f} kernels/step, step {p['step_ms']:.2f} ms: MatMul "
                      f"{p['matmul_ms']:.2f} ms, other ops {p['other_ms']:.2f} ms; "
                      + ", ".join(f"{k} {t} ms x{c:.0f}" for k, t, c in p["top_other"][:8]))
    print(f"\nreproduce: PYTHONPATH=. python bench/prune_speed.py --work {a.work} --threads {a.threads} "
          f"--prompt {a.prompt} --tokens {a.tokens} --rounds {a.rounds}" + (" --profile" if a.profile else "")
          + (" --fused" if a.fused else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
