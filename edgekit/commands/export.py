from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from edgekit.exporters import REGISTRY
    from edgekit.precision import PRECISIONS, backends_for

    backends = "\n".join(f"  {s.name:12} {', '.join(s.precisions):24} {s.description}" for s in REGISTRY.values())
    precisions = "\n".join(f"  {p.name:7} {p.bits:5.2f} bits  {', '.join(backends_for(p.name)):32} "
                           f"{'aliases ' + ', '.join(p.aliases) if p.aliases else ''}" for p in PRECISIONS.values())
    p = sub.add_parser("export", help="convert a model into a verified artifact for one backend",
                       description="Convert MODEL for one runtime, then gate it against PyTorch on held-out "
                       "text (max |delta logit|, top-1 agreement, KL, greedy continuation).",
                       epilog=f"backends and precisions:\n{backends}\n\nprecisions (bits per weight with scales, backends):\n"
                       f"{precisions}\n\nexamples:\n"
                       "  edgekit export ./my-llama --backend onnxruntime --precision int8 -o art\n"
                       "  edgekit export --backend onnxruntime -o art     (the embedded SmolLM2-135M)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="Hugging Face folder or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--backend", "-b", required=True, choices=sorted(REGISTRY))
    p.add_argument("--precision", "-p", help="default: the backend's most faithful (any case; aliases such as f32, F16, "
                   "Q4_K_M work; the list below)")
    p.add_argument("-o", "--out", type=Path, required=True, help="artifact folder to write (a new one, or an "
                   "earlier export's, which is replaced)")
    p.add_argument("--force", action="store_true", help="replace -o even if it holds files edgekit did not write")
    p.add_argument("--context", type=int, help="context length the artifact must serve (default: the model's "
                   "positions, at most 2048; more than the model's is refused)")
    p.add_argument("--target", "-t", help="target profile (needed by tensorrt: the engine is tied to its GPU and TensorRT)")
    p.add_argument("--group-size", type=int, help="int4: weights per scale, 32 (default), 64 or 128; it must divide "
                   "the model's widths")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="plain round-to-nearest "
                   "quantization (GGUF: no importance matrix; ONNX Runtime int4: no HQQ)")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None, help="GGUF 4/5-bit: after the "
                   "importance matrix picks each block's scale, re-round the codes by GPTQ on the calibration text "
                   "(default on wherever an importance matrix is; SmolLM2 q4_k_m KL 0.034 -> 0.024); --no-gptq keeps "
                   "the importance matrix alone, a few times faster")
    p.add_argument("--calibration", type=Path, help="text to calibrate quantization on (.txt, .jsonl with a 'text' "
                   "field, or a folder of them; default: edgekit's shipped calibration text)")
    p.add_argument("--kv-cache", help="KV-cache type where the runtime takes one (gguf: f32, f16 or q8_0; q8_0 "
                   "halves an f16 cache for long contexts and is gated like q8_0 weights; default: f32 for float "
                   "weights, f16 for quantized)")
    p.add_argument("--accept-gate-failure", action="store_true", help="keep an artifact that fails the gate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    import edgekit.api
    from edgekit.ui import print_json

    res = edgekit.api.export(a.model, backend=a.backend, out=a.out, precision=a.precision, context=a.context,
                             target=a.target, group_size=a.group_size, calibrate=a.calibrate,
                             gptq=a.gptq, calibration=a.calibration, accept_gate_failure=a.accept_gate_failure,
                             kv_cache=a.kv_cache, force=a.force,
                             verbose=True)
    if a.json:
        print_json(res.to_dict())
    else:
        g = res.gate
        print(f"{a.out}: {res.backend} {res.precision}, gate {'passed' if g.passed else 'FAILED'} "
              f"(max |dlogit| {g.max_abs_logit_delta:.3g}, top-1 {g.top1_agreement:.3f}, "
              f"KL {g.mean_kl:.3g}, greedy {'identical' if g.greedy_match else 'differs'})")
    return 0
