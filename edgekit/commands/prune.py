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


def run(a) -> int:
    import edgekit.api
    from edgekit.prune.report import table_rows
    from edgekit.ui import print_json, table

    res = edgekit.api.prune(a.model, out=a.out, ratio=a.ratio, params=a.params, bytes=a.bytes,
                            bytes_per_param=a.bytes_per_param, criterion=a.criterion, non_uniform=a.non_uniform,
                            align=a.align, hidden_keep=a.hidden_keep, attn_weight=a.attn_weight, protect=a.protect,
                            calibration=a.calibration, samples=a.samples, seq_len=a.seq_len,
                            reconstruct=not a.no_reconstruct, force=a.force, verbose=True)
    report = res.report
    if a.json:
        print_json(res.to_dict())
        return 0
    table(f"{a.out}: {report['arch']} pruned with {a.criterion} ({'uniform' if res.uniform else 'non-uniform'}"
          f", hidden {report['hidden_size']['before']} -> {report['hidden_size']['after']})", table_rows(report),
          ("layer", "intermediate", "heads", "kv heads", "params"))
    print(f"parameters {res.params_before:,} -> {res.params_after:,} "
          f"({res.removed_fraction:.1%} removed); calibration loss {res.dense_loss:.3f} -> "
          + (f"{report['cut_search_loss']:.3f} cut -> " if "cut_search_loss" in report else "")
          + f"{res.pruned_loss:.3f}")
    return 0
