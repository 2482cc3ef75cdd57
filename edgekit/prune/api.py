"""prune_model: the one verb of structured widthwise pruning."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.prune import allocate
from edgekit.arch import WIDTHS_KEY, family_of
from edgekit.prune.config import PruneConfig

REPORT_FILE = "edgekit-prune.json"
PLOT_FILE = "edgekit-prune.svg"  # per-layer widths before/after (and predicted loss, non-uniform)


def score_model(model, ad, cfg: PruneConfig, seqs) -> tuple:
    """(Scores, {"seconds", "peak_rss_mb"}) of the configured criterion over the calibration sequences."""
    from edgekit.prune.calib import batches
    from edgekit.prune.criteria import CRITERIA
    from edgekit.runtime.bench import RssSampler

    fn, _ = CRITERIA[cfg.criterion]
    t0 = time.perf_counter()
    with RssSampler(interval=0.05) as rss:
        scores = fn(model, ad, batches(seqs, cfg.batch_size))
    return scores, {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": rss.summary()["peak_rss_mb"]}


def calibration_split(tok, cfg: PruneConfig, log=print) -> tuple[list, list]:
    """(calibration sequences, search sequences): the last search_samples windows score candidate splits; with too
    little text both are the same windows."""
    from edgekit.prune.calib import calibration_sequences

    seqs = calibration_sequences(tok, cfg.calibration, cfg.seq_len, cfg.num_samples + cfg.search_samples)
    if len(seqs) < cfg.num_samples + cfg.search_samples:
        log(f"prune: warning: the calibration text gives only {len(seqs)} sequences of {cfg.seq_len} tokens "
            f"(asked for {cfg.num_samples} + {cfg.search_samples} to score splits); pass more text for a "
            "reliable cut" + ("; the split is scored on the calibration sequences themselves"
                              if len(seqs) <= cfg.search_samples else ""))
    if len(seqs) <= cfg.search_samples:
        return seqs, seqs
    return seqs[:-cfg.search_samples], seqs[-cfg.search_samples:]


def plan_pruning(model, tok, cfg: PruneConfig, log=print, scores=None, split=None) -> tuple:
    """(Plan, info) for a loaded dense model: score, allocate, and (uniform) search the split on calibration loss.
    `split`: calibration_split(tok, cfg) when the caller already has it."""
    from edgekit.prune.apply import build_model, norm_scales, pruned_config, pruned_state
    from edgekit.prune.calib import mean_loss

    cfg.check()
    mcfg = model.config.to_dict()
    ad = family_of(mcfg)
    base = ad.geometry(mcfg)
    total = base.params()
    keep = total - cfg.budget.removed(total)
    allocate.check_ratio_feasible(base, keep, cfg.align)
    calib, search = split or calibration_split(tok, cfg, log)
    info = {"params_before": total, "params_target": keep, "calibration_sequences": len(calib),
            "search_sequences": len(search), "seq_len": cfg.seq_len}
    if scores is None:
        log(f"prune: scoring structures ({cfg.criterion}, {len(calib)} x {cfg.seq_len} tokens)")
        scores, info["importance"] = score_model(model, ad, cfg, calib)
    D = base.hidden_size
    hid_opts = allocate.hidden_options(D, cfg.align, cfg.hidden_keep)
    sets = {d: allocate._top(scores.hidden, d) for d in hid_opts if d < D}
    scales = norm_scales(model, ad, search, sets) if cfg.norm_correction and sets else {}

    def finish(plan):
        if len(plan.hidden) < D:
            plan.norm_scales = scales.get(len(plan.hidden))
        return plan

    def evaluate(plan) -> float:
        p = finish(plan)
        m = build_model(pruned_config(model, p), pruned_state(model, ad, p))
        return mean_loss(m, search)

    info["dense_search_loss"] = mean_loss(model, search)
    plan, tried = allocate.search_uniform(scores, base, keep, cfg.align, cfg.hidden_keep, evaluate, log=log,
                                          at_most=cfg.budget.ratio is None)
    info["candidates"] = tried
    D_kept = len(plan.hidden)
    if cfg.non_uniform and base.with_(hidden_size=D_kept).params() <= keep:
        log(f"prune: narrowing the hidden width to {D_kept} already meets the budget, so every layer keeps the "
            "same widths (nothing left for the non-uniform allocation to share out)")
        info["non_uniform_skipped"] = f"hidden width {D_kept} alone meets the budget"
    elif cfg.non_uniform:
        from edgekit.prune.sensitivity import layer_costs

        log(f"prune: predicting each layer's loss at every width ({len(calib)} x {cfg.seq_len} tokens)")
        t0 = time.perf_counter()
        costs = layer_costs(model, ad, scores, calib, cfg.batch_size, cfg.align, cfg.reconstruct_damp,
                            refit=cfg.reconstruct)
        info["layer_costs_seconds"] = round(time.perf_counter() - t0, 2)
        plan = allocate.nonuniform_plan(scores, costs, base, D_kept, keep, cfg.attn_weight,
                                        tuple(cfg.protected_layers))

        def nats(x: float) -> float:
            return float(f"{x:.4g}") if x > 1e-12 else 0.0  # an untouched sublayer leaves rounding noise

        info["predicted_loss_increase"] = [  # per layer and sublayer, as allocated
            {"mlp": nats(costs.mlp[l][len(lp.mlp)]),
             "attention": nats(costs.attn[l][(len(lp.kv), len(lp.heads) // len(lp.kv))])}
            for l, lp in enumerate(plan.layers)]
    return finish(plan), info


def prune_model(model_dir: Path, out: Path, cfg: PruneConfig, log=print) -> dict:
    """Prune the HF folder model_dir into out (atomically); returns the report (also written to out)."""
    from edgekit.fsutil import atomic_dir, atomic_write_json
    from edgekit.models import load_torch_model
    from edgekit.prune.apply import build_model, pruned_config, pruned_state, save_pruned
    from edgekit.prune.report import layer_report

    model_dir = Path(model_dir)
    mcfg = json.loads((model_dir / "config.json").read_text())
    ad = family_of(mcfg)
    if mcfg.get(WIDTHS_KEY):
        raise EdgekitError(f"{model_dir} is already pruned with per-layer widths",
                           "prune the original model (or a uniformly pruned one) instead")
    cfg.check()
    base = ad.geometry(mcfg)
    cfg.budget.removed(base.params())  # reject a bad budget before loading anything
    allocate.check_protected(cfg.protected_layers, len(base.layers))
    seq_max = mcfg.get("max_position_embeddings")
    if seq_max and cfg.seq_len > seq_max:
        raise EdgekitError(f"--seq-len {cfg.seq_len} is longer than the model's context ({seq_max} positions)",
                           f"pass --seq-len {min(256, seq_max)} or less")
    t0 = time.perf_counter()
    model, tok = load_torch_model(model_dir)
    if tok is None:
        raise EdgekitError(f"{model_dir} has no tokenizer.json; calibration needs the model's tokenizer",
                           "save the tokenizer next to the model (tokenizer.save_pretrained)")
    calib, search = calibration_split(tok, cfg, log)
    plan, info = plan_pruning(model, tok, cfg, log=log, split=(calib, search))
    new_cfg = pruned_config(model, plan)
    pruned = build_model(new_cfg, pruned_state(model, ad, plan))
    after = plan.geometry(base)
    from edgekit.prune.calib import batches, mean_loss

    if cfg.reconstruct:
        from edgekit.prune.reconstruct import reconstruct

        info["cut_search_loss"] = mean_loss(pruned, search)
        log(f"prune: refitting o_proj/down_proj on {len(calib)} calibration sequences")
        t1 = time.perf_counter()
        cut_state = {k: v.clone() for k, v in pruned.state_dict().items() if k.endswith(("o_proj.weight",
                                                                                          "down_proj.weight"))}
        info["reconstruction"] = reconstruct(model, pruned, ad, plan.hidden, batches(calib, cfg.batch_size),
                                             cfg.reconstruct_damp)
        info["reconstruction"]["seconds"] = round(time.perf_counter() - t1, 2)
        final_loss = mean_loss(pruned, search)
        # the search sequences are held out from the fit: a refit that overfits the calibration text is undone
        info["reconstruction"]["kept"] = final_loss <= info["cut_search_loss"]
        if not info["reconstruction"]["kept"]:
            log(f"prune: the refit raised the held-out calibration loss ({info['cut_search_loss']:.4f} -> "
                f"{final_loss:.4f}); keeping the plain cut (more calibration text usually helps the refit)")
            pruned.load_state_dict(cut_state, strict=False)
            final_loss = info["cut_search_loss"]
    else:
        final_loss = mean_loss(pruned, search)

    report = {
        "source": str(model_dir),
        "arch": ad.model_type,
        "config": cfg.to_dict(),
        "uniform": plan.uniform,
        "params_before": base.params(),
        "params_after": after.params(),
        "removed_fraction": round(1 - after.params() / base.params(), 5),
        "hidden_size": {"before": base.hidden_size, "after": after.hidden_size},
        "layers": layer_report(base, after),
        **{k: v for k, v in info.items() if k not in ("params_before",)},
    }
    report["pruned_search_loss"] = final_loss
    report["seconds"] = round(time.perf_counter() - t0, 2)
    from edgekit.report import widths_svg

    svg = widths_svg([w.to_dict() for w in base.layers], [w.to_dict() for w in after.layers],
                     report.get("predicted_loss_increase"), hidden=(base.hidden_size, after.hidden_size))
    with atomic_dir(Path(out)) as tmp:
        save_pruned(pruned, tmp, model_dir)
        atomic_write_json(tmp / REPORT_FILE, report)
        if svg:
            (tmp / PLOT_FILE).write_text(svg)
    return report
