"""How close does llama.cpp's decode come to the memory-bandwidth roofline, and does a 30%-pruned model buy its
parameter ratio in speed?

    PYTHONPATH=. python bench/gguf_decode.py [--model DIR] [--threads 1] [--tokens 64] [--rounds 3] [--work DIR]

For SmolLM2-135M (default) at f16, q8_0 and q4_k_m, through llama-cpp-python:
  - decode tokens/s: one token per eval after a 32-token prompt, median of `--tokens` steps, best of `--rounds`
    rounds that interleave all files (so load from other processes is spread over them);
  - roofline tokens/s = measured copy bandwidth / bytes read per token, where bytes per token = every weight tensor
    the decode reads (the tied embedding counts once, as the output matrix) + the f16 KV cache at the mean position;
    copy bandwidth = numpy copies of a 512 MiB buffer with the same thread count, counted as read + write bytes,
    measured in this same run (best of several, before and after the decode runs);
  - the same for a 30%-pruned model, as decode speedup against the parameter ratio (dense / pruned).
The pruned model here is NOT edgekit's pruner: it is SmolLM2 with its MLPs uniformly cut to the 768 neurons of
largest weight magnitude per layer (1536 -> 768, which removes 29.6% of the parameters and keeps ffn_down 256-aligned
for K-quants). Its quality is not measured; only its speed is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("f16", "q8_0", "q4_k_m")
PRUNED_FFN = 768


def copy_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved (read + write) by numpy copies of a large buffer split across `threads` threads."""
    from edgekit.runtime.roofline import measure_bandwidth

    return measure_bandwidth(threads, mib=mib, repeats=repeats)


def prune_mlp_by_magnitude(src: Path, out: Path, keep: int) -> Path:
    """A uniformly width-reduced copy: per layer, the `keep` MLP neurons with the largest |gate|+|up|+|down| norms."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        g, u, d = sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"], sd[p + "down_proj.weight"]
        score = g.norm(dim=1) + u.norm(dim=1) + d.norm(dim=0)
        idx = torch.sort(torch.topk(score, keep).indices).values
        sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"] = g[idx].contiguous(), u[idx].contiguous()
        sd[p + "down_proj.weight"] = d[:, idx].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps({**cfg, "intermediate_size": keep}, indent=2))
    return out


def make_ggufs(model_dir: Path, work: Path, threads: int) -> dict[str, Path]:
    """f16 written directly, q8_0 / q4_k_m by llama.cpp's quantizer from an f32 GGUF (as edgekit's exporter does)."""
    from edgekit.export import ExportConfig
    from edgekit.exporters import gguf as g

    p = g.plan(json.loads((model_dir / "config.json").read_text()), ExportConfig(backend="gguf", precision="f32"))
    files = {prec: work / f"{prec}.gguf" for prec in PRECISIONS}
    if all(f.exists() for f in files.values()):
        return files
    g.write_gguf(model_dir, files["f16"], p, "f16")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        f32 = Path(tmp) / "f32.gguf"
        g.write_gguf(model_dir, f32, p, "f32")
        for prec in ("q8_0", "q4_k_m"):
            g.quantize(f32, files[prec], prec, threads)
    return files


def bytes_per_token(path: Path, kv_positions: float) -> tuple[int, int]:
    """(weight bytes a decode step reads, KV-cache bytes read at the mean position) of a GGUF."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tensors = {t.name: int(t.n_bytes) for t in r.tensors}
    if "output.weight" in tensors:  # untied: the embedding table is only gathered from (one row per token)
        tensors.pop("token_embd.weight")
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    f = lambda k: int(r.fields[f"{arch}.{k}"].parts[-1][0])
    kv = f("block_count") * 2 * f("attention.head_count_kv") * f("attention.key_length") * 2 * kv_positions
    return sum(tensors.values()), int(kv)


def open_llama(path: Path, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)


def decode_rate(llm, ids: list[int], prompt: int, tokens: int) -> float:
    """Median single-token decode rate (tokens/s) after a `prompt`-token prefill, in llama.cpp's default setup."""
    llm.reset()
    llm.eval(ids[:prompt])
    steps = []
    for tok in ids[prompt:prompt + tokens]:
        t = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
    return 1.0 / statistics.median(steps)


