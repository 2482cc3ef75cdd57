"""`edgekit vlm`: vision-language models (task "vlm" in the family registry): image+caption data, pruning of both
towers, export of the vision tower + projector and of the language model."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  edgekit vlm data -o pairs --images 64                       a deterministic image+caption set (shapes, captions)
  edgekit vlm prune ./my-llava --ratio 0.3 --calibration pairs -o pruned
  edgekit vlm prune ./my-llava --ratio 0.2 --keep-vision -o pruned       only the language model is cut
  edgekit vlm prune ./my-llava --ratio 0.3 --vision-heads 12 -o pruned   vision heads (and hidden width) cut too
  edgekit vlm export pruned -b onnxruntime -o art              vision ONNX (gated by cosine) + language artifact
  edgekit vlm export pruned -b gguf -p q8_0 -o art-gguf

Calibration pairs: a folder with captions.jsonl ({"image": "images/0001.png", "text": "a caption"} per line, paths
relative to it) or such a .jsonl file.
"""


def register(sub) -> None:
    from edgekit.exporters import REGISTRY

    p = sub.add_parser("vlm", help="vision-language models (LLaVA, Idefics3, SmolVLM): prune both towers, export "
                       "vision + language",
                       description="Vision-language models: modality-aware pruning of the vision tower and the "
                       "language model, and export of both parts, each gated against PyTorch.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="vlm_command", metavar="SUBCOMMAND", required=True)

    d = s.add_parser("data", help="write a deterministic image+caption set (coloured shapes)")
    d.add_argument("-o", "--out", type=Path, required=True)
    d.add_argument("--images", type=int, default=64, help="how many pairs (default 64)")
    d.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_data)

    q = s.add_parser("prune", help="cut vision MLPs and language MLP/heads/KV groups, scored on image+caption pairs")
    q.add_argument("model", type=Path,
                   help="Hugging Face VLM folder (config.json model_type llava, idefics3 or smolvlm)")
    q.add_argument("--ratio", type=float, required=True, help="fraction of all parameters to remove, in (0, 1)")
    k = q.add_mutually_exclusive_group()
    k.add_argument("--keep-vision", action="store_true", help="leave the vision tower whole (cut the language model)")
    k.add_argument("--keep-language", action="store_true", help="leave the language model whole (cut the vision MLPs)")
    k.add_argument("--vision-share", type=float, help="share of the cut taken from vision, in [0, 1] "
                   "(past a --vision-heads cut; default: searched on caption loss)")
    q.add_argument("--hidden-keep", type=float, default=1.0, help="fraction of the language model's hidden "
                   "channels kept (default 1: the projector's output follows when < 1)")
    q.add_argument("--vision-heads", type=int, help="vision attention heads kept per layer (default: all); the "
                   "vision hidden width is cut with them to heads x head_dim, the projector's input follows")
    q.add_argument("--align", type=int, default=8, help="pruned widths are multiples of this (default 8)")
    q.add_argument("--criterion", default="modality", choices=("modality", "ukmp", "activation"),
                   help="importance: modality (activations on each modality's own tokens, default), ukmp (|w * grad| "
                   "normalized per block and modality) or activation (plain, a baseline)")
    q.add_argument("--calibration", type=Path, help="image+caption pairs (default: generated shapes)")
    q.add_argument("--samples", type=int, default=16, help="calibration pairs (default 16)")
    q.add_argument("-o", "--out", type=Path, required=True)
    q.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_prune)

    t = s.add_parser("distill", help="recover a pruned VLM from the dense one: projector, then vision + projector, "
                     "then the whole model")
    t.add_argument("--teacher", type=Path, required=True, help="the dense VLM folder")
    t.add_argument("--student", type=Path, required=True, help="the pruned VLM folder")
    t.add_argument("--steps", default="30,30,30", help="optimizer steps per phase: projector, vision+projector, "
                   "whole model (default 30,30,30; 0 skips a phase)")
    t.add_argument("--temperature", type=float, default=2.0)
    t.add_argument("--calibration", type=Path, help="image+caption pairs (default: generated shapes)")
    t.add_argument("--samples", type=int, default=32, help="training pairs (default 32; 8 more are held out)")
    t.add_argument("-o", "--out", type=Path, required=True)
    t.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=run_distill)

    pl = s.add_parser("plan", help="will both towers fit the device: weights, KV cache with the image tokens, "
                      "activations (arithmetic on config.json)")
    pl.add_argument("model", type=Path, help="Hugging Face VLM folder (only config.json is read)")
    pl.add_argument("--target", required=True, help="device profile (name or .toml)")
    pl.add_argument("--context", type=int, default=2048, help="positions, image tokens included (default 2048)")
    pl.add_argument("--images", type=int, default=1, help="images per prompt (default 1)")
    pl.add_argument("--backend", "-b", default="onnxruntime", choices=sorted(REGISTRY), help="language backend")
    pl.add_argument("--precision", "-p", help="language precision (default: the backend's most faithful)")
    pl.add_argument("--vision-backend", default="onnxruntime",
                    choices=sorted(n for n, sp in REGISTRY.items() if sp.vision_precisions))
    pl.add_argument("--vision-precision", help="default: the vision backend's most faithful")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=run_plan)

    bn = s.add_parser("bench", help="image-encode latency, TTFT for an image prompt, decode tokens/s of an exported "
                      "VLM folder")
    bn.add_argument("artifact", type=Path, help="the -o folder of `edgekit vlm export`")
    bn.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    bn.add_argument("--prompt-tokens", type=int, default=16, help="text tokens after the image (default 16)")
    bn.add_argument("--new-tokens", type=int, default=16, help="decoded tokens (default 16)")
    bn.add_argument("--threads", type=int, help="runtime threads (default: the runtime's)")
    bn.add_argument("--json", action="store_true")
    bn.set_defaults(func=run_bench)

    e = s.add_parser("export", help="vision tower + projector to ONNX Runtime, the language model to a backend")
    e.add_argument("model", type=Path, help="Hugging Face VLM folder")
    e.add_argument("--backend", "-b", default="onnxruntime", choices=sorted(REGISTRY),
                   help="backend for the language model (default onnxruntime)")
    e.add_argument("--precision", "-p", help="language model precision (default: the backend's most faithful)")
    e.add_argument("--context", type=int, help="context length of the language artifact")
    e.add_argument("--vision-backend", default="onnxruntime",
                   choices=sorted(n for n, sp in REGISTRY.items() if sp.vision_precisions),
                   help="backend for the vision tower + projector (default onnxruntime; gguf = llama.cpp's mmproj, "
                   "with -b gguf; tensorrt = ONNX + the trtexec engine command, with --target)")
    e.add_argument("--vision-precision", help="vision tower precision (default: the vision backend's most faithful)")
    e.add_argument("--target", help="device profile (name or .toml): needed by tensorrt, which ties the engine to it")
    e.add_argument("-o", "--out", type=Path, required=True)
    e.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    e.add_argument("--accept-gate-failure", action="store_true", help="keep an artifact that fails a gate")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_export)


