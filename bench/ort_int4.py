"""ONNX Runtime int4: what HQQ's float zero points cost in speed, and what integer ones cost in quality (issue #15).

MatMulNBits takes zero points as packed uint8 or as floats; HQQ (onnxruntime's quantizer) optimizes a float zero
point per group, and ONNX Runtime 1.32 runs those on a slow path. This exports the model once to ONNX (fp32), then
quantizes that graph several ways, side by side in one run, and measures each in ONNX Runtime against fp32 PyTorch
over `--windows` x 512 held-out tokens (perplexity, KL, top-1) and single-token decode tokens/s:
  hqq-float       onnxruntime's HQQ as it comes: float zero points (what edgekit shipped before)
  hqq-round       HQQ's zero points rounded, scales kept (what plain asymmetric round-to-nearest gives too)
  hqq-fit-all     integer zero points with least-squares scales (exporters/onnxruntime.py integer_zero_fit)
  hqq-fit         edgekit's default: hqq-fit-all, but a matrix where integer zero points would more than double
                  the weight error keeps HQQ's float ones (a checkpoint on a 4-bit offset grid: a dequantized GGUF)
  rtn-sym         symmetric round-to-nearest (no zero points)
Every variant keeps the LM head at int8 and, but hqq-float, runs MatMulNBits at accuracy_level 4 (int8 compute).
Use a model that is not a dequantized 4-bit GGUF: on those (SmolLM2's Q4_1) float zero points recover the grid
exactly and flatter hqq-float.

    PYTHONPATH=. python bench/ort_int4.py --model ~/.cache/edgekit/models/qwen2.5-coder-0.5b-instruct-1d9614638d18
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = ("hqq-float", "hqq-round", "hqq-fit-all", "hqq-fit", "rtn-sym")


def quantize(variant: str, model):
    """The int4 graph of `variant`: edgekit's exporter with one piece swapped."""
    import contextlib
    from unittest import mock

    import torch
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    from edgekit.exporters import onnxruntime as E

    def rounded(w, s, z, top, iters=2):  # HQQ's zero points rounded, its scales kept
        z = z.round().clamp(0, top)
        return torch.round(w / s + z).clamp(0, top), s, z

    real = E.int8_compute
    patches = {"hqq-float": [mock.patch.object(E, "_hqq_integer_zero", lambda: mq.HQQWeightOnlyQuantizer),
                             mock.patch.object(E, "pack_zero_points", lambda m: 0),
                             mock.patch.object(E, "int8_compute", lambda m, bits=8: real(m) if bits == 8 else 0)],
               "hqq-round": [mock.patch.object(E, "integer_zero_fit", rounded),
                             mock.patch.object(E, "FLOAT_ZERO_GAIN", float("inf"))],
               "hqq-fit-all": [mock.patch.object(E, "FLOAT_ZERO_GAIN", float("inf"))]}
    with contextlib.ExitStack() as stack:
        for p in patches.get(variant, []):
            stack.enter_context(p)
        return E.quantize(model, "int4", 32, calibrate=variant != "rtn-sym")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="Hugging Face folder (default: SmolLM2-135M)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the graphs here (default: a temporary folder)")
    a = ap.parse_args()

    import onnx
    import torch

    import quantize_quality as qq
    from edgekit.export import ExportConfig, export_model
    from edgekit.models import resolve_model
    from edgekit.runtime import open_artifact

    torch.set_num_threads(a.threads)
    model_dir = a.model or resolve_model(None).path
    seqs, ref = qq.reference(model_dir, a.windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        base = work / "fp32"
        if not (base / "artifact.json").exists():
            export_model(model_dir, base, ExportConfig(backend="onnxruntime", precision="fp32"), log=lambda *_: None)
        for name in ["fp32", *a.variants.split(",")]:
            out = work / name
            t = 0.0
            if name != "fp32":
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(base, out)
                for f in out.glob("model.onnx*"):
                    f.unlink()
                t = time.perf_counter()
                m, why = quantize(name, onnx.load(str(base / "model.onnx")))
                t = time.perf_counter() - t
                onnx.save(m, str(out / "model.onnx"))
            # the copied artifact.json hashes the fp32 graph: these folders are measured, not shipped
            r = qq.score(open_artifact(out, threads=a.threads, check=False), seqs, ref)
            tps = qq.decode_tps(open_artifact(out, threads=a.threads, all_logits=False, check=False), seqs[0])
            rows.append({"variant": name, **r, "decode_tps": tps, "quantize_s": round(t, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{Path(model_dir).name}, {a.windows} x 512 held-out tokens, {a.threads} threads, one run")
    print(f"{'variant':<10} {'ppl':>8} {'KL':>8} {'top-1':>6} {'decode tok/s':>13} {'quantize s':>11}")
    for r in rows:
        print(f"{r['variant']:<10} {r['ppl']:>8.3f} {r['kl']:>8.4f} {r['top1']:>6.3f} {r['decode_tps']:>13.1f} "
              f"{r['quantize_s']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
