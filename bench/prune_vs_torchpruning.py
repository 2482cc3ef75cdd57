"""edgekit structured pruning vs Torch-Pruning 1.6.1 on SmolLM2-135M, no recovery training.

Both read the same calibration sequences (edgekit/data/calibration.txt) and are scored by perplexity on held-out
text (edgekit/data/heldout.txt). Per ratio:
  - edgekit's widths: the uniform split edgekit's search picks (activation criterion), then every edgekit criterion
    fills those widths;
  - Torch-Pruning's widths: the structures Torch-Pruning 1.6.1 can prune on this GQA Llama (see docs/pruning.md:
    MLP channels only), the same parameter budget; Torch-Pruning magnitude and Taylor, and edgekit's criteria, at
    exactly those widths.
Each edgekit row is measured twice: the cut alone, and the cut followed by edgekit's least-squares refit of
o_proj/down_proj on the same calibration sequences (prune/reconstruct.py: closed form, no gradient step, on by default
in `edgekit prune`). Torch-Pruning has no such step.
Extra rows, outside the issue's uniform comparison: edgekit's non-uniform allocation (`--non-uniform`: per-layer widths
from each layer's predicted loss, prune/sensitivity.py) at the same budget and hidden width.
Importance time and peak RSS are measured around importance estimation only (edgekit: scoring; Torch-Pruning:
gradient passes + pruner construction + step).

    PYTHONPATH=$PWD python bench/prune_vs_torchpruning.py [--ratios 0.25,0.5] [--samples 32] [--eval-seqs 16]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=16, help="held-out windows of seq-len tokens")
    ap.add_argument("--search-samples", type=int, default=4, help="sequences scoring each candidate split")
    ap.add_argument("--criteria", default="activation,taylor,magnitude")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (when ratios run in parallel)")
    ap.add_argument("--only", choices=("all", "edgekit", "torch-pruning"), default="all",
                    help="run one side (the two sides can run in parallel processes)")
    ap.add_argument("--no-non-uniform", action="store_true", help="skip the non-uniform rows")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()

    import torch

    from edgekit.data import heldout_text
    from edgekit.models import load_torch_model, resolve_model
    from edgekit.prune import Budget, PruneConfig, plan_pruning, score_model
    from edgekit.prune import allocate
    from edgekit.prune.apply import build_model, norm_scales, pruned_config, pruned_state
    from edgekit.arch import geometry, get_family
    from edgekit.prune.calib import batches, calibration_sequences, perplexity
    from edgekit.prune.reconstruct import reconstruct
    from edgekit.prune.sensitivity import layer_costs

    torch.manual_seed(0)
    path = resolve_model(None).path
    model, tok = load_torch_model(path)
    ad = get_family("llama")
    base = geometry(model.config.to_dict())
    total = base.params()
    held = heldout_text()
    cfg0 = PruneConfig(Budget(ratio=0.5), num_samples=a.samples, seq_len=a.seq_len, search_samples=a.search_samples)
    seqs = calibration_sequences(tok, None, a.seq_len, a.samples + cfg0.search_samples)
    calib, search = seqs[:a.samples], seqs[a.samples:]

    def ppl(m):
        return perplexity(m, tok, held, seq_len=a.seq_len, max_seqs=a.eval_seqs)

    rows = []
    if not a.no_dense:
        t = time.perf_counter()
        rows.append({"method": "dense", "ratio": 0.0, "removed": 0.0, "ppl": ppl(model), "widths": "-"})
        print(f"dense ppl {rows[0]['ppl']:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)

    scores, cost = {}, {}
    for c in a.criteria.split(",") if a.only != "torch-pruning" else ():
        scores[c], cost[c] = score_model(model, ad, PruneConfig(Budget(ratio=0.5), criterion=c,
                                                                batch_size=cfg0.batch_size), calib)
        print(f"edgekit {c} importance: {cost[c]}", flush=True)

    def edgekit_ppl(c, d, k, g, inter, plan=None):
        """(held-out ppl of the cut, of the cut + least-squares refit, parameters)."""
        plan = plan or allocate.uniform_plan(scores[c], base, d, k, g, inter)
        if d < base.hidden_size:
            plan.norm_scales = norm_scales(model, ad, search, {d: plan.hidden})[d]
        m = build_model(pruned_config(model, plan), pruned_state(model, ad, plan))
        cut = ppl(m)
        reconstruct(model, m, ad, plan.hidden, batches(calib, cfg0.batch_size), cfg0.reconstruct_damp)
        return cut, ppl(m), plan.geometry(base).params()

    def add_edgekit_rows(c, ratio, widths, *geo, plan=None):
        cut, refit, n = edgekit_ppl(c, *geo, plan=plan)
        kind = " non-uniform" if plan else ""
        for name, p in ((f"edgekit {c}{kind} (cut only)", cut), (f"edgekit {c}{kind} + refit", refit)):
            rows.append({"method": name, "ratio": ratio, "removed": 1 - n / total, "ppl": p, "widths": widths})
            print(rows[-1], flush=True)

    w0 = base.layers[0]
    layer_cost = None
    for ratio in map(float, a.ratios.split(",")):
        keep = total - Budget(ratio=ratio).removed(total)
        # Torch-Pruning's structures on this model: MLP channels (see module doc); same budget
        i_tp = allocate.solve_intermediate(base, base.hidden_size, w0.num_attention_heads, w0.num_key_value_heads,
                                           keep, 8)
        wtp = f"D{base.hidden_size} H{w0.num_attention_heads} KV{w0.num_key_value_heads} I{i_tp}"
        if a.only != "edgekit":
            for imp in ("magnitude", "taylor"):
                m, c = torchpruning(path, imp, i_tp, calib, cfg0.batch_size)
                n = sum(p.numel() for p in m.parameters())
                rows.append({"method": f"torch-pruning {imp}", "ratio": ratio, "removed": 1 - n / total,
                             "ppl": ppl(m), "widths": wtp, **c})
                print(rows[-1], flush=True)
                del m
        if a.only == "torch-pruning":
            continue
        t = time.perf_counter()
        plan, info = plan_pruning(model, tok, PruneConfig(Budget(ratio=ratio), num_samples=a.samples,
                                                          seq_len=a.seq_len, search_samples=a.search_samples),
                                  log=lambda s: print(s, flush=True),
                                  scores=scores["activation"])
        lw = plan.layers[0].widths()
        d, k, g, inter = len(plan.hidden), lw.num_key_value_heads, lw.num_attention_heads // lw.num_key_value_heads, \
            lw.intermediate_size
        print(f"ratio {ratio}: split search {time.perf_counter() - t:.0f}s -> hidden {d} heads {k * g}/{k} kv "
              f"intermediate {inter}", flush=True)
        wtxt = f"D{d} H{k * g} KV{k} I{inter}"
        for c in scores:
            add_edgekit_rows(c, ratio, wtxt, d, k, g, inter)
        if "activation" in scores and wtp != wtxt:  # the criterion alone, at Torch-Pruning's widths
            add_edgekit_rows("activation", ratio, wtp, base.hidden_size, w0.num_key_value_heads,
                             w0.num_attention_heads // w0.num_key_value_heads, i_tp)
        if "activation" in scores and not a.no_non_uniform:
            if layer_cost is None:
                t = time.perf_counter()
                layer_cost = layer_costs(model, ad, scores["activation"], calib, cfg0.batch_size, 8,
                                         cfg0.reconstruct_damp)
                print(f"layer costs (non-uniform allocation) {time.perf_counter() - t:.0f}s", flush=True)
            nu = allocate.nonuniform_plan(scores["activation"], layer_cost, base, d, keep)
            iw = [lp.widths().intermediate_size for lp in nu.layers]
            hw = [lp.widths().num_attention_heads for lp in nu.layers]
            add_edgekit_rows("activation", ratio, f"D{d} H{min(hw)}-{max(hw)} I{min(iw)}-{max(iw)}", d, k, g, inter,
                             plan=nu)

    print("\n| method | target removed | removed | widths (per layer) | held-out ppl |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ratio']:.0%} | {r['removed']:.1%} | {r['widths']} | {r['ppl']:.2f} |")
    print("\nimportance estimation cost (same calibration sequences):")
    for c, v in cost.items():
        print(f"  edgekit {c}: {v['seconds']} s, peak RSS {v['peak_rss_mb']:.0f} MB")
    for r in rows:
        if r["method"].startswith("torch-pruning"):
            print(f"  {r['method']} @ {r['ratio']:.0%}: {r['seconds']} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    for ratio in map(float, a.ratios.split(",") if a.only == "all" else ()):
        ek = min(r["ppl"] for r in rows if r["ratio"] == ratio and r["method"].startswith("edgekit")
                 and "non-uniform" not in r["method"])
        tp = min(r["ppl"] for r in rows if r["ratio"] == ratio and r["method"].startswith("torch-pruning"))
        print(f"ratio {ratio:.0%}: best edgekit (uniform) {ek:.2f} vs best Torch-Pruning {tp:.2f} -> "
              f"{'goal met' if ek <= tp / 2 else 'goal NOT met'} (edgekit <= half of Torch-Pruning)")
        nu = [r["ppl"] for r in rows if r["ratio"] == ratio and "non-uniform + refit" in r["method"]]
        if nu:
            print(f"ratio {ratio:.0%}: edgekit non-uniform + refit {nu[0]:.2f} ({nu[0] / tp:.2f}x Torch-Pruning's "
                  f"best, {nu[0] / ek:.2f}x edgekit uniform)")
    print(f"\nreproduce: PYTHONPATH=$PWD python bench/prune_vs_torchpruning.py --ratios {a.ratios} "
          f"--samples {a.samples} --eval-seqs {a.eval_seqs} --search-samples {a.search_samples} --only {a.only}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "importance": cost}, f, indent=2, default=str)


def torchpruning(path, importance: str, inter: int, calib, batch_size: int):
    """Torch-Pruning 1.6.1 MetaPruner on the MLP channels of every layer down to `inter` (its maintainers' LLM
    recipe: use_cache=False, logits output_transform, lm_head ignored; attention ignored because its groups
    cannot be built on this GQA/RoPE model, which also removes the hidden-channel group)."""
    import torch_pruning as tp

    from edgekit.models import load_torch_model
    from edgekit.prune.calib import batches
    from edgekit.runtime.bench import RssSampler

    model, _ = load_torch_model(path)
    model.config.use_cache = False
    t0 = time.perf_counter()
    with RssSampler(interval=0.05) as rss:
        if importance == "taylor":
            imp = tp.importance.GroupTaylorImportance()
            model.zero_grad()
            for ids in batches(calib, batch_size):
                model(input_ids=ids, labels=ids).loss.backward()
        else:
            imp = tp.importance.GroupMagnitudeImportance(p=2)
        ignored = [model.lm_head] + [x for l in model.model.layers for x in (
            l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.o_proj)]
        I0 = model.config.intermediate_size
        ratio_dict = {l.mlp.gate_proj: 1 - inter / I0 for l in model.model.layers}
        pruner = tp.pruner.MetaPruner(model, example_inputs=calib[0][None, :32], importance=imp,
                                      output_transform=lambda o: o.logits.sum(), pruning_ratio=0.0,
                                      pruning_ratio_dict=ratio_dict, ignored_layers=ignored, round_to=8)
        pruner.step()
    model.zero_grad(set_to_none=True)
    got = {l.mlp.gate_proj.out_features for l in model.model.layers}
    assert got == {inter}, f"Torch-Pruning produced intermediate sizes {got}, wanted {inter}"
    model.config.intermediate_size = inter
    return model.eval(), {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": rss.summary()["peak_rss_mb"]}


if __name__ == "__main__":
    main()