def run_data(a) -> int:
    from edgekit.errors import EdgekitError
    from edgekit.vlm.data import CAPTIONS, generate_pairs

    if a.images < 1 or a.size < 16:
        raise EdgekitError(f"--images {a.images} / --size {a.size} is too small", "pass --images 1+ and --size 16+")
    if a.out.exists() and any(a.out.iterdir()):
        raise EdgekitError(f"{a.out} exists and is not empty", "choose a new folder for -o")
    generate_pairs(a.out, a.images, a.size, a.seed)
    print(f"{a.out}: {a.images} images and {CAPTIONS}")
    return 0


def run_prune(a) -> int:
    from edgekit.fsutil import check_output
    from edgekit.ui import print_json
    from edgekit.vlm.prune import REPORT_FILE, VlmPruneConfig, prune_vlm

    cfg = VlmPruneConfig(ratio=a.ratio, keep_vision=a.keep_vision, keep_language=a.keep_language,
                         vision_share=a.vision_share, hidden_keep=a.hidden_keep, align=a.align,
                         calibration=a.calibration, num_samples=a.samples, criterion=a.criterion,
                         vision_heads=a.vision_heads)
    cfg.check()
    out = check_output(a.out, [a.model], REPORT_FILE, a.force)
    import sys

    r = prune_vlm(a.model, out, cfg, log=lambda m: print(m, file=sys.stderr))
    if a.json:
        print_json(r)
        return 0
    pb, pa, (h0, h1) = r["parts_before"], r["parts_after"], r["vision"]["heads"]
    heads = f" (heads {h0} -> {h1}, hidden {r['vision']['hidden'][0]} -> {r['vision']['hidden'][1]})" if h1 < h0 else ""
    print(f"{a.out}: {r['arch']} parameters {r['params_before']:,} -> {r['params_after']:,} "
          f"({r['removed_fraction']:.1%} removed): vision {pb['vision']:,} -> {pa['vision']:,}{heads}, projector "
          f"{pb['projector']:,} -> {pa['projector']:,}, language {pb['language']:,} -> {pa['language']:,}; "
          f"caption loss {r['dense_search_loss']:.3f} -> {r['pruned_search_loss']:.3f}")
    return 0


def run_distill(a) -> int:
    import sys

    from edgekit.errors import EdgekitError
    from edgekit.fsutil import check_output
    from edgekit.ui import print_json
    from edgekit.vlm.distill import REPORT_FILE, VlmDistillConfig, distill_vlm

    try:
        steps = tuple(int(x) for x in a.steps.split(","))
    except ValueError:
        raise EdgekitError(f"--steps {a.steps!r} is not three comma-separated integers",
                           "e.g. --steps 30,30,30") from None
    cfg = VlmDistillConfig(steps=steps, temperature=a.temperature, calibration=a.calibration, num_samples=a.samples)
    cfg.check()
    out = check_output(a.out, [a.teacher, a.student], REPORT_FILE, a.force)
    r = distill_vlm(a.teacher, a.student, out, cfg, log=lambda m: print(m, file=sys.stderr))
    if a.json:
        print_json(r)
        return 0
    c = r["caption_loss"]
    print(f"{a.out}: " + "; ".join(f"{p['phase']} {p['held_out_loss_before']:.3f} -> {p['held_out_loss_after']:.3f}"
                                   for p in r["phases"])
          + f"; caption loss {c['before']:.3f} -> {c['after']:.3f} (teacher {c['teacher']:.3f})")
    return 0