def params_of(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as st:
        return sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys() if k != "lm_head.weight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="Llama-arch HF folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp and copy threads (default 1: on an oversubscribed machine llama.cpp's spinning "
                    "thread barriers make more threads far slower)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, help="keep the GGUF files here (default: a temporary folder)")
    a = ap.parse_args(argv)
    from edgekit.data import heldout_text
    from edgekit.models import resolve_model
    from tokenizers import Tokenizer

    model = resolve_model(str(a.model) if a.model else None).path
    ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode(heldout_text()[:20_000]).ids
    work = a.work or Path(tempfile.mkdtemp(prefix="gguf-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    pruned_dir = work / "pruned-src"
    if not (pruned_dir / "config.json").exists():
        prune_mlp_by_magnitude(model, pruned_dir, PRUNED_FFN)
    models = {"dense": model, f"pruned (ffn {PRUNED_FFN})": pruned_dir}
    files = {}
    for name, d in models.items():
        (work / name.split()[0]).mkdir(exist_ok=True)
        files[name] = make_ggufs(d, work / name.split()[0], a.threads)
    bw = [copy_bandwidth(a.threads)]
    rows = []
    kv_mean = a.prompt + a.tokens / 2
    cases = [(name, prec, files[name][prec]) for name in models for prec in PRECISIONS]
    llms = {c: open_llama(c[2], a.threads) for c in cases}
    for llm in llms.values():
        decode_rate(llm, ids, a.prompt, 4)  # warm-up: page the weights in
    # Rounds interleave the files so that load from other processes spreads over all of them; best round kept.
    best = {c: 0.0 for c in cases}
    for r in range(a.rounds):
        for c, llm in llms.items():
            best[c] = max(best[c], decode_rate(llm, ids, a.prompt, a.tokens))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n.split()[0]} {p} {best[(n, p, f)]:.1f}"
                                                        for n, p, f in cases), file=sys.stderr, flush=True)
    del llms
    for name, prec, path in cases:
        w, kv = bytes_per_token(path, kv_mean)
        rows.append({"model": name, "precision": prec, "file_mb": path.stat().st_size / 1e6,
                     "bytes_per_token_mb": (w + kv) / 1e6, "decode_tps": best[(name, prec, path)]})
    bw.append(copy_bandwidth(a.threads))
    bandwidth = max(bw)
    p_dense, p_pruned = (params_of(d) for d in models.values())
    print(f"copy bandwidth (numpy, {a.threads} threads, read+write): {bandwidth / 1e9:.2f} GB/s "
          f"(runs: {', '.join(f'{b / 1e9:.2f}' for b in bw)}); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'model':18} {'prec':7} {'file MB':>8} {'B/token MB':>10} {'decode tok/s':>12} {'roofline':>9} "
          f"{'ratio':>6}")
    for r in rows:
        r["roofline_tps"] = bandwidth / (r["bytes_per_token_mb"] * 1e6)
        r["ratio"] = r["decode_tps"] / r["roofline_tps"]
        print(f"{r['model']:18} {r['precision']:7} {r['file_mb']:8.1f} {r['bytes_per_token_mb']:10.1f} "
              f"{r['decode_tps']:12.1f} {r['roofline_tps']:9.1f} {r['ratio']:6.2f}")
    print(f"\nparameters: dense {p_dense / 1e6:.1f}M, pruned {p_pruned / 1e6:.1f}M "
          f"(ratio {p_dense / p_pruned:.3f}, {1 - p_pruned / p_dense:.1%} removed)")
    print(f"{'precision':10} {'dense tok/s':>11} {'pruned tok/s':>12} {'speedup':>8} {'param ratio':>11} "
          f"{'speedup/param ratio':>19}")
    for prec in PRECISIONS:
        d, p = (next(r for r in rows if r["precision"] == prec and r["model"].startswith(k))["decode_tps"]
                for k in ("dense", "pruned"))
        print(f"{prec:10} {d:11.1f} {p:12.1f} {p / d:8.2f} {p_dense / p_pruned:11.3f} "
              f"{(p / d) / (p_dense / p_pruned):19.2f}")
    print(f"\nreproduce: PYTHONPATH=. python bench/gguf_decode.py --threads {a.threads} --tokens {a.tokens} "
          f"--rounds {a.rounds}"
          + (f" --work {a.work}" if a.work else ""))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
