from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
structures: MLP neurons (gate/up/down together), query heads inside each KV group and whole KV groups (GQA-correct,
head_dim and RoPE untouched), hidden channels (embeddings, every norm, every projection, the LM head).
After the cut, each layer's o_proj and down_proj are refitted in closed form (least squares on the calibration
text) so the pruned layers write what the dense ones did; --no-reconstruct skips that. No gradient training here:
recover further with `edgekit distill`.

examples:
  edgekit prune ./my-llama --ratio 0.25 -o pruned              uniform: a plain HF folder (from_pretrained loads it)
  edgekit prune --ratio 0.5 --criterion taylor -o out           the embedded SmolLM2-135M
  edgekit prune ./m --ratio 0.3 --non-uniform --protect 0,1 -o out
  edgekit prune ./m --params 100000000 --align 256 -o out       keep 100M parameters, widths for GGUF K-quants
  edgekit prune ./m --ratio 0.3 --calibration my-texts/ -o out  .txt / .jsonl ({"text": ...}) files
"""


def register(sub) -> None:
    from edgekit.prune.criteria import CRITERIA

    p = sub.add_parser("prune", help="remove MLP neurons, attention heads and hidden channels (no retraining)",
                       description="Structured widthwise pruning of a Llama / Qwen2 / Mistral model, scored on "
                       "calibration text. Writes a standard Hugging Face folder and a per-layer report.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="Hugging Face folder or .gguf (default: embedded SmolLM2-135M)")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--ratio", type=float, help="fraction of parameters to remove, in (0, 1)")
    b.add_argument("--params", type=int, help="parameters to keep")
    b.add_argument("--bytes", type=int, help="size to fit, at --bytes-per-param (default 4: fp32)")
    p.add_argument("--bytes-per-param", type=float, default=4.0)
    p.add_argument("--criterion", default="activation", choices=list(CRITERIA), help="importance (default activation)")
    p.add_argument("--non-uniform", action="store_true", help="per-layer widths: narrow the layers where the "
                   "cut is predicted to cost the least loss (a Fisher-weighted refit error, ~1 extra backward pass)")
    p.add_argument("--align", type=int, default=8, help="pruned widths are multiples of this (default 8; 256 for "
                   "GGUF K-quants; the group size for 8da4w)")
    p.add_argument("--hidden-keep", type=float, help="fraction of hidden channels kept (default: searched)")
    p.add_argument("--attn-weight", type=float, default=1.0, help="non-uniform: >1 keeps more attention vs MLP")
    p.add_argument("--protect", default="", help="non-uniform: comma-separated layer indices left dense")
    p.add_argument("--calibration", type=Path, help=".txt/.jsonl file or folder (default: shipped text)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--no-reconstruct", action="store_true", help="skip the least-squares refit of o_proj/down_proj "
                   "on the calibration text (faster; worse without recovery training)")
    p.add_argument("-o", "--out", type=Path, required=True, help="folder to write (a new one, or an earlier "
                   "prune's, which is replaced)")
    p.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def config_from_args(a):
    from edgekit.errors import EdgekitError
    from edgekit.prune import Budget, PruneConfig

    try:
        protect = tuple(int(x) for x in a.protect.split(",") if x.strip())
    except ValueError:
        raise EdgekitError(f"--protect takes comma-separated layer numbers, got {a.protect!r}", "e.g. --protect 0,1")
    return PruneConfig(budget=Budget(ratio=a.ratio, params=a.params, bytes=a.bytes, bytes_per_param=a.bytes_per_param),
                       criterion=a.criterion, non_uniform=a.non_uniform, align=a.align, hidden_keep=a.hidden_keep,
                       attn_weight=a.attn_weight, protected_layers=protect, calibration=a.calibration,
                       num_samples=a.samples, seq_len=a.seq_len, reconstruct=not a.no_reconstruct)


def run(a) -> int:
    from edgekit.commands import check_numbers

    check_numbers(a, {"ratio": (0, 1), "params": (1, None), "bytes": (1, None), "bytes_per_param": (1e-3, 64), "align": (1, 4096), "hidden_keep": (0, 1), "attn_weight": (0, None), "samples": (1, None), "seq_len": (2, None)})
    from edgekit.fsutil import check_output
    from edgekit.models import resolve_model
    from edgekit.prune import prune_model
    from edgekit.prune.api import REPORT_FILE
    from edgekit.prune.report import table_rows
    from edgekit.ui import log, print_json, table

    cfg = config_from_args(a)
    cfg.check()
    if cfg.budget.ratio is not None:
        cfg.budget.removed(100)  # a bad ratio fails before the model is read
    model = resolve_model(a.model)
    check_output(a.out, [model.path] + ([a.calibration] if a.calibration else []), REPORT_FILE, a.force)
    report = prune_model(model.path, a.out, cfg, log=log)
    if a.json:
        print_json(report)
        return 0
    table(f"{a.out}: {report['arch']} pruned with {cfg.criterion} ({'uniform' if report['uniform'] else 'non-uniform'}"
          f", hidden {report['hidden_size']['before']} -> {report['hidden_size']['after']})", table_rows(report),
          ("layer", "intermediate", "heads", "kv heads", "params"))
    print(f"parameters {report['params_before']:,} -> {report['params_after']:,} "
          f"({report['removed_fraction']:.1%} removed); calibration loss {report['dense_search_loss']:.3f} -> "
          + (f"{report['cut_search_loss']:.3f} cut -> " if "cut_search_loss" in report else "")
          + f"{report['pruned_search_loss']:.3f}")
    return 0