def run_export(a) -> int:
    import sys

    from edgekit.fsutil import check_output
    from edgekit.ui import print_json
    from edgekit.vlm.export import MANIFEST, VlmExportConfig, export_vlm

    target = None
    if a.target:
        from edgekit.target import get_target

        target = get_target(a.target)
    cfg = VlmExportConfig(language_backend=a.backend, language_precision=a.precision, context_length=a.context,
                          accept_gate_failure=a.accept_gate_failure, vision_backend=a.vision_backend,
                          vision_precision=a.vision_precision, target=target)
    cfg.vision()  # refuse a bad vision backend/precision before any output exists
    out = check_output(a.out, [a.model], MANIFEST, a.force)
    m = export_vlm(a.model, out, cfg,
                   log=lambda s: print(s, file=sys.stderr))
    if a.json:
        print_json(m)
        return 0
    v, lg = m["vision"]["gate"], m["language"]["gate"] or {}
    print(f"{a.out}: vision {m['vision']['backend']} {m['vision']['precision']} gate "
          f"{'passed' if v['passed'] else 'FAILED'} (min cosine "
          f"{v['min_cosine']:.6f}); language {m['language']['backend']} {m['language']['precision']} gate "
          f"{'passed' if lg.get('passed') else 'FAILED'}"
          + (f", image+text gate {'passed' if ig['passed'] else 'FAILED'} (mean KL {ig['mean_kl']:.2e}, top-1 "
             f"{ig['top1_agreement']:.3f})" if (ig := m["language"].get("image_gate")) else "")
          + f"; split vs whole max |dlogit| {m['recomposed']['max_abs_logit_delta']:.2e}")
    return 0


def run_plan(a) -> int:
    import json

    from edgekit.errors import EdgekitError
    from edgekit.target import get_target
    from edgekit.ui import print_json
    from edgekit.vlm.plan import VlmPlanRequest, vlm_memory

    cfg_file = a.model / "config.json" if a.model.is_dir() else a.model
    if not cfg_file.is_file():
        raise EdgekitError(f"{a.model} has no config.json", "pass a Hugging Face VLM folder")
    if a.images < 1 or a.context < 1:
        raise EdgekitError(f"--images {a.images} / --context {a.context} must be positive", "e.g. --images 1")
    m = vlm_memory(json.loads(cfg_file.read_text()), get_target(a.target), VlmPlanRequest(
        context=a.context, images=a.images, language_backend=a.backend, language_precision=a.precision,
        vision_backend=a.vision_backend, vision_precision=a.vision_precision))
    if a.json:
        print_json(m)
        return 0
    mb = 1 / (1 << 20)
    lg, v = m["language"], m["vision"]
    print(f"{m['target']}: {m['total_bytes'] * mb:,.0f} MB of {m['budget_bytes'] * mb:,.0f} MB "
          f"({'fits' if m['fits'] else 'does NOT fit'}): language {a.backend} {m['language_precision']} "
          f"{lg['total_bytes'] * mb:,.1f} MB (weights {lg['weights_bytes'] * mb:,.1f}, KV cache "
          f"{lg['kv_cache_bytes'] * mb:,.1f} of which {m['image_positions']} image positions "
          f"{m['image_kv_cache_bytes'] * mb:,.1f}), vision {a.vision_backend} {m['vision_precision']} weights "
          f"{v['weights_bytes'] * mb:,.1f} MB + one encode {v['activations_bytes'] * mb:,.1f} MB"
          + (f" + runtime {v['runtime_overhead_bytes'] * mb:,.0f} MB" if v["runtime_overhead_bytes"] else ""))
    return 0


def run_bench(a) -> int:
    import sys

    from edgekit.ui import print_json
    from edgekit.vlm.bench import bench_vlm

    r = bench_vlm(a.artifact, a.runs, a.prompt_tokens, a.new_tokens, a.threads, log=lambda s: print(s, file=sys.stderr))
    if a.json:
        print_json(r)
        return 0
    print(f"{a.artifact}: vision {r['vision']['backend']} {r['vision']['precision']}, language "
          f"{r['language']['backend']} {r['language']['precision']}: image encode p50 {r['image_encode_ms']['p50']:.2f} "
          f"ms (p99 {r['image_encode_ms']['p99']:.2f}), TTFT for an image prompt p50 {r['ttft_ms']['p50']:.2f} ms "
          f"({r['ttft_prefill']}), decode {r['decode_tokens_per_s']:.1f} tokens/s")
    return 0
