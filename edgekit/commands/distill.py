from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
Student = the pruned model, teacher = the original (same vocabulary). The student is never a quantized model:
edgekit's order is prune -> distill -> quantize.

examples:
  edgekit distill --student pruned/ --tokens 200000 -o recovered        teacher = embedded SmolLM2-135M
  edgekit distill --teacher orig/ --student pruned/ --data corpus/ --steps 500 -o recovered
  edgekit distill ... --top-k 64 --teacher-cache                         skip the teacher on later epochs/resumes
  edgekit distill ... --hidden-weight 1 --hidden-layers 8:8,16:16        also match hidden states
  edgekit distill ... --qat 8da4w --qat-start 0.5                      the second half as quantization-aware
                                                                         training; export lowers 8da4w on that grid
  edgekit distill ... --qat int4                                         QAT for ONNX Runtime's 4-bit MatMulNBits
  torchrun --nproc_per_node 2 -m edgekit distill ...                     data-parallel (gloo on CPU, NCCL on GPU)

Checkpoints go to OUT.ckpt/ every --checkpoint-every steps; rerun the same command to resume exactly.
"""


def register(sub) -> None:
    p = sub.add_parser("distill", help="recover a pruned model's quality by distilling from the original",
                       description="Knowledge distillation: train STUDENT to match TEACHER's next-token "
                       "distributions on text; resumable, and data-parallel under torchrun.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="the original model: HF folder or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--student", required=True, help="the pruned model: HF folder sharing the teacher's vocabulary")
    p.add_argument("--data", type=Path, help=".txt/.jsonl file or folder (default: edgekit's shipped corpus)")
    p.add_argument("--heldout", type=Path, help="held-out text for perplexity (default: a fraction of --data)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--tokens", type=int, help="token budget (student training tokens)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output model folder (standard HF folder; a new "
                   "one, or an earlier distill's, which is replaced)")
    p.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    p.add_argument("--config", type=Path, help="JSON file of DistillConfig fields; flags given override it")
    g = p.add_argument_group("loss")
    g.add_argument("--kd-weight", type=float, help="weight of the logit KL (default 1)")
    g.add_argument("--temperature", type=float, nargs="+", metavar="T",
                   help="T, or START END for a schedule over training (default 1)")
    g.add_argument("--temperature-schedule", choices=("linear", "cosine", "constant"))
    g.add_argument("--top-k", type=int, help="KL over the teacher's top-k logits only (default 0 = full vocab)")
    g.add_argument("--hidden-weight", type=float, help="weight of the hidden-state loss (default 0 = off)")
    g.add_argument("--hidden-loss", choices=("cosine", "mse"))
    g.add_argument("--hidden-layers", help="student:teacher hidden-state index pairs, e.g. 8:8,16:16,30:30")
    g.add_argument("--ce-weight", type=float, help="weight of the next-token cross-entropy mixed into KD (default 1; 0 = pure KD)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, help="global batch in sequences (default 8)")
    g.add_argument("--micro-batch-size", type=int, help="sequences per forward pass per process (default 4)")
    g.add_argument("--block-size", type=int, help="tokens per sequence (default 256)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    g.add_argument("--warmup", type=float, help="warmup fraction of steps (default 0.05)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="max gradient norm (default 1; 0 = off)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("quantization-aware training (the last training step; export then lowers the scheme)")
    g.add_argument("--qat", metavar="SCHEME", help="train through this precision's fake quantization (8da4w for "
                   "ExecuTorch, int4 for ONNX Runtime); the output records it in qat.json and export quantizes on "
                   "the same grid")
    g.add_argument("-b", "--backend", help="the backend that will lower the scheme (default: the first declaring it)")
    g.add_argument("--group-size", type=int, help="weights per quantization scale (default 32)")
    g.add_argument("--qat-start", type=float, help="fraction of the steps before fake quantization starts "
                   "(default 0: the whole run)")
    g.add_argument("--qat-init", choices=("max", "gptq", "learned"), help="how fake quantization starts: max "
                   "(default, torchao's rule) re-derives the scales from max |w| at every step; gptq rounds the "
                   "student onto the grid by GPTQ on the calibration text and keeps those scales (measured worse on "
                   "SmolLM2); learned starts from max's scales and trains them with the weights (LSQ). "
                   "docs/distill.md has the measurements")
    g.add_argument("--qat-equalize", type=float, metavar="ALPHA", help="before training, fold activation-aware "
                   "scales (mean |x|^ALPHA per input channel, AWQ's rule) into gate/up and o, dividing the norm and v "
                   "before them: the same function on a finer grid where activations are large (default: the "
                   "recipe's, 0.25 for "
                   "int4; 0 = off, 8da4w's default: it measured worse there)")
    g = p.add_argument_group("checkpoints and cache")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 50)")
    g.add_argument("--checkpoint-dir", type=Path, help="default: OUT.ckpt next to OUT")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints after success")
    g.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    g.add_argument("--teacher-cache", action="store_true", help="cache the teacher's top-k logits on disk")
    g.add_argument("--cache-dir", type=Path, help="where the teacher cache lives (default: CHECKPOINT_DIR/teacher-cache)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run)


def config_from_args(a):
    from edgekit.distill.config import DistillConfig
    from edgekit.errors import EdgekitError

    base = {}
    if a.config:
        try:
            base = json.loads(Path(a.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgekitError(f"cannot read --config {a.config}: {e}", "pass a JSON file of DistillConfig fields")
    loss, data, optim = dict(base.pop("loss", {})), dict(base.pop("data", {})), dict(base.pop("optim", {}))
    top = {"steps": a.steps or 0, "tokens": a.tokens or 0, "batch_size": a.batch_size,
           "micro_batch_size": a.micro_batch_size, "seed": a.seed, "checkpoint_every": a.checkpoint_every,
           "teacher_cache": a.teacher_cache or None}
    base.update({k: v for k, v in top.items() if v is not None})
    qat = {"qat": a.qat, "qat_backend": a.backend, "qat_group_size": a.group_size, "qat_start": a.qat_start,
           "qat_init": a.qat_init, "qat_equalize": a.qat_equalize}
    if not a.qat and any(v is not None for v in qat.values()):
        raise EdgekitError("--backend, --group-size, --qat-start, --qat-init and --qat-equalize only apply to "
                           "quantization-aware training",
                           "add --qat SCHEME (e.g. --qat 8da4w), or drop them")
    base.update({k: v for k, v in qat.items() if v is not None})
    if a.temperature:
        if len(a.temperature) > 2:
            raise EdgekitError("--temperature takes T or START END", "e.g. --temperature 1 2")
        loss["temperature_start"], loss["temperature_end"] = a.temperature[0], a.temperature[-1]
    if a.hidden_layers:
        try:
            loss["hidden_layers"] = [tuple(int(x) for x in pair.split(":")) for pair in a.hidden_layers.split(",")]
            assert all(len(p) == 2 for p in loss["hidden_layers"])
        except (ValueError, AssertionError):
            raise EdgekitError(f"cannot read --hidden-layers {a.hidden_layers!r}", "write pairs like 8:8,16:16")
    for k, v in {"kd_weight": a.kd_weight, "temperature_schedule": a.temperature_schedule, "top_k": a.top_k,
                 "hidden_weight": a.hidden_weight, "hidden_loss": a.hidden_loss, "ce_weight": a.ce_weight}.items():
        if v is not None:
            loss[k] = v
    if a.block_size is not None:
        data["block_size"] = a.block_size
    for k, v in {"lr": a.lr, "warmup_fraction": a.warmup, "weight_decay": a.weight_decay,
                 "grad_clip": a.grad_clip}.items():
        if v is not None:
            optim[k] = v
    return DistillConfig.from_dict({**base, "loss": loss, "data": data, "optim": optim})


def run(a) -> int:
    from edgekit.commands import check_numbers

    check_numbers(a, {"steps": (1, None), "tokens": (1, None), "kd_weight": (0, None), "top_k": (0, None), "hidden_weight": (0, None), "ce_weight": (0, None), "batch_size": (1, None), "micro_batch_size": (1, None), "block_size": (2, None), "lr": (0, 1), "warmup": (0, 1), "weight_decay": (0, None), "grad_clip": (0, None), "checkpoint_every": (0, None), "group_size": (2, None), "qat_start": (0, 0.999)})
    from edgekit.distill import distill
    from edgekit.distill.train import REPORT
    from edgekit.errors import EdgekitError
    from edgekit.fsutil import check_output
    from edgekit.models import resolve_model
    from edgekit.ui import log, print_json, table

    cfg = config_from_args(a)
    cfg.validate()  # bad settings fail before any model loads (the loop re-checks with the process count)
    if a.data is not None and not Path(a.data).exists():
        raise EdgekitError(f"data path not found: {a.data}", "pass a .txt or .jsonl file or a folder of them")
    teacher = resolve_model(a.teacher).path
    student = Path(a.student)
    if not student.exists():
        raise EdgekitError(f"student not found: {student}", "pass the pruned model's folder")
    check_output(a.out, [teacher, student] + ([a.data] if a.data else []), REPORT, a.force)
    report = distill(teacher, student, a.out, cfg, data=a.data, heldout=a.heldout, checkpoint_dir=a.checkpoint_dir,
                     cache_dir=a.cache_dir, fresh=a.fresh, keep_checkpoints=a.keep_checkpoints, log=log)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if a.json:
        print_json(report)
    else:
        ppl = report["heldout_perplexity"]
        table(f"distill -> {a.out}", [
            ("held-out perplexity, teacher", f"{ppl['teacher']:.3f}"),
            ("held-out perplexity, student before", f"{ppl['before']:.3f}"),
            ("held-out perplexity, student after", f"{ppl['after']:.3f} ({ppl['after_over_teacher']:.3f}x teacher)"),
            ("steps / tokens", f"{report['steps']} / {report['tokens']:,}"),
            ("train time / tokens/s", f"{report['train_seconds']:.1f}s / {report['tokens_per_s']}"),
            ("processes", report["processes"])]
            + ([("QAT", f"{report['qat']['scheme']} for {report['qat']['backend']}, group "
                        f"{report['qat']['group_size']}, last {report['qat']['steps']} steps (after = fake-quantized)")]
               if report.get("qat") else []), ("metric", "value"))
    return 0
