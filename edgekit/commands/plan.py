from __future__ import annotations

import argparse

EPILOG = """\
how it decides:
  memory = weights + KV cache (layers x KV heads x head_dim x context x 2 x bytes x batch)
           + activations of one prefill chunk + runtime overhead, against RAM minus the OS reserve (minus headroom)
  decode tokens/s ~ memory bandwidth x efficiency / bytes read per token (weights + half the cache)
  It keeps the target's preferred precision when that fits, quantizes further when it must, and prunes only when
  quantization alone cannot fit (or cannot reach --min-decode-tps).

examples:
  edgekit plan --target jetson-orin
  edgekit plan --target raspberry-pi-5 ./my-llama --context 4096 --min-decode-tps 20
  edgekit plan --target my-board.toml --json
"""


def register(sub) -> None:
    p = sub.add_parser("plan", help="will it fit, and how fast will it decode? (no model is loaded)",
                       description="Compute what compression MODEL needs to fit on a target.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="Hugging Face folder or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--backend", "-b", help="override the target's backend")
    p.add_argument("--precision", "-p", help="pin the precision instead of letting the planner choose (any case; "
                   "aliases such as f32 or Q4_K_M work)")
    p.add_argument("--context", type=int, help="context length (default: the target's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--min-decode-tps", type=float, help="decode-speed goal in tokens/s")
    p.add_argument("--kv-cache", help="KV-cache type (gguf: f32, f16, q8_0; default: the runtime's, "
                   "or q8_0 when only that fits the context)")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of free memory kept free (0.10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    from edgekit.commands import check_numbers
    from edgekit.errors import EdgekitError
    from edgekit.models import resolve_model
    from edgekit.plan import PlanRequest, default_context, make_plan
    from edgekit.target import get_target
    from edgekit.ui import print_json, table

    check_numbers(a, {"context": (1, None), "batch": (1, None), "min_decode_tps": (1e-6, None), "headroom": (0, 0.9)})
    target = get_target(a.target)
    model = resolve_model(a.model)
    if not 0 <= a.headroom < 1:
        raise EdgekitError(f"--headroom must be in [0, 1), got {a.headroom}", "e.g. --headroom 0.1")
    req = PlanRequest(context=a.context or default_context(target, model.config), batch=a.batch,
                      min_decode_tps=a.min_decode_tps, headroom=a.headroom,
                      kv_cache=a.kv_cache)
    plan = make_plan(model.config, target, req, backend=a.backend, precision=a.precision)
    if a.json:
        print_json(plan.to_dict())
        return 0
    gib = 2**30
    rows = [(c["precision"] + (f" + {c['kv_cache']} KV" if c["kv_cache"] else ""), f"{c['prune_ratio']:.0%}", f"{c['weights_bytes'] / gib:.3f}",
             f"{c['kv_cache_bytes'] / gib:.3f}", f"{c['activations_bytes'] / gib:.3f}",
             f"{c['runtime_overhead_bytes'] / gib:.3f}", f"{c['total_bytes'] / gib:.3f}",
             f"{c['decode_tps_estimate']:.0f}", "yes" if c["fits_memory"] and c["meets_speed"] else "no")
            for c in plan.candidates]
    table(f"plan: {model.source} on {target.name} ({plan.backend}, context {req.context}, batch {req.batch}; "
          f"budget {plan.budget_bytes / gib:.2f} GiB of {plan.available_bytes / gib:.2f} free)", rows,
          ("precision", "pruned", "weights GiB", "KV GiB", "activ. GiB", "runtime GiB", "total GiB", "decode tok/s",
           "fits"))
    prune = f" + prune {plan.prune_ratio:.0%} of parameters" if plan.prune_ratio else ""
    kv = f" --kv-cache {plan.kv_cache}" if plan.kv_cache else ""
    print(f"choice: {plan.precision}{prune}{kv}: {plan.reason}")
    return 0
