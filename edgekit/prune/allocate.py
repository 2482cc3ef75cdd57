"""From scores and a budget to a Plan: which MLP neurons, KV groups, query heads and hidden channels stay.

Uniform: every layer keeps the same widths (a plain HF config). The split between hidden / attention / MLP is either
given (hidden_keep) or searched: candidate splits that meet the budget are scored by calibration loss and the best
wins (coarse-to-fine: hidden width first, then attention, then hidden again), so no hand-tuned split per model.
Non-uniform: hidden width as in the uniform plan; MLP neurons and attention are removed greedily across all layers,
cheapest first, by the loss each layer's narrower widths are predicted to cost (sensitivity.py) per parameter saved,
at least one aligned unit left per layer, protected layers untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgekit.errors import EdgekitError
from edgekit.prune.arch import Geometry, LayerWidths


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
    byte budget) the widest one that does not exceed it (None: infeasible)."""
    L = len(base.layers)
    I0 = base.layers[0].intermediate_size
    g0 = base.with_(hidden_size=D, layers=(LayerWidths(0, H, K),) * L)
    per_neuron = base.with_(hidden_size=D, layers=(LayerWidths(1, H, K),) * L).params() - g0.params()
    exact = (keep_params - g0.params()) / per_neuron
    if exact >= I0:
        return I0 if exact - I0 < align / 2 else None
    inter = (math.floor(exact / align) if at_most else int(round(exact / align))) * align
    return inter if align <= inter < I0 else None


def hidden_options(D: int, align: int, given: float | None) -> list[int]:
    fracs = [given] if given is not None else [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6]
    out = []
    for f in fracs:
        d = D if f >= 1 else max(align, int(round(D * f / align)) * align)
        if d <= D and d not in out and aligned(d, D, align):
            out.append(d)
    return out


def search_uniform(scores, base: Geometry, keep_params: int, align: int, hidden_keep: float | None,
                   evaluate, log=print, at_most: bool = False) -> tuple[Plan, list[dict]]:
    """Pick (hidden, kv groups, heads/group, intermediate) meeting the budget with the lowest evaluate(plan) loss.

    evaluate(plan) -> float; called on a few candidates only (coarse-to-fine), each a real pruned model."""
    D = base.hidden_size
    w0 = base.layers[0]
    K = w0.num_key_value_heads
    attn = attention_options(w0.num_attention_heads, K, base.head_dim, align)
    hid = hidden_options(D, align, hidden_keep)
    tried: dict[tuple, dict] = {}

    def trial(d, k, g):
        key = (d, k, g)
        if key not in tried:
            inter = solve_intermediate(base, d, k * g, k, keep_params, align, at_most)
            if inter is None:
                tried[key] = {"hidden": d, "kv_heads": k, "heads": k * g, "intermediate": None, "loss": math.inf}
            else:
                loss = evaluate(uniform_plan(scores, base, d, k, g, inter))
                tried[key] = {"hidden": d, "kv_heads": k, "heads": k * g, "intermediate": inter, "loss": loss}
                log(f"prune: candidate hidden {d} heads {k * g}/{k} kv intermediate {inter}: loss {loss:.4f}")
        return tried[key]["loss"]

    # 1) hidden width, attention dense (or, if that cannot meet the budget, the least-pruned feasible attention)
    def first_feasible_attn(d):
        for k, g in attn:
            if solve_intermediate(base, d, k * g, k, keep_params, align, at_most) is not None:
                return k, g
        return None

    best, worse = None, 0
    for d in hid:  # narrower hidden widths only get worse once they start to: stop after two misses in a row
        kg = first_feasible_attn(d)
        if not kg:
            continue
        if best is None or trial(d, *kg) < trial(*best):
            best, worse = (d, *kg), 0
        else:
            worse += 1
            if worse == 2:
                break
    if best is None:
        if hidden_keep is not None:
            raise EdgekitError(f"no uniform widths meet this budget with --hidden-keep {hidden_keep} (hidden width "
                               f"{hid[0] if hid else D}): the hidden cut alone removes more than the budget asks, "
                               "or the rest cannot remove enough", "change --hidden-keep, or drop it so edgekit "
                               "searches the hidden width")
        raise EdgekitError(f"no uniform widths meet this budget: the search narrows the hidden width to at most "
                           f"{hid[-1]} of {D} channels", "ask for a smaller ratio, or pass a smaller --hidden-keep "
                           "(e.g. 0.4) to allow a narrower hidden width")
    # 2) attention at that hidden width
    for k, g in attn:
        if trial(best[0], k, g) < trial(*best):
            best = (best[0], k, g)
    # 3) hidden neighbours at that attention
    i = hid.index(best[0])
    for d in hid[max(0, i - 1):i + 2]:
        if trial(d, best[1], best[2]) < trial(*best):
            best = (d, best[1], best[2])
    d, k, g = best
    inter = tried[best]["intermediate"]
    return uniform_plan(scores, base, d, k, g, inter), sorted(
        (v for v in tried.values() if v["intermediate"]), key=lambda v: v["loss"])


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
        raise EdgekitError("pruning the hidden width alone already meets this budget", "ask for a larger ratio")

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
        if not cands:
            raise EdgekitError("this budget would leave a layer with nothing to keep",
                               "ask for a smaller ratio (at least one aligned unit of every structure stays)")
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
    w0 = base.layers[0]
    d_min = min(base.hidden_size, align)
    step = head_step(base.head_dim, align)
    k_min = min(w0.num_key_value_heads, max(1, step))
    heads_min = w0.num_attention_heads if step > w0.num_attention_heads else max(step, 1)
    smallest = base.with_(hidden_size=d_min, layers=(LayerWidths(min(w0.intermediate_size, align),
                                                                 heads_min, k_min),) * len(base.layers)).params()
    if keep_params < smallest:
        raise EdgekitError(f"this budget keeps {keep_params:,} parameters, but a model with one aligned unit of "
                           f"every structure per layer already has {smallest:,}: a layer would be left with nothing",
                           "ask for a smaller ratio or a smaller --align")
