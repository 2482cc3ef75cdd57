"""How much of a pruned SmolLM2-135M's quality does knowledge distillation recover, against plain fine-tuning?

Held-out perplexity (edgekit's shipped held-out text) of: the dense teacher; the student pruned by ~30% of
parameters; the student after KD from the teacher with a token budget B; the student after plain next-token
cross-entropy fine-tuning with the same budget B (same data, schedule and optimizer; only the loss differs).

The student comes from edgekit.prune when that package is present (--pruner auto/edgekit). Otherwise (--pruner
simple) from the SIMPLE STRUCTURED PRUNING in this file, a bench-only stand-in: uniform across layers, it drops the
least active KV group of each layer (with its 3 query heads) and then the least active MLP neurons until ~30% of
parameters are gone, importance = mean |activation| on edgekit's calibration text (Minitron's activation criterion).

    PYTHONPATH=. python bench/distill_recovery.py --tokens 98304 -o /tmp/distill-bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def simple_prune(teacher: Path, out: Path, ratio: float = 0.30, n_seqs: int = 16, seq_len: int = 256) -> dict:
    """Uniform structured pruning by activation magnitude (bench-only; see the module docstring)."""
    import torch

    from edgekit.data import calibration_text
    from edgekit.distill.data import pack, tokenize
    from edgekit.fsutil import atomic_dir
    from edgekit.models import load_torch_model

    model, tok = load_torch_model(teacher)
    c = model.config
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    hd = getattr(c, "head_dim", None) or D // H
    G = H // K
    layers = model.model.layers
    head_act = [torch.zeros(H, dtype=torch.float64) for _ in layers]
    ffn_act = [torch.zeros(c.intermediate_size, dtype=torch.float64) for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def o_hook(mod, inp, i=i):  # o_proj input = concatenated per-head attention outputs
            x = inp[0].detach().double()
            head_act[i].add_(x.view(*x.shape[:-1], H, hd).norm(dim=-1).mean(dim=(0, 1)))

        def d_hook(mod, inp, i=i):  # down_proj input = act(gate) * up, one column per MLP neuron
            ffn_act[i].add_(inp[0].detach().double().abs().mean(dim=(0, 1)))

        hooks += [layer.self_attn.o_proj.register_forward_pre_hook(o_hook),
                  layer.mlp.down_proj.register_forward_pre_hook(d_hook)]
    seqs = pack(tokenize(tok, [calibration_text()]), seq_len)[:n_seqs]
    with torch.no_grad():
        for i in range(0, len(seqs), 4):
            model(input_ids=seqs[i:i + 4], use_cache=False)
    for h in hooks:
        h.remove()

    total = sum(p.numel() for p in model.parameters())
    L = len(layers)
    attn_saved = L * (2 * D * G * hd + 2 * D * hd)  # q + o for G heads, k + v for one KV head
    per_neuron = 3 * D * L
    drop_ffn = -(-(int(ratio * total) - attn_saved) // per_neuron)
    ffn0 = c.intermediate_size
    keep_ffn = (ffn0 - drop_ffn) // 8 * 8  # aligned width
    with torch.no_grad():
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            g_score = head_act[i].view(K, G).sum(-1)
            keep_g = sorted(g_score.argsort(descending=True)[: K - 1].tolist())
            q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for g in keep_g for h in range(g * G, (g + 1) * G)])
            kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in keep_g])
            a.q_proj.weight = torch.nn.Parameter(a.q_proj.weight[q_rows].clone())
            a.k_proj.weight = torch.nn.Parameter(a.k_proj.weight[kv_rows].clone())
            a.v_proj.weight = torch.nn.Parameter(a.v_proj.weight[kv_rows].clone())
            a.o_proj.weight = torch.nn.Parameter(a.o_proj.weight[:, q_rows].clone())
            keep_n = ffn_act[i].argsort(descending=True)[:keep_ffn].sort().values
            m.gate_proj.weight = torch.nn.Parameter(m.gate_proj.weight[keep_n].clone())
            m.up_proj.weight = torch.nn.Parameter(m.up_proj.weight[keep_n].clone())
            m.down_proj.weight = torch.nn.Parameter(m.down_proj.weight[:, keep_n].clone())
    c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size = H - G, K - 1, hd, keep_ffn
    kept = sum(p.numel() for p in model.parameters())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return {"pruner": "simple (bench-only: uniform, activation magnitude, 1 of 3 KV groups + MLP neurons)",
            "params_before": total, "params_after": kept, "removed_fraction": round(1 - kept / total, 4),
            "heads": f"{H}/{K} -> {H - G}/{K - 1}", "intermediate": f"{ffn0} -> {keep_ffn}"}


def edgekit_prune(teacher: Path, out: Path, ratio: float) -> dict:
    from edgekit.prune.api import prune_model
    from edgekit.prune.config import Budget, PruneConfig

    rep = prune_model(teacher, out, PruneConfig(budget=Budget(ratio=ratio)), log=lambda m: print(m, file=sys.stderr))
    return {"pruner": "edgekit.prune (activation, uniform, searched split, least-squares refit)",
            "removed_fraction": rep["removed_fraction"], "params_before": rep["params_before"],
            "params_after": rep["params_after"], "widths": rep["layers"][0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=98304, help="token budget B for each of KD and CE")
    ap.add_argument("--ratio", type=float, default=0.30, help="fraction of parameters to prune")
    ap.add_argument("--pruner", choices=("auto", "edgekit", "simple"), default="auto")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    ap.add_argument("--kd-ce-weight", type=float, default=None,
                    help="cross-entropy mixed into the KD run's loss (default: edgekit's LossConfig default, 1.0; "
                    "0 = pure KD)")
    ap.add_argument("--eval-blocks", type=int, default=48)
    ap.add_argument("--runs", default="KD,CE", help="which recoveries to train (a finished run with the same settings "
                    "in OUT is reused, not retrained)")
    ap.add_argument("--parallel", action="store_true", help="train the runs as concurrent processes")
    ap.add_argument("-o", "--out", type=Path, default=Path("/tmp/edgekit-distill-bench"))
    a = ap.parse_args()

    import torch

    from edgekit.distill import DataConfig, DistillConfig, LossConfig, OptimConfig, distill
    from edgekit.models import resolve_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = resolve_model(None).path
    a.out.mkdir(parents=True, exist_ok=True)
    student = a.out / f"pruned-{a.ratio}"
    use_edgekit = a.pruner == "edgekit" or (a.pruner == "auto" and _has_edgekit_prune())
    t0 = time.perf_counter()
    if not (student / "config.json").exists():
        info = (edgekit_prune if use_edgekit else simple_prune)(teacher, student, a.ratio)
        (a.out / "prune.json").write_text(json.dumps(info, indent=2))
    info = json.loads((a.out / "prune.json").read_text())
    prune_s = time.perf_counter() - t0
    print(f"pruned: {info}", file=sys.stderr)

    T = a.temperature
    if a.kd_ce_weight is None:
        a.kd_ce_weight = LossConfig().ce_weight
    base = dict(tokens=a.tokens, batch_size=a.batch_size, micro_batch_size=4, checkpoint_every=8,
                data=DataConfig(block_size=a.block_size, max_eval_blocks=a.eval_blocks),
                optim=OptimConfig(lr=a.lr))
    runs = {"KD": LossConfig(kd_weight=1.0, temperature_start=T[0], temperature_end=T[-1], ce_weight=a.kd_ce_weight),
            "CE": LossConfig(kd_weight=0.0, ce_weight=1.0)}
    wanted = [r for r in a.runs.split(",") if r]
    if a.parallel and len(wanted) > 1:
        import subprocess

        args = [x for x in sys.argv[1:] if x != "--parallel"]
        procs = [subprocess.Popen([sys.executable, __file__, *args, "--runs", r]) for r in wanted]
        if any(p.wait() for p in procs):
            return 1
    reports = {}
    for name, loss in runs.items():
        if name not in wanted:
            continue
        cfg = DistillConfig(**base, loss=loss)
        done = a.out / name.lower() / "distill.json"
        if done.exists() and json.loads(json.dumps(cfg.to_dict())) == json.loads(done.read_text())["config"]:
            reports[name] = json.loads(done.read_text())
            print(f"{name}: reusing the finished run in {done.parent}", file=sys.stderr)
            continue
        t1 = time.perf_counter()
        rep = distill(teacher, student, a.out / name.lower(), cfg,
                      log=lambda m: print(m, file=sys.stderr), progress=False)
        rep["wall_s"] = round(time.perf_counter() - t1, 1)
        from edgekit.fsutil import atomic_write_json

        atomic_write_json(done, rep)  # keep the wall time with the run
        reports[name] = rep
    if set(reports) != {"KD", "CE"}:
        print(f"trained {', '.join(reports)}; rerun with --runs KD,CE for the table", file=sys.stderr)
        return 0
    ppl = reports["KD"]["heldout_perplexity"]
    t_ppl = ppl["teacher"]
    rows = [("dense teacher", info.get("params_before", ""), t_ppl, 1.0, "", ""),
            (f"pruned ({info['removed_fraction']:.1%} removed)", info["params_after"], ppl["before"],
             ppl["before"] / t_ppl, "", "")]
    for name, rep in reports.items():
        p = rep["heldout_perplexity"]["after"]
        rows.append((f"pruned + {name} ({rep['tokens']:,} tokens)", info["params_after"], p, p / t_ppl,
                     rep["tokens_per_s"], rep["wall_s"]))
    result = {"prune": info, "prune_seconds": round(prune_s, 1), "budget_tokens": reports["KD"]["tokens"],
              "rows": rows, "reports": reports, "kd_beats_ce": reports["KD"]["heldout_perplexity"]["after"]
              < reports["CE"]["heldout_perplexity"]["after"]}
    (a.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nSmolLM2-135M-Instruct, held-out perplexity ({a.eval_blocks} blocks x {a.block_size} tokens of edgekit's "
          f"held-out text); budget B = {reports['KD']['tokens']:,} tokens, lr {a.lr}, batch {a.batch_size}, "
          f"T {T}, CE mixed into KD {a.kd_ce_weight}; pruner: {info['pruner']}")
    print(f"{'model':<40} {'params':>11} {'ppl':>9} {'x teacher':>10} {'train tok/s':>12} {'wall s':>8}")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:>11,} {r[2]:>9.3f} {r[3]:>10.3f} {str(r[4]):>12} {str(r[5]):>8}")
    print(f"KD beats CE: {result['kd_beats_ce']}")
    print(f"reproduce: PYTHONPATH=. python bench/distill_recovery.py --pruner {a.pruner} --tokens {a.tokens} "
          f"--lr {a.lr} --batch-size {a.batch_size} --block-size {a.block_size} --eval-blocks {a.eval_blocks} --kd-ce-weight "
          f"{a.kd_ce_weight} --temperature {' '.join(map(str, T))} -o {a.out}")
    return 0


def _has_edgekit_prune() -> bool:
    import importlib.util

    return importlib.util.find_spec("edgekit.prune") is not None


if __name__ == "__main__":
    raise SystemExit(main())
