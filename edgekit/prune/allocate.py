"""From scores and a budget to a Plan: which MLP neurons, KV groups, query heads and hidden channels stay.

Uniform: every layer keeps the same widths (a plain HF config). The split between hidden / attention / MLP is either
given (hidden_keep) or searched: candidate splits that meet the budget are scored by calibration loss and the best
wins (coarse-to-fine: hidden width first, then attention, then hidden again), so no hand-tuned split per model.
Every aligned hidden width down to the narrowest is a candidate. When the layers are too small to land on the budget
at any hidden width (an embedding-heavy model: the hidden width is the only big lever), the closest cut within the
budget is taken (the hidden cut alone, at the widest width that meets it) and the log says so.
Non-uniform: hidden width as in the uniform plan; MLP neurons and attention are removed greedily across all layers,
cheapest first, by the loss each layer's narrower widths are predicted to cost (sensitivity.py) per parameter saved,
at least one aligned unit left per layer, protected layers untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgekit.errors import EdgekitError
from edgekit.arch import Geometry, LayerWidths


@dataclass
class LayerPlan:
    mlp: list  # kept MLP neuron indices (ascending)
    kv: list  # kept KV groups (ascending)
    heads: list  # kept query heads (original indices): for each kept group, the same number of its heads

    def widths(self) -> LayerWidths:
        return LayerWidths(len(self.mlp), len(self.heads), len(self.kv))


@dataclass
class Plan:
    hidden: list  # kept hidden channels (ascending)
    layers: list  # LayerPlan per layer
    norm_scales: list | None = None  # per RMSNorm (ad.norms order): weight multiplier for the removed channels

    def geometry(self, base: Geometry) -> Geometry:
        return base.with_(hidden_size=len(self.hidden), layers=tuple(lp.widths() for lp in self.layers))

    @property
    def uniform(self) -> bool:
        return len({lp.widths() for lp in self.layers}) == 1


def _top(scores, k: int) -> list:
    import torch

    return sorted(torch.topk(scores, k).indices.tolist()) if k < len(scores) else list(range(len(scores)))


def select_attention(head_scores, kv_scores, k: int, g: int) -> tuple[list, list, float]:
    """Keep k KV groups and g query heads inside each (GQA keeps heads-per-group equal). Returns (kv, heads, score)."""
    K = len(kv_scores)
    G = len(head_scores) // K
    per_group = head_scores.view(K, G)
    best = per_group.topk(g, dim=1)
    group_score = best.values.sum(1) + kv_scores
    kv = _top(group_score, k)
    heads = sorted(int(grp * G + j) for grp in kv for j in best.indices[grp].tolist())
    return kv, heads, float(group_score[kv].sum())


def aligned(n: int, full: int, align: int) -> bool:
    return n == full or n % align == 0


def head_step(head_dim: int, align: int) -> int:
    """Smallest head count whose width (heads * head_dim) is a multiple of align."""
    return align // math.gcd(align, head_dim)


def attention_options(H: int, K: int, head_dim: int, align: int) -> list[tuple[int, int]]:
    """(kv groups, heads per group) pairs whose query width is aligned, most heads first."""
    G = H // K
    step = head_step(head_dim, align)
    opts = [(k, g) for k in range(1, K + 1) for g in range(1, G + 1) if (k * g) % step == 0 or (k, g) == (K, G)]
    return sorted(opts, key=lambda kg: (-kg[0] * kg[1], -kg[0]))


def uniform_plan(scores, base: Geometry, D: int, k: int, g: int, inter: int) -> Plan:
    layers = []
    for l in range(len(base.layers)):
        kv, heads, _ = select_attention(scores.heads[l], scores.kv[l], k, g)
        layers.append(LayerPlan(_top(scores.mlp[l], inter), kv, heads))
    return Plan(_top(scores.hidden, D), layers)


def solve_intermediate(base: Geometry, D: int, H: int, K: int, keep_params: int, align: int,
                       at_most: bool = False) -> int | None:
    """The aligned intermediate size that brings the uniform model closest to keep_params, or (at_most: a size or
    byte budget) the widest one that does not exceed it (None: no aligned size lands on the budget at these widths;
    in particular when even the dense MLP leaves the model smaller than the budget by more than half a unit, which
    search_uniform's fallback handles)."""
    L = len(base.layers)
    I0 = base.layers[0].intermediate_size
    g0 = base.with_(hidden_size=D, layers=(LayerWidths(0, H, K),) * L)
    per_neuron = base.with_(hidden_size=D, layers=(LayerWidths(1, H, K),) * L).params() - g0.params()
    exact = (keep_params - g0.params()) / per_neuron
    if exact >= I0:
        return I0 if exact - I0 < align / 2 else None
    inter = min((math.floor(exact / align) if at_most else int(round(exact / align))) * align, I0)
    return inter if align <= inter <= I0 else None  # (rounding up to I0 is the closest size too)


MAX_HIDDEN_WIDTHS = 64  # hidden_options lists at most about this many widths (api.py measures norm scales for each)
COARSE = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # first pass of the hidden search


def hidden_options(D: int, align: int, given: float | None) -> list[int]:
    """Hidden widths the uniform search may try, widest first: the one given (hidden_keep), else D and every multiple
    of align below it, down to align (a coarser multiple of align past MAX_HIDDEN_WIDTHS widths)."""
    if given is not None:
        d = D if given >= 1 else max(align, int(round(D * given / align)) * align)
        return [d] if d <= D and aligned(d, D, align) else []
    step = align * max(1, math.ceil(((D - 1) // align) / MAX_HIDDEN_WIDTHS))
    out = [D] + list(range((D - 1) // step * step, 0, -step))
    if align < D and align not in out:
        out.append(align)
    return out


def _uniform(base: Geometry, d: int, k: int, g: int, inter: int) -> Geometry:
    return base.with_(hidden_size=d, layers=(LayerWidths(inter, k * g, k),) * len(base.layers))


def smallest_uniform(base: Geometry, align: int) -> tuple[int, int, tuple[int, int], int]:
    """(parameters, hidden, (kv groups, heads per group), intermediate) of the smallest model edgekit may produce:
    one aligned unit of each structure per layer (the narrowest aligned attention shape)."""
    w0 = base.layers[0]
    d = min(base.hidden_size, align)
    inter = min(w0.intermediate_size, align)
    opts = attention_options(w0.num_attention_heads, w0.num_key_value_heads, base.head_dim, align)
    kg = min(opts, key=lambda kg: _uniform(base, d, kg[0], kg[1], inter).params())
    return _uniform(base, d, kg[0], kg[1], inter).params(), d, kg, inter


def max_uniform_ratio(base: Geometry, align: int) -> float:
    """The most a cut at this alignment can remove (smallest_uniform's share, 3 decimals, rounded down)."""
    return _max_ratio(base.params(), smallest_uniform(base, align)[0])


def _max_ratio(total: int, keep_min: int) -> float:
    """The largest ratio (3 decimals, rounded down) whose budget keeps at least keep_min parameters."""
    return math.floor((1 - keep_min / total) * 1000) / 1000


def _embedding(base: Geometry) -> int:
    return base.vocab_size * base.hidden_size * (1 if base.tied else 2)


def search_uniform(scores, base: Geometry, keep_params: int, align: int, hidden_keep: float | None,
                   evaluate, log=print, at_most: bool = False) -> tuple[Plan, list[dict]]:
    """Pick (hidden, kv groups, heads/group, intermediate) meeting the budget with the lowest evaluate(plan) loss.

    evaluate(plan) -> float; called on a few candidates only (coarse-to-fine), each a real pruned model: the hidden
    widths near COARSE fractions of every aligned width that can meet the budget, then attention, then the coarse and
    the aligned neighbours of the best hidden width. When no aligned intermediate size lands on the budget at any
    width (an embedding-heavy model: the layers are too small to make up the rest), the closest cuts that stay within
    it are tried instead, the narrowest hidden cut with every layer dense among them."""
    D = base.hidden_size
    w0 = base.layers[0]
    total = base.params()
    attn = attention_options(w0.num_attention_heads, w0.num_key_value_heads, base.head_dim, align)
    grid = hidden_options(D, align, hidden_keep)
    emb = _embedding(base)
    if emb > total / 2:
        log(f"prune: the embedding holds {emb / total:.0%} of the parameters; only the hidden width can remove much "
            f"of it (the layers hold {1 - (emb + D) / total:.0%})")
    tried: dict[tuple, dict] = {}

    def record(d, k, g, inter, plan):
        loss = evaluate(plan)
        tried[(d, k, g)] = {"hidden": d, "kv_heads": k, "heads": k * g, "intermediate": inter, "loss": loss}
        log(f"prune: candidate hidden {d} heads {k * g}/{k} kv intermediate {inter}: loss {loss:.4f}")
        return loss

    def trial(d, k, g):
        key = (d, k, g)
        if key not in tried:
            inter = solve_intermediate(base, d, k * g, k, keep_params, align, at_most)
            if inter is None:
                tried[key] = {"hidden": d, "kv_heads": k, "heads": k * g, "intermediate": None, "loss": math.inf}
            else:
                record(d, k, g, inter, uniform_plan(scores, base, d, k, g, inter))
        return tried[key]["loss"]

    def first_feasible_attn(d):
        for k, g in attn:
            if solve_intermediate(base, d, k * g, k, keep_params, align, at_most) is not None:
                return k, g
        return None

    feasible = {d: kg for d in grid if (kg := first_feasible_attn(d))}
    if not feasible:
        return _closest_within_budget(scores, base, keep_params, align, hidden_keep, grid, attn, at_most, log,
                                      record, tried)
    fd = sorted(feasible, reverse=True)

    def near(t):  # the feasible width nearest t (the wider one on a tie)
        return min(fd, key=lambda d: (abs(d - t), -d))

    coarse = sorted({near(D if f >= 1 else max(align, int(round(D * f / align)) * align)) for f in COARSE}
                    | {fd[-1]}, reverse=True) if hidden_keep is None else fd
    # 1) hidden width, attention dense (or, if that cannot meet the budget, the least-pruned feasible attention)
    best, worse = None, 0
    for d in coarse:  # narrower hidden widths only get worse once they start to: stop after two misses in a row
        if best is None or trial(d, *feasible[d]) < trial(*best):
            best, worse = (d, *feasible[d]), 0
        else:
            worse += 1
            if worse == 2:
                break
    # 2) attention at that hidden width
    for k, g in attn:
        if trial(best[0], k, g) < trial(*best):
            best = (best[0], k, g)
    # 3) coarse hidden neighbours at that attention, then 4) the aligned ones
    for ws in (coarse, grid):
        i = ws.index(best[0])
        for d in ws[max(0, i - 1):i + 2]:
            if trial(d, best[1], best[2]) < trial(*best):
                best = (d, best[1], best[2])
    d, k, g = best
    inter = tried[best]["intermediate"]
    return uniform_plan(scores, base, d, k, g, inter), _ranked(tried)


def _ranked(tried: dict) -> list[dict]:
    return sorted((v for v in tried.values() if v["intermediate"]), key=lambda v: v["loss"])


def _closest_within_budget(scores, base, keep_params, align, hidden_keep, grid, attn, at_most, log, record, tried):
    """No aligned intermediate size lands on the budget at any hidden width. Every dense-MLP shape (hidden width,
    attention) that stays within the budget removes more than asked; the hidden cut alone at the widest width that
    meets the budget and the within-budget shape that keeps the most parameters are evaluated (often the same one)."""
    w0 = base.layers[0]
    K, G, I0 = w0.num_key_value_heads, w0.num_attention_heads // w0.num_key_value_heads, w0.intermediate_size
    total = base.params()
    ratio = 1 - keep_params / total
    under = [(p, d, k, g) for d in grid for k, g in attn if (p := _uniform(base, d, k, g, I0).params()) <= keep_params]
    hidden_only = [c for c in under if c[2:] == (K, G)]
    if hidden_keep is not None and not at_most:
        under = []  # a ratio with an explicit hidden width: removing more than asked is the user's conflict to fix
    if not under:
        raise _no_uniform_error(base, keep_params, align, hidden_keep, grid, attn)
    cands = ([max(hidden_only, key=lambda c: (c[0], c[1]))] if hidden_only else []) + [max(under)]
    wider = [d for d in grid if d > max(c[1] for c in cands)]
    reach = ""
    if wider:
        dw = min(wider)
        lo = min(_uniform(base, dw, k, g, min(I0, align)).params() for k, g in attn)
        reach = f" (at hidden width {dw} the narrowest layers remove only {1 - lo / total:.1%}" + (
            "; a smaller --align allows finer hidden widths)" if align > 1 else ")")
    log(f"prune: no uniform widths remove {ratio:.1%} at --align {align}{reach}; trying the closest cuts within "
        f"the budget: " + ", ".join(f"hidden {d} heads {k * g}/{k} kv intermediate {I0} ({1 - p / total:.1%} "
                                    "removed)" for p, d, k, g in dict.fromkeys(cands)))
    best = None
    for p, d, k, g in dict.fromkeys(cands):
        if (d, k, g) not in tried:
            record(d, k, g, I0, uniform_plan(scores, base, d, k, g, I0))
        if best is None or tried[(d, k, g)]["loss"] < tried[best]["loss"]:
            best = (d, k, g)
    return uniform_plan(scores, base, best[0], best[1], best[2], I0), _ranked(tried)


def _too_small(base: Geometry, keep_params: int, align: int) -> EdgekitError:
    """keep_params is below the smallest model at this alignment: the error names the most a cut can remove."""
    p, d, (k, g), inter = smallest_uniform(base, align)
    r = _max_ratio(base.params(), p)
    smaller = f", or a smaller --align than {align}" if align > 1 else ""
    fix = (f"ask for --ratio {r:g} or less (or --params {p} or more){smaller}" if r > 0 else
           f"pass a smaller --align (at --align {align} no structure of this model can be narrowed)")
    return EdgekitError(f"this budget keeps {keep_params:,} of {base.params():,} parameters, but the smallest model at "
                        f"--align {align} (hidden {d}, heads {k * g}/{k} kv, intermediate {inter} in every layer) "
                        f"already has {p:,}, so a layer would be left with nothing: a uniform cut removes at most "
                        f"{r:g} of the parameters", fix)


def _no_uniform_error(base, keep_params, align, hidden_keep, grid, attn) -> EdgekitError:
    if hidden_keep is None or not grid:
        if hidden_keep is not None:
            return EdgekitError(f"--hidden-keep {hidden_keep} gives no aligned hidden width at --align {align}",
                                "pass a larger --hidden-keep, or drop it so edgekit searches the hidden width")
        return _too_small(base, keep_params, align)  # (with no hidden_keep, nothing at all fits the budget)
    D, d, total = base.hidden_size, grid[0], base.params()
    w0 = base.layers[0]
    I0 = w0.intermediate_size
    dense = _uniform(base, d, w0.num_key_value_heads, w0.num_attention_heads // w0.num_key_value_heads, I0).params()
    least = min(_uniform(base, d, k, g, min(I0, align)).params() for k, g in attn)
    lo, hi = math.ceil((1 - dense / total) * 1000) / 1000, _max_ratio(total, least)
    return EdgekitError(f"no uniform widths meet this budget with --hidden-keep {hidden_keep}: at hidden width {d} "
                        f"of {D} a uniform cut removes between {lo:g} and {hi:g} of the parameters, and this budget "
                        f"asks for {1 - keep_params / total:.3f}", f"ask for --ratio between {lo:g} and {hi:g}, "
                        "or drop --hidden-keep so edgekit searches the hidden width")


def check_protected(protected, num_layers: int) -> None:
    bad = [p for p in protected if not 0 <= p < num_layers]
    if bad:
        raise EdgekitError(f"protected layer {bad[0]} does not exist (the model has {num_layers} layers: "
                           f"0..{num_layers - 1})", "pass layer indices within range")
    if protected and len(set(protected)) == num_layers:
        raise EdgekitError("every layer is protected, so no layer can be narrowed",
                           "protect fewer layers (--protect), or prune only the hidden width with --hidden-keep")


def nonuniform_plan(scores, costs, base: Geometry, D: int, keep_params: int, attn_weight: float = 1.0,
                    protected: tuple = ()) -> Plan:
    """Greedy global removal at hidden width D: repeatedly take the move with the least predicted loss per parameter
    saved (costs: sensitivity.LayerCosts) among every layer's narrower MLP widths and smaller aligned attention shapes.
    Scores still pick which units a layer keeps; the costs decide how many (their widths are already aligned)."""
    L = len(base.layers)
    check_protected(protected, L)
    geo = base.with_(hidden_size=D)
    w0 = base.layers[0]
    K, G = w0.num_key_value_heads, w0.num_attention_heads // w0.num_key_value_heads
    unit_mlp = geo.layer_params(LayerWidths(1, 0, 0))["mlp"] - geo.layer_params(LayerWidths(0, 0, 0))["mlp"]
    attn_params = {kg: geo.layer_params(LayerWidths(0, kg[0] * kg[1], kg[0]))["attention"] for kg in costs.attn[0]}
    I0 = w0.intermediate_size
    state = [{"mlp": I0, "attn": (K, G)} for _ in range(L)]
    total = geo.with_(layers=(w0,) * L).params()
    to_remove = total - keep_params
    if to_remove <= 0:
        raise EdgekitError("pruning the hidden width alone already meets this budget",
                           "drop --non-uniform (every layer keeps the same widths), or ask for a larger --ratio")

    def moves(l):
        """(loss per parameter, parameters saved, move): the next narrower MLP width, the narrower MLP width with the
        best ratio (so a flat stretch of the cost curve is crossed in one move), and every smaller attention shape."""
        if l in protected:
            return []
        st, out = state[l], []
        c_mlp = costs.mlp[l]
        narrower = sorted((w for w in c_mlp if w < st["mlp"]), reverse=True)
        cands = [(max(c_mlp[w] - c_mlp[st["mlp"]], 0.0) / ((st["mlp"] - w) * unit_mlp), w) for w in narrower]
        for r, w in ([cands[0], min(cands)] if cands else []):
            out.append((r, (st["mlp"] - w) * unit_mlp, ("mlp", w)))
        k0, g0 = st["attn"]
        c_now = costs.attn[l][(k0, g0)]
        for (k, g), c in costs.attn[l].items():
            if k <= k0 and g <= g0 and (k, g) != (k0, g0):
                saved = attn_params[(k0, g0)] - attn_params[(k, g)]
                out.append((attn_weight * max(c - c_now, 0.0) / saved, saved, ("attn", (k, g))))
        return out

    best_moves = [moves(l) for l in range(L)]
    removed = 0
    while removed < to_remove:
        cands = [(m, l) for l, ms in enumerate(best_moves) for m in ms]
        if not cands:  # not monotone in the ratio: a larger one can narrow the hidden width and fit again
            most = _max_ratio(base.params(), total - removed)
            raise EdgekitError(f"at hidden width {D} of {base.hidden_size} the {L - len(set(protected))} unprotected "
                               f"layer(s) can remove at most {most:g} of the parameters (one aligned unit of every "
                               f"structure stays), short of this budget's {1 - keep_params / base.params():.3f}",
                               f"ask for --ratio {most:g} or less, protect fewer layers (--protect), or pass a "
                               "smaller --hidden-keep so the hidden width takes more of the cut")
        short = to_remove - removed
        fitting = [c for c in cands if c[0][1] <= 2 * short]  # avoid overshooting by more than we are short
        m, l = min(fitting or cands, key=lambda x: (x[0][0], -x[0][1]))
        state[l][m[2][0]] = m[2][1]
        removed += m[1]
        best_moves[l] = moves(l)
    layers = []
    for l in range(L):
        k, g = state[l]["attn"]
        kv, heads, _ = select_attention(scores.heads[l], scores.kv[l], k, g)
        layers.append(LayerPlan(_top(scores.mlp[l], state[l]["mlp"]), kv, heads))
    return Plan(_top(scores.hidden, D), layers)


def check_ratio_feasible(base: Geometry, keep_params: int, align: int) -> None:
    """The smallest model edgekit may produce keeps one aligned unit of each structure per layer."""
    if keep_params < smallest_uniform(base, align)[0]:
        raise _too_small(base, keep_params, align)
