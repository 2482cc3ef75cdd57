"""What each quantized artifact costs in quality, size and speed, side by side, from one run (issue #14).

    PYTHONPATH=. python bench/quantize_quality.py [--model DIR] [--cases a,b,...] [--windows 4] [--threads 2]
                                                  [--work DIR [--reuse]] [--json FILE]

For each case (a backend, a precision and export options; `--cases list` prints them) edgekit exports the model
exactly as `edgekit export` would (gate included, kept even when it fails) and then measures, in the artifact's own
runtime:
  - held-out perplexity over `--windows` windows of 512 tokens of edgekit's held-out text (never calibrated on);
  - mean KL(fp32 PyTorch || artifact) per position over the same tokens, and top-1 agreement;
  - size: the artifact's model files (not its tokenizer, config or reference);
  - decode tokens/s: one token per step after a 32-token prompt, median of 64 steps;
  - the fidelity gate's verdict, with its own KL and top-1 (on the gate's tokens, see edgekit/verify.py).
The default model is SmolLM2-135M (edgekit.models.resolve_model(None)). Every case is a row of CASES: a backend
adds its own rows there.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEQ = 512
NOT_MODEL = ("artifact.json", "reference.npz", "edgekit.log")


@dataclass(frozen=True)
class Case:
    backend: str
    precision: str
    options: dict = field(default_factory=dict)  # ExportConfig fields
    note: str = ""


CASES: dict[str, Case] = {
    "gguf-fp32": Case("gguf", "fp32"),
    "gguf-q8_0": Case("gguf", "q8_0"),
    # the export default for GGUF 4/5-bit: llama.cpp quantizes with edgekit's importance matrix, GPTQ re-rounds
    "gguf-q5_k_m": Case("gguf", "q5_k_m", note="imatrix + GPTQ on llama.cpp's blocks (export default)"),
    "gguf-q5_k_m-rtn": Case("gguf", "q5_k_m", {"calibrate": False}, "llama.cpp round-to-nearest"),
    "gguf-q4_k_m": Case("gguf", "q4_k_m", note="imatrix + GPTQ on llama.cpp's blocks (export default)"),
    "gguf-q4_k_m-imatrix": Case("gguf", "q4_k_m", {"gptq": False}, "imatrix alone (--no-gptq)"),
    "gguf-q4_k_m-rtn": Case("gguf", "q4_k_m", {"calibrate": False}, "llama.cpp round-to-nearest"),
    "gguf-q4_0": Case("gguf", "q4_0", note="imatrix + GPTQ on llama.cpp's blocks (export default)"),
    "gguf-q4_0-rtn": Case("gguf", "q4_0", {"calibrate": False}, "llama.cpp round-to-nearest"),
    # ExecuTorch lowers slowly (SmolLM2: minutes per .pte on 2 cores); context 1024 as android-arm64 builds
    "executorch-fp32": Case("executorch", "fp32", {"context_length": 1024}),
    "executorch-8da4w": Case("executorch", "8da4w", {"context_length": 1024},
                             "GPTQ on the calibration text; head, down, k, v at int8"),
    "executorch-8da4w-rtn": Case("executorch", "8da4w", {"context_length": 1024, "calibrate": False},
                                 "torchao round-to-nearest"),
    "ort-fp32": Case("onnxruntime", "fp32"),
    "ort-int8": Case("onnxruntime", "int8", note="MatMulNBits round-to-nearest, block 32"),
    "ort-int4": Case("onnxruntime", "int4", note="MatMulNBits HQQ, group 32, LM head int8"),
    "ort-int4-rtn": Case("onnxruntime", "int4", {"calibrate": False}, "round-to-nearest (symmetric), group 32"),
    "ort-int4-g64": Case("onnxruntime", "int4", {"group_size": 64}, "HQQ, group 64"),
    "ort-int4-g128": Case("onnxruntime", "int4", {"group_size": 128}, "HQQ, group 128"),
    "ort-int4-g128-rtn": Case("onnxruntime", "int4", {"group_size": 128, "calibrate": False},
                              "round-to-nearest, group 128"),
}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(model_dir: Path, windows: int):
    """Held-out windows and fp32 PyTorch log-probabilities over them."""
    import torch

    from edgekit.data import heldout_text
    from edgekit.models import load_torch_model
    from edgekit.prune.calib import token_sequences

    model, tok = load_torch_model(model_dir)
    seqs = token_sequences(tok, [heldout_text()], SEQ, windows)
    with torch.inference_mode():
        logp = [_log_softmax(model(s[None], use_cache=False).logits[0].float().numpy()) for s in seqs]
    return [s.numpy() for s in seqs], logp


def score(runner, seqs, ref_logp) -> dict:
    nll = kl = top1 = n = 0.0
    for ids, p in zip(seqs, ref_logp):
        runner.reset()
        q = _log_softmax(runner.forward(ids))
        nll -= q[np.arange(len(ids) - 1), ids[1:]].sum()
        kl += (np.exp(p) * (p - q)).sum(-1).sum()
        top1 += (p.argmax(-1) == q.argmax(-1)).sum()
        n += len(ids)
    return {"ppl": math.exp(nll / (n - len(seqs))), "kl": kl / n, "top1": top1 / n}


def decode_tps(runner, ids, steps: int = 64) -> float:
    runner.reset()
    runner.forward(ids[:32])
    times = []
    for i in range(steps):
        t = time.perf_counter()
        runner.forward(ids[32 + i:33 + i])
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def case_key(case: Case) -> dict:
    return {"backend": case.backend, "precision": case.precision, "options": case.options}


def model_bytes(folder: Path) -> int:
    from edgekit.export import COMPANIONS

    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and f.name not in NOT_MODEL + COMPANIONS and not f.name.startswith("tokenizer"))


def run_case(name: str, case: Case, model_dir: Path, work: Path, seqs, ref_logp, threads: int,
             reuse: bool = False) -> dict:
    from edgekit.export import ExportConfig, export_model
    from edgekit.runtime import open_artifact

    out = work / name
    done = work / f"{name}.case.json"  # beside the artifact, never inside it
    if reuse and done.exists() and json.loads(done.read_text())["case"] == case_key(case):
        meta, export_s = (json.loads(done.read_text())[k] for k in ("meta", "export_s"))  # measured again below
    else:
        t = time.perf_counter()
        meta = export_model(model_dir, out, ExportConfig(backend=case.backend, precision=case.precision,
                                                         accept_gate_failure=True, threads=threads, **case.options),
                            log=lambda *_: None)
        export_s = round(time.perf_counter() - t, 1)
        done.write_text(json.dumps({"case": case_key(case), "export_s": export_s, "meta": meta}, default=str))
    row = {"case": name, "backend": case.backend, "precision": case.precision, "note": case.note,
           "export_s": export_s, "size_mb": model_bytes(out) / 2**20}
    runner = open_artifact(out, threads=threads)
    row.update(score(runner, seqs, ref_logp))
    del runner
    row["decode_tps"] = decode_tps(open_artifact(out, threads=threads, all_logits=False), seqs[0])
    g = meta["gate"]
    row.update(gate="pass" if g["passed"] else "FAIL", gate_kl=g["mean_kl"], gate_top1=g["top1_agreement"],
               imatrix=meta.get("imatrix"))
    return row


def table(rows: list[dict], fp32_ppl: float) -> str:
    head = ("case", "ppl", "ppl/fp32", "KL vs fp32", "top-1", "size MB", "decode tok/s", "gate (KL, top-1)", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ppl']:.3f} | {r['ppl'] / fp32_ppl:.3f} | {r['kl']:.4f} | {r['top1']:.3f} | "
                     f"{r['size_mb']:.1f} | {r['decode_tps']:.0f} | {r['gate']} ({r['gate_kl']:.4f}, "
                     f"{r['gate_top1']:.3f}) | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="Hugging Face folder (default: SmolLM2-135M)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names, or 'list'")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the artifacts here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--reuse", action="store_true",
                    help="measure artifacts an earlier run of the same case left in --work instead of re-exporting")
    a = ap.parse_args(argv)
    if a.cases == "list":
        for n, c in CASES.items():
            print(f"{n:24s} {c.backend} {c.precision} {c.options or ''} {c.note}")
        return 0
    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    import torch

    from edgekit.models import resolve_model

    torch.set_num_threads(a.threads)
    model_dir = a.model or resolve_model(None).path
    seqs, ref_logp = reference(model_dir, a.windows)
    fp32_ppl = math.exp(-np.mean([p[np.arange(len(s) - 1), s[1:]].mean() for s, p in zip(seqs, ref_logp)]))
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        rows = []
        for n in names:
            rows.append(run_case(n, CASES[n], Path(model_dir), work, seqs, ref_logp, a.threads, a.reuse))
            print(f"{n}: ppl {rows[-1]['ppl']:.3f} KL {rows[-1]['kl']:.4f} ({rows[-1]['export_s']} s export)",
                  file=sys.stderr, flush=True)
    args = sys.argv[1:] if argv is None else argv
    print(f"`{' '.join(['python bench/quantize_quality.py', *map(shlex.quote, args)])}`"
          f"  model {Path(model_dir).name}, {len(seqs)} x {SEQ} held-out tokens, {a.threads} threads; "
          f"fp32 PyTorch perplexity {fp32_ppl:.3f}\n")
    print(table(rows, fp32_ppl))
    if a.json:
        a.json.write_text(json.dumps({"fp32_ppl": fp32_ppl, "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
