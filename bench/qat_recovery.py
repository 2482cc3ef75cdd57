"""After a 30% prune, does quantization-aware distillation make a 4-bit student as good as the fp32 one?

SmolLM2-135M-Instruct (edgekit's embedded default) pruned by 30% of parameters with edgekit.prune (widths aligned to
32, the 8da4w group), then, at the same token budget B and with the same data, schedule and loss:
  (a) distill fp32 -> the fp32 student's held-out perplexity;
  (b) the same student, then 4-bit post-training quantization (8da4w: round-to-nearest, and GPTQ as edgekit's
      ExecuTorch exporter calibrates it);
  (c) distill with the last part of the budget as QAT (`distill --qat 8da4w --qat-start F`), then 8da4w on the QAT
      grid (what `edgekit export -b executorch` does with a QAT folder).
Perplexities of (b) and (c) are reported relative to (a); the issue's acceptance is (c) <= 1.05x (a).

`--scheme int4` does the same for ONNX Runtime's 4-bit (MatMulNBits, weight-only, integer zero points, the head at
8 bits): (b) is the fp32 student exported by `edgekit export -p int4` (HQQ) and round-to-nearest on the QAT grid,
(c) the QAT folder exported as `edgekit export` does; the exported rows are scored by ONNX Runtime itself.

The 4-bit numbers are eager torchao (the same IntxUnpacked tensors the exporter lowers; the test
tests/test_qat.py::test_qat_export_lowers_the_scheme_and_matches_the_fake_quant_model shows the .pte from the
ExecuTorch runtime reproduces the fake-quant eager model), scored on the distill held-out blocks.

    PYTHONPATH=. python bench/qat_recovery.py --tokens 16384 --qat-start 0 -o /tmp/qat-bench
    PYTHONPATH=. python bench/qat_recovery.py --scheme int4 --tokens 16384 -o /tmp/qat-bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def log(m: str) -> None:
    print(m, file=sys.stderr, flush=True)


def prune(teacher: Path, out: Path, ratio: float, align: int) -> dict:
    from edgekit.prune.api import prune_model
    from edgekit.prune.config import Budget, PruneConfig

    rep = prune_model(teacher, out, PruneConfig(budget=Budget(ratio=ratio), align=align), log=log)
    return {"removed_fraction": rep["removed_fraction"], "params_before": rep["params_before"],
            "params_after": rep["params_after"], "widths": rep["layers"][0], "align": align}


def ppl_of(model, blocks) -> float:
    from edgekit.distill.train import Dist, perplexity

    return perplexity(model, blocks, 4, Dist())


def ort_ppl(artifact: Path, blocks) -> float:
    """Held-out perplexity of an exported artifact in its own runtime (the same blocks and sum as `ppl_of`)."""
    import math

    import numpy as np
    from quantize_quality import _log_softmax

    from edgekit.runtime import open_artifact
    from edgekit.runtime.base import sequence_logits

    runner = open_artifact(artifact)
    nll = n = 0.0
    for b in blocks:
        ids = b.numpy()
        logp = _log_softmax(sequence_logits(runner, ids)[:-1])
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    return math.exp(nll / n)


def export_ort(folder: Path, out: Path, **kw) -> dict:
    import shutil

    from edgekit.export import ExportConfig, export_model

    if out.exists():
        shutil.rmtree(out)
    return export_model(folder, out, ExportConfig(backend="onnxruntime", precision="int4", accept_gate_failure=True,
                                                  **kw), log=log)


def int4_rows(a, qat_dir: Path, reps, eval_blocks, rows) -> None:
    """(b) and (c) for --scheme int4: exported by edgekit and scored by ONNX Runtime, plus the eager grid rows."""
    import torch

    from edgekit import qat
    from edgekit.models import load_torch_model

    plan = qat.read(qat_dir)
    model, tok = load_torch_model(a.out / "fp32")
    with torch.no_grad():  # the QAT grid without training: round-to-nearest with the fake quantizer's rule
        qat.prepare(model, plan)
        rows.append(("(b) distill, then int4 round-to-nearest on the QAT grid (eager)", ppl_of(model, eval_blocks),
                     reps["fp32"]["tokens"], ""))
    if plan.equalize:  # the same, after the equalization QAT starts with (post-training AWQ-style scaling)
        from edgekit.exporters.executorch import calibration_batches

        model, tok = load_torch_model(a.out / "fp32")
        with torch.no_grad():
            qat.equalize(model, plan, calibration_batches(tok))
            qat.prepare(model, plan)
            rows.append((f"(b) ... equalized (alpha {plan.equalize}), then round-to-nearest (eager)",
                         ppl_of(model, eval_blocks), reps["fp32"]["tokens"], ""))
    t1 = time.perf_counter()
    meta = export_ort(a.out / "fp32", a.out / "ort-int4-fp32")
    rows.append((f"(b) distill, then ONNX Runtime int4 (export default: HQQ), gate "
                 f"{'pass' if meta['gate']['passed'] else 'FAIL'}", ort_ppl(a.out / "ort-int4-fp32", eval_blocks),
                 reps["fp32"]["tokens"], round(time.perf_counter() - t1, 1)))
    q = reps["qat"]["qat"]
    rows.append((f"(c) distill, last {q['steps']} of {reps['qat']['steps']} steps QAT: fake-quant",
                 reps["qat"]["heldout_perplexity"]["after"], reps["qat"]["tokens"], reps["qat"]["wall_s"]))
    t1 = time.perf_counter()
    meta = export_ort(qat_dir, a.out / "ort-int4-qat")
    rows.append((f"(c) ... then edgekit export (ONNX Runtime int4 on the QAT grid), gate "
                 f"{'pass' if meta['gate']['passed'] else 'FAIL'}", ort_ppl(a.out / "ort-int4-qat", eval_blocks),
                 reps["qat"]["tokens"], round(time.perf_counter() - t1, 1)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="8da4w", choices=("8da4w", "int4"),
                    help="the 4-bit scheme: ExecuTorch 8da4w or ONNX Runtime int4")
    ap.add_argument("--tokens", type=int, default=49152, help="token budget B of each distillation")
    ap.add_argument("--qat-start", type=float, default=0.0, help="fraction of B before fake quantization starts")
    ap.add_argument("--qat-init", default="max", choices=("max", "gptq", "learned"),
                    help="how fake quantization starts")
    ap.add_argument("--qat-equalize", type=float, default=None,
                    help="activation-aware equalization exponent before QAT (default: the recipe's)")
    ap.add_argument("--ratio", type=float, default=0.30)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward (a GPU takes the batch)")
    ap.add_argument("--checkpoint-every", type=int, default=8, help="steps between resumable checkpoints")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--no-gptq", action="store_true", help="skip the GPTQ row of (b)")
    ap.add_argument("-o", "--out", type=Path, default=Path("/tmp/qat-bench"))
    a = ap.parse_args()

    from edgekit.distill import DataConfig, DistillConfig, OptimConfig, distill
    from edgekit.distill.data import load_blocks
    from edgekit.fsutil import atomic_write_json
    from edgekit.models import load_torch_model, resolve_model

    teacher = resolve_model(None).path
    a.out.mkdir(parents=True, exist_ok=True)
    student = a.out / f"pruned-{a.ratio}"
    t0 = time.perf_counter()
    if not (student / "config.json").exists():
        atomic_write_json(a.out / "prune.json", prune(teacher, student, a.ratio, 32))
    info = json.loads((a.out / "prune.json").read_text())
    log(f"pruned in {time.perf_counter() - t0:.0f}s: {info}")

    base = dict(tokens=a.tokens, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size,
                checkpoint_every=a.checkpoint_every,
                data=DataConfig(block_size=a.block_size, max_eval_blocks=a.eval_blocks), optim=OptimConfig(lr=a.lr))
    runs = {"fp32": DistillConfig(**base),
            "qat": DistillConfig(**base, qat=a.scheme, qat_start=a.qat_start, qat_init=a.qat_init,
                                 qat_equalize=a.qat_equalize)}
    reps = {}
    eq = runs["qat"].qat_plan().equalize
    dirs = {"fp32": "fp32", "qat": ("qat" if a.scheme == "8da4w" else f"qat-{a.scheme}") + (f"-eq{eq}" if eq else "")}
    for name, cfg in runs.items():
        done = a.out / dirs[name] / "distill.json"
        new = json.loads(json.dumps(cfg.to_dict()))
        old = json.loads(done.read_text())["config"] if done.exists() else None
        if old is not None:  # float runs predate the QAT fields; batch split and checkpoints do not change the training
            same = {k: new[k] for k in ("micro_batch_size", "checkpoint_every", "keep_checkpoints")}
            old = {**(new if name == "fp32" else {}), **old, **same}
        if old == new:
            reps[name] = json.loads(done.read_text())
            log(f"{name}: reusing {done.parent}")
            continue
        t1 = time.perf_counter()
        rep = distill(teacher, student, a.out / dirs[name], cfg, log=log, progress=False)
        rep["wall_s"] = round(time.perf_counter() - t1, 1)
        atomic_write_json(done, rep)
        reps[name] = rep

    model, tok = load_torch_model(a.out / "fp32")
    eval_blocks = load_blocks(tok, a.block_size).heldout[: a.eval_blocks]
    rows = []
    ppl_a = ppl_of(model, eval_blocks)  # == reps["fp32"]["heldout_perplexity"]["after"]
    rows.append(("(a) distill, fp32", ppl_a, reps["fp32"]["tokens"], reps["fp32"]["wall_s"]))
    if a.scheme == "int4":
        int4_rows(a, a.out / dirs["qat"], reps, eval_blocks, rows)
    else:
        eight_da_4w_rows(a, a.out / dirs["qat"], reps, eval_blocks, rows, model)
    finish(a, info, reps, rows, ppl_a, eval_blocks)
    return 0


def eight_da_4w_rows(a, qat_dir: Path, reps, eval_blocks, rows, model) -> None:
    import torch

    from edgekit import qat
    from edgekit.exporters.executorch import calibration_batches, quantize_8da4w
    from edgekit.models import load_torch_model

    with torch.no_grad():
        quantize_8da4w(model)
    rows.append(("(b) distill, then 8da4w round-to-nearest", ppl_of(model, eval_blocks), reps["fp32"]["tokens"], ""))
    if not a.no_gptq:
        model, tok = load_torch_model(a.out / "fp32")
        t1 = time.perf_counter()
        with torch.no_grad():
            quantize_8da4w(model, calibration=calibration_batches(tok))
        rows.append(("(b) distill, then 8da4w GPTQ (export default)", ppl_of(model, eval_blocks),
                     reps["fp32"]["tokens"], round(time.perf_counter() - t1, 1)))
    q = reps["qat"]["qat"]
    plan = qat.read(qat_dir)
    model, _ = load_torch_model(qat_dir)
    rows.append((f"(c) distill, last {q['steps']} of {reps['qat']['steps']} steps QAT "
                 f"({q.get('init', 'max')} start): fake-quant",
                 reps["qat"]["heldout_perplexity"]["after"], reps["qat"]["tokens"], reps["qat"]["wall_s"]))
    with torch.no_grad():
        quantize_8da4w(model, group_size=plan.group_size, qat=plan, qat_scales=qat.load_scales(qat_dir))
    rows.append(("(c) ... then 8da4w on the QAT grid (export)", ppl_of(model, eval_blocks), reps["qat"]["tokens"], ""))


def finish(a, info, reps, rows, ppl_a, eval_blocks) -> None:
    from edgekit.fsutil import atomic_write_json

    t_ppl = reps["fp32"]["heldout_perplexity"]["teacher"]
    result = {"prune": info, "teacher_ppl": t_ppl, "pruned_ppl": reps["fp32"]["heldout_perplexity"]["before"],
              "rows": [{"model": r[0], "ppl": round(r[1], 4), "x_fp32_student": round(r[1] / ppl_a, 4),
                        "tokens": r[2], "wall_s": r[3]} for r in rows], "settings": vars(a) | {"out": str(a.out)}}
    c = result["rows"][-1]["x_fp32_student"]
    result["acceptance_c_le_1.05x"] = c <= 1.05
    atomic_write_json(a.out / "results.json", result)
    print(f"\nSmolLM2-135M-Instruct pruned {info['removed_fraction']:.1%} (align 32), held-out perplexity "
          f"({len(eval_blocks)} blocks x {a.block_size} tokens of edgekit's held-out text); teacher {t_ppl:.3f}, "
          f"pruned {result['pruned_ppl']:.3f}; budget B = {a.tokens:,} tokens, lr {a.lr}, batch {a.batch_size}; "
          + ("4-bit = 8da4w eager torchao" if a.scheme == "8da4w" else "4-bit = ONNX Runtime int4 (MatMulNBits)"))
    print(f"{'model':<62} {'ppl':>9} {'x (a)':>7} {'tokens':>8} {'wall s':>8}")
    for r in result["rows"]:
        print(f"{r['model']:<62} {r['ppl']:>9.3f} {r['x_fp32_student']:>7.3f} {r['tokens']:>8,} {str(r['wall_s']):>8}")
    print(f"(c) <= 1.05x (a): {result['acceptance_c_le_1.05x']} ({c:.3f}x)")
    print(f"reproduce: PYTHONPATH=. python bench/qat_recovery.py --scheme {a.scheme} --tokens {a.tokens} "
          f"--qat-start {a.qat_start} --qat-init {a.qat_init} "
          f"--qat-equalize {reps['qat']['qat'].get('equalize', 0.0)} "
          f"--ratio {a.ratio} --lr {a.lr} --batch-size {a.batch_size} --block-size {a.block_size} "
          f"--eval-blocks {a.eval_blocks} --micro-batch-size {a.micro_batch_size} "
          f"--checkpoint-every {a.checkpoint_every} -o {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
