"""`edgekit vision`: image towers alone (task "vision-encoder" in the family registry: CLIP / SigLIP vision models,
ViT): widthwise pruning of their MLPs and export to ONNX Runtime, ExecuTorch or TensorRT, gated on embeddings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  edgekit vision prune ./clip-vision --ratio 0.3 -o pruned        MLP neurons of every layer, one uniform width
  edgekit vision prune ./clip-vision --ratio 0.5 --heads 9 -o pruned   9 heads per layer, hidden 9 x head_dim
  edgekit vision export pruned -b onnxruntime -o art               ONNX, gated on token features + pooled embedding
  edgekit vision export pruned -b executorch -o art-pte            a .pte run by ExecuTorch's runtime
  edgekit vision export pruned -b tensorrt -p fp16 --target jetson-orin -o art-trt

A whole CLIP or SigLIP checkpoint holds a text tower too: save its vision_model alone (CLIPVisionModel /
SiglipVisionModel.from_pretrained(...).save_pretrained) with its image processor.
"""


def register(sub) -> None:
    from edgekit.vision.export import BACKENDS

    p = sub.add_parser("vision", help="image towers (CLIP / SigLIP vision, ViT): prune MLPs, export gated",
                       description="Image towers alone: widthwise pruning and export, each gated on embeddings "
                       "against PyTorch.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="vision_command", metavar="SUBCOMMAND", required=True)

    q = s.add_parser("prune", help="cut MLP neurons to one uniform width, scored on calibration images")
    q.add_argument("model", type=Path, help="Hugging Face image-tower folder (clip_vision_model, siglip_vision_model, "
                   "vit)")
    q.add_argument("--ratio", type=float, required=True, help="fraction of the tower's parameters to remove, in (0, 1)")
    q.add_argument("--align", type=int, default=8, help="the pruned width is a multiple of this (default 8)")
    q.add_argument("--heads", type=int, help="attention heads kept per layer (default: all); the hidden width is cut "
                   "with them to heads x head_dim, counted in --ratio, MLP neurons make up the rest")
    q.add_argument("--calibration", type=Path, help="image+caption pairs, captions unused (default: generated shapes)")
    q.add_argument("--samples", type=int, default=32, help="calibration images (default 32)")
    q.add_argument("--no-refit", action="store_true", help="skip the least-squares refit of the down projections")
    q.add_argument("-o", "--out", type=Path, required=True)
    q.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_prune)

    e = s.add_parser("export", help="export the tower, gated on its token features and pooled embedding")
    e.add_argument("model", type=Path, help="Hugging Face image-tower folder")
    e.add_argument("--backend", "-b", default="onnxruntime", choices=BACKENDS, help="default onnxruntime")
    e.add_argument("--precision", "-p", help="default: the backend's most faithful")
    e.add_argument("--target", help="device profile (name or .toml): tensorrt ties the engine to it")
    e.add_argument("-o", "--out", type=Path, required=True)
    e.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    e.add_argument("--accept-gate-failure", action="store_true", help="keep an artifact that fails its gate")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_export)


def run_prune(a) -> int:
    from edgekit.fsutil import check_output
    from edgekit.ui import print_json
    from edgekit.vision.prune import REPORT_FILE, VisionPruneConfig, prune_vision_encoder

    cfg = VisionPruneConfig(ratio=a.ratio, align=a.align, calibration=a.calibration, num_samples=a.samples,
                            refit=not a.no_refit, heads=a.heads)
    cfg.check()
    out = check_output(a.out, [a.model], REPORT_FILE, a.force)
    r = prune_vision_encoder(a.model, out, cfg, log=lambda m: print(m, file=sys.stderr))
    if a.json:
        print_json(r)
        return 0
    h, (h0, h1), (d0, d1) = r["held_out"], r["num_attention_heads"], r["hidden_size"]
    print(f"{a.out}: {r['arch']} parameters {r['params_before']:,} -> {r['params_after']:,} "
          f"({r['removed_fraction']:.1%} removed), MLP width {r['intermediate_size'][0]} -> "
          f"{r['intermediate_size'][1]}" + (f", heads {h0} -> {h1} (hidden {d0} -> {d1})" if h1 < h0 else "") +
          f"; held-out pooled-embedding cosine to the dense tower {h['pooled_mean_cosine']:.4f} "
          f"(tokens {h['token_mean_cosine']:.4f})")
    return 0


def run_export(a) -> int:
    from edgekit.fsutil import check_output
    from edgekit.ui import print_json
    from edgekit.vision.export import MANIFEST, VisionExportConfig, export_vision_encoder

    target = None
    if a.target:
        from edgekit.target import get_target

        target = get_target(a.target)
    cfg = VisionExportConfig(backend=a.backend, precision=a.precision, target=target,
                             accept_gate_failure=a.accept_gate_failure)
    cfg.resolved()  # a bad precision is refused before any output exists
    out = check_output(a.out, [a.model], MANIFEST, a.force)
    m = export_vision_encoder(a.model, out, cfg, log=lambda s: print(s, file=sys.stderr))
    if a.json:
        print_json(m)
        return 0
    outs = m["gate"].get("outputs", {})
    print(f"{a.out}: {m['arch']} -> {m['backend']} {m['precision']} gate "
          f"{'passed' if m['gate']['passed'] else 'FAILED'}: " + ", ".join(
              f"{n} min cosine {c['min_cosine']:.6f} max |delta| {c['max_abs_delta']:.1e}" for n, c in outs.items()))
    return 0
