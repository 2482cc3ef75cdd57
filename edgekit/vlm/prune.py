"""Widthwise pruning of both towers of a vision-language model, scored on image+caption pairs.

Importance (`criterion`): by default modality-aware activations (modality_scores): what each unit adds to the
residual stream, measured on the tokens of its modality that the caption loss reads (language units on the text
positions, vision units on the tower's tokens, zero in vision layers the projector does not read). `ukmp` is
UKMP-style first-order saliency: |w * dL/dw| of the caption loss (image tokens in, caption tokens scored), summed
over each structure's weights, then normalized per block (each layer's MLP neurons, heads and KV groups divided by
that block's mean) and per modality (vision vs language), so the two towers' scores are on one scale although their
gradients differ by orders of magnitude; `activation` is the plain baseline. On a tiny trained LLaVA the default
beats both (bench/vlm_importance.md). What is cut:

- vision tower (CLIP, Idefics3's SigLIP-style tower): MLP neurons (fc1 rows, fc2 columns) and, with
  `vision_heads`, heads. Their attention sizes head_dim as hidden / heads, so heads are cut together with the
  vision hidden width (kept heads x head_dim channels, edgekit.vision.prune.cut_width): each layer keeps its most
  salient heads (the vision head scores), the tower its channels with the largest activation score E[x_c^2] *
  ||W[:, c]||^2 over everything that reads the residual stream (projector included; one forward on the pairs).
- language model: MLP neurons, query heads and KV groups, and (with hidden_keep < 1) hidden channels, through
  edgekit's decoder pruner (edgekit.prune: allocate + apply) on the language model's causal-LM view;
- projector (the family's prune_projector): LLaVA's linear_2 output follows the kept LM hidden channels, linear_1's
  output / linear_2's input (also LM-hidden wide) keep their most salient units; Idefics3's one connector linear
  keeps the LM hidden rows; the input side follows the kept vision channels (prune_projector_input) when vision
  heads are cut.

First-order saliency predicts the loss of small cuts; a 30% cut removes most of some layers, so the ukmp criterion
reaches each candidate's widths in `steps` re-scored steps (iterative_vlm; bench/vlm_importance.md measures why).

How the parameter budget is shared between the towers: candidate splits are ranked by the share of saliency they
remove from one pool of both towers (per-block normalized, weighted by each structure's parameters: UKMP's global
threshold on uniform plans) and the best few are scored by the caption loss of the real pruned model on held-out
pairs (candidates giving the same plan are scored once); `keep_vision` / `keep_language` put the whole cut on the
other tower. Widths are uniform, so the result is a plain Hugging Face folder (from_pretrained loads it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError

REPORT_FILE = "edgekit-vlm-prune.json"
CRITERIA = ("modality", "ukmp", "activation")
SPLITS = (0.0, 0.15, 0.3, 0.5, 0.7, 0.85, 1.0)  # candidate shares of the removed parameters taken from vision


@dataclass(frozen=True)
class VlmPruneConfig:
    ratio: float  # fraction of the whole model's parameters removed
    keep_vision: bool = False
    keep_language: bool = False
    align: int = 8
    hidden_keep: float = 1.0  # fraction of the language model's hidden channels kept
    # share of the removed parameters (past a vision_heads cut) taken from the vision MLPs (None: searched)
    vision_share: float | None = None
    calibration: Path | None = None  # image+caption pairs (folder with captions.jsonl or a .jsonl); None: generated
    num_samples: int = 16
    search_samples: int = 4
    batch_size: int = 4
    evaluate_splits: int = 3  # best-ranked splits scored by caption loss
    # modality: activations on each modality's own tokens (modality_scores); ukmp: normalized |w * grad|;
    # activation: plain activation importance (a baseline)
    criterion: str = "modality"
    steps: int = 4  # ukmp: the cut is reached in this many re-scored steps (first-order saliency is local)
    vision_heads: int | None = None  # vision heads kept per layer, the vision hidden width with them (None: all)

    def check(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and 0 < self.ratio < 1):
            raise EdgekitError(f"pruning ratio must be between 0 and 1 (exclusive), got {self.ratio}",
                               "e.g. --ratio 0.3 removes 30% of the parameters")
        if self.keep_vision and self.keep_language:
            raise EdgekitError("--keep-vision and --keep-language together leave nothing to prune",
                               "pass at most one of --keep-vision / --keep-language")
        if self.align < 1:
            raise EdgekitError(f"alignment must be a positive integer, got {self.align}", "e.g. --align 8")
        if self.vision_share is not None and not (0 <= self.vision_share <= 1) or \
                self.vision_share is not None and (self.keep_vision or self.keep_language):
            raise EdgekitError(f"--vision-share {self.vision_share} must be in [0, 1] and without --keep-vision / "
                               "--keep-language", "pass --vision-share 0.5 alone, or --keep-vision or --keep-language alone")
        if not 0 < self.hidden_keep <= 1:
            raise EdgekitError(f"--hidden-keep must be in (0, 1], got {self.hidden_keep}", "e.g. --hidden-keep 0.75")
        if self.criterion not in CRITERIA:
            raise EdgekitError(f"unknown VLM importance criterion {self.criterion!r}",
                               f"use one of {', '.join(CRITERIA)}")
        for n in ("num_samples", "search_samples", "batch_size", "steps"):
            if getattr(self, n) < 1:
                raise EdgekitError(f"{n} must be at least 1, got {getattr(self, n)}", f"pass a positive {n}")
        from edgekit.vision.prune import check_heads

        check_heads(self.vision_heads, None, "--vision-heads")
        if self.vision_heads is not None and self.keep_vision:
            raise EdgekitError("--vision-heads cuts the vision tower, --keep-vision leaves it whole",
                               "pass one of --vision-heads / --keep-vision")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["calibration"] = str(self.calibration) if self.calibration else None
        return d


# -- importance ---------------------------------------------------------------------------------------------------

@dataclass
class VlmScores:
    vision_mlp: list  # [layer] -> (intermediate,)
    vision_heads: list  # [layer] -> (heads,)
    language: object  # edgekit.prune.criteria.Scores of the language model
    projector_inner: object  # (text hidden,): linear_1 rows + linear_2 columns


def saliency(model, fam, items, pad_id: int, batch_size: int = 4) -> VlmScores:
    """First-order saliency |w * grad| of the caption loss, per structure of both towers, accumulated batch by
    batch (|w * g_b| summed over batches b, not |w * sum_b g_b|: near convergence the batches' gradients cancel in
    the sum, and the score would measure that noise)."""
    from edgekit.vlm.data import batches

    total, n = None, 0
    for b in batches(items, batch_size, pad_id):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                    labels=b.labels, use_cache=False)
        (out.loss * b.input_ids.shape[0]).backward()
        n += b.input_ids.shape[0]
        part = _grad_scores(model, fam)
        total = part if total is None else _add(total, part)
    model.zero_grad(set_to_none=True)
    return _scale(total, 1 / max(n, 1))


def _grad_scores(model, fam) -> VlmScores:
    import torch

    from edgekit.prune.criteria import weight_saliency

    def s(p):
        return (p.grad * p.detach()).abs().double() if p.grad is not None else \
            torch.zeros_like(p, dtype=torch.float64)

    with torch.no_grad():
        vcfg = model.config.vision_config
        hd = vcfg.hidden_size // vcfg.num_attention_heads
        vm, vh = [], []
        for layer in fam.vision_layers(model):
            fc1, fc2 = fam.vision_fc(layer)
            vm.append(s(fc1.weight).sum(1) + s(fc1.bias) + s(fc2.weight).sum(0))
            q, k, v = fam.vision_qkv(layer)
            h = sum(s(m.weight).sum(1) + s(m.bias) for m in (q, k, v)) + s(fam.vision_out(layer).weight).sum(0)
            vh.append(h.view(-1, hd).sum(1))
        lfam = fam.language_family(model.config.to_dict())
        lang = weight_saliency(fam.language_view(model), lfam, s)
        proj = fam.projector(model)
        inner = torch.zeros(0, dtype=torch.float64)  # a one-layer projector has no inner units
        if len(proj) == 2:
            l1, l2 = proj
            inner = s(l1.weight).sum(1) + s(l2.weight).sum(0) + (s(l1.bias) if l1.bias is not None else 0)
    return VlmScores(vm, vh, lang, inner)


def _map(f, *scs: VlmScores) -> VlmScores:
    from edgekit.prune.criteria import Scores

    def lists(get):
        return [f(*xs) for xs in zip(*(get(x) for x in scs))]

    L = [x.language for x in scs]
    lang = Scores([f(*xs) for xs in zip(*(l.mlp for l in L))], [f(*xs) for xs in zip(*(l.heads for l in L))],
                  [f(*xs) for xs in zip(*(l.kv for l in L))], f(*(l.hidden for l in L)))
    return VlmScores(lists(lambda x: x.vision_mlp), lists(lambda x: x.vision_heads), lang,
                     f(*(x.projector_inner for x in scs)))


def _add(a: VlmScores, b: VlmScores) -> VlmScores:
    return _map(lambda x, y: x + y, a, b)


def _scale(a: VlmScores, c: float) -> VlmScores:
    return _map(lambda x: x * c, a)


def activation_scores(model, fam, items, pad_id: int, batch_size: int = 4) -> VlmScores:
    """Plain activation importance (Minitron-style, edgekit.prune.criteria.activation) on image+caption pairs, not
    normalized: a vision MLP neuron scores E[h_j^2] * ||fc2[:, j]||^2, a head E||W_out,h a_h||^2; the language
    model's scores come from the decoder criterion itself, its hooks fed by the VLM's forward."""
    import torch

    from edgekit.prune.criteria import activation
    from edgekit.vlm.data import batches

    vcfg = model.config.vision_config
    hd = vcfg.hidden_size // vcfg.num_attention_heads
    layers = fam.vision_layers(model)
    mlp_sq, head_sq, hooks, toks = [0.0] * len(layers), [0.0] * len(layers), [], [0]

    def mlp_hook(i):
        def f(mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            mlp_sq[i] = mlp_sq[i] + x.pow(2).sum(0)
            if i == 0:
                toks[0] += x.shape[0]
        return f

    def head_hook(i, gram):
        def f(mod, inputs):
            a = inputs[0].detach().reshape(-1, gram.shape[0], hd).double()
            head_sq[i] = head_sq[i] + torch.einsum("nhd,hde,nhe->h", a, gram, a)
        return f

    for i, layer in enumerate(layers):
        o = fam.vision_out(layer)
        w = o.weight.detach().double().view(o.out_features, -1, hd)
        hooks.append(fam.vision_fc(layer)[1].register_forward_pre_hook(mlp_hook(i)))
        hooks.append(o.register_forward_pre_hook(head_hook(i, torch.einsum("ohd,ohe->hde", w, w))))

    def drive():  # the decoder criterion's hooks sit on the language modules the VLM forward runs
        for b in batches(items, batch_size, pad_id):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                  use_cache=False)
        return iter(())

    class _Drive:
        def __iter__(self):
            return drive()

    try:
        with torch.no_grad():
            lang = activation(fam.language_view(model), fam.language_family(model.config.to_dict()), _Drive())
    finally:
        for h in hooks:
            h.remove()
    n = max(toks[0], 1)
    vm = [mlp_sq[i] / n * fam.vision_fc(l)[1].weight.detach().double().pow(2).sum(0) for i, l in enumerate(layers)]
    vh = [head_sq[i] / n for i in range(len(layers))]
    proj = fam.projector(model)
    inner = proj[1].weight.detach().double().pow(2).sum(0) if len(proj) == 2 else torch.zeros(0, dtype=torch.float64)
    return VlmScores(vm, vh, lang, inner)


def modality_scores(model, fam, items, pad_id: int, batch_size: int = 4) -> VlmScores:
    """Modality-aware activation importance (the default): each unit scores what it adds to the residual stream
    (as activation_scores) on the tokens of the modality whose output the caption loss reads. Language MLP neurons
    and heads are measured on the text positions only: image positions (the projected patches, most of the
    sequence) would otherwise set their ranking, and weighting them back in at 10-50% measured worse
    (bench/vlm_importance.md). Vision units are measured on the tower's own tokens, and score zero in the layers
    after the last one the projector reads (LLaVA's vision_feature_layer -2 leaves the last CLIP layer unread), so
    the split ranking sees those units as free. KV groups, hidden channels (they carry both modalities) and the
    projector keep activation_scores' values. Not normalized: plans keep each block's top-k and the split ranking
    takes shares of each block, so a per-block or per-modality scale would change nothing."""
    import torch

    from edgekit.prune.criteria import Scores, _geom

    lm = fam.language_view(model)
    lfam = fam.language_family(model.config.to_dict())
    layers = list(lfam.layers(lm))
    hd = _geom(lm)
    image_id = fam.image_token_id(model.config.to_dict())
    text, n = [None], [0]
    mlp_sq, head_sq = [0.0] * len(layers), [0.0] * len(layers)

    def positions(mod, args, kwargs):  # the text positions of each batch the VLM forward runs
        text[0] = ((kwargs["input_ids"] != image_id) & kwargs["attention_mask"].bool()).reshape(-1)
        n[0] += int(text[0].sum())

    def mlp_hook(i):
        def f(mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[text[0]].double()
            mlp_sq[i] = mlp_sq[i] + x.pow(2).sum(0)
        return f

    def head_hook(i, gram):
        def f(mod, inputs):
            a = inputs[0].detach().reshape(-1, gram.shape[0], hd)[text[0]].double()
            head_sq[i] = head_sq[i] + torch.einsum("nhd,hde,nhe->h", a, gram, a)
        return f

    hooks = [model.register_forward_pre_hook(positions, with_kwargs=True)]
    try:
        for i, layer in enumerate(layers):
            o = lfam.o(layer)
            w = o.weight.detach().double().view(o.out_features, -1, hd)
            hooks.append(lfam.down(layer).register_forward_pre_hook(mlp_hook(i)))
            hooks.append(o.register_forward_pre_hook(head_hook(i, torch.einsum("ohd,ohe->hde", w, w))))
        sc = activation_scores(model, fam, items, pad_id, batch_size)  # one forward feeds both sets of hooks
    finally:
        for h in hooks:
            h.remove()
    m = max(n[0], 1)
    wd = [lfam.down(layer).weight.detach().double().pow(2).sum(0) for layer in layers]
    sc.language = Scores([mlp_sq[i] / m * wd[i] for i in range(len(layers))], [h / m for h in head_sq],
                         sc.language.kv, sc.language.hidden)
    read = vision_layers_read(model.config.to_dict(), len(sc.vision_mlp))
    sc.vision_mlp = [t if i < read else t * 0 for i, t in enumerate(sc.vision_mlp)]
    sc.vision_heads = [t if i < read else t * 0 for i, t in enumerate(sc.vision_heads)]
    return sc


def vision_layers_read(cfg: dict, layers: int) -> int:
    """How many vision layers (from the first) feed what the projector reads: up to LLaVA's vision_feature_layer
    (a hidden-states index: 0 the embeddings, -1 the last layer), every layer where the config names none."""
    f = cfg.get("vision_feature_layer")
    if f is None:
        return layers
    return max(i if i >= 0 else layers + 1 + i for i in ([f] if isinstance(f, int) else f))


def normalize(sc: VlmScores) -> VlmScores:
    """Per block (each layer's MLP / heads / KV groups) to mean 1, then per modality to mean 1, so a unit's score
    says how it compares with the other units of its block, whatever the tower's gradient scale."""
    from edgekit.prune.criteria import Scores

    def block(t):
        if not t.numel():
            return t
        m = t.mean()
        return t / m if m > 0 else t * 0 + 1.0

    def modality(blocks):
        m = sum(float(b.sum()) for b in blocks) / max(sum(b.numel() for b in blocks), 1)
        return [b / m if m > 0 else b for b in blocks]

    vm = modality([block(t) for t in sc.vision_mlp])
    vh = modality([block(t) for t in sc.vision_heads])
    L = sc.language
    lang = Scores(modality([block(t) for t in L.mlp]), modality([block(t) for t in L.heads]),
                  modality([block(t) for t in L.kv]), block(L.hidden))
    return VlmScores(vm, vh, lang, block(sc.projector_inner))


# -- plans --------------------------------------------------------------------------------------------------------

@dataclass
class VlmPlan:
    vision_mlp: list | None  # per vision layer: kept fc neurons (None: vision untouched)
    language: object | None  # edgekit.prune.allocate.Plan of the language model (None: untouched)
    projector_inner: list | None  # kept linear_1 rows / linear_2 columns (None: all)
    vision_hidden: list | None = None  # kept vision hidden channels, with vision_heads (None: all)
    vision_heads: list | None = None  # per vision layer: kept heads (None: all)

    def vision_intermediate(self, full: int) -> int:
        return len(self.vision_mlp[0]) if self.vision_mlp else full


def _top(t, k):
    from edgekit.prune.allocate import _top

    return _top(t, k)


def vision_plan(scores: VlmScores, vgeo, keep_mlp: int):
    return [_top(s, keep_mlp) for s in scores.vision_mlp] if keep_mlp < vgeo.layers[0].intermediate_size else None


def unit_params(geo) -> dict:
    """Parameters one unit of each prunable structure holds (a vision MLP neuron, a language MLP neuron, a query
    head with its share of o_proj)."""
    v, lang = geo.vision, geo.language
    return {"vision_mlp": 2 * v.hidden_size + 1,
            "mlp": 3 * lang.hidden_size + (2 if lang.mlp_bias else 0),
            "heads": 2 * lang.hidden_size * lang.head_dim + (lang.head_dim if lang.qkv_bias else 0)}


def removed_saliency(scores: VlmScores, plan: VlmPlan, units: dict) -> float:
    """The share of one pool of both towers' saliency a plan removes (UKMP's global threshold, on uniform plans):
    within a block a unit counts as its share of the block's score (normalized per block, whatever the criterion's
    scale), and each block weighs as many parameters as its units hold, so a head costs what its parameters cost
    against MLP neurons of either tower. A block scoring zero throughout (a layer nothing reads) costs nothing."""
    total = cost = 0.0

    def add(kind, blocks, kept):
        nonlocal total, cost
        for b, k in zip(blocks, kept):
            w = units[kind] * len(b)
            total += w
            if k is not None:
                s = float(b.sum())
                cost += w * (1 - float(b[k].sum()) / s) if s > 0 else 0.0  # all zero: a layer nothing reads

    add("vision_mlp", scores.vision_mlp, plan.vision_mlp or [None] * len(scores.vision_mlp))
    L, lp = scores.language, plan.language.layers if plan.language else [None] * len(scores.language.mlp)
    add("mlp", L.mlp, [p and p.mlp for p in lp])
    add("heads", L.heads, [p and p.heads for p in lp])
    return cost / total


def _kept(x):
    """What a plan keeps, hashable (norm scales follow from the kept hidden channels)."""
    if hasattr(x, "__dataclass_fields__"):
        return tuple(_kept(getattr(x, f)) for f in x.__dataclass_fields__ if f != "norm_scales")
    if isinstance(x, (list, tuple)):
        return tuple(_kept(v) for v in x)
    return x if x is None or isinstance(x, (int, float, str)) else id(x)


def distinct(ranked: list, cands: dict) -> list:
    """ranked without the keys whose plan an earlier key already has (shares past a tower's floor clamp to one
    plan), so the splits scored by caption loss are different models."""
    seen, out = set(), []
    for k in ranked:
        if (sig := _kept(cands[k])) not in seen:
            seen.add(sig)
            out.append(k)
    return out


# -- building the pruned model ------------------------------------------------------------------------------------

def pruned_vlm(model, fam, plan: VlmPlan):
    """(config dict, state dict) of the VLM cut to plan (standard names: from_pretrained loads the saved folder)."""
    import torch

    from edgekit.prune.apply import pruned_config, pruned_state

    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if plan.vision_mlp:
        vp = fam.VISION_PREFIX
        for i, kept in enumerate(plan.vision_mlp):
            ix = torch.tensor(kept, dtype=torch.long)
            p = f"{vp}encoder.layers.{i}.mlp."
            sd[p + "fc1.weight"], sd[p + "fc1.bias"] = sd[p + "fc1.weight"][ix], sd[p + "fc1.bias"][ix]
            sd[p + "fc2.weight"] = sd[p + "fc2.weight"][:, ix]
        cfg["vision_config"]["intermediate_size"] = len(plan.vision_mlp[0])
    if plan.vision_heads:  # heads with the hidden width (head_dim = hidden / heads); the projector's input follows
        from edgekit.vision.prune import cut_width

        v = cfg["vision_config"]
        cut_width(sd, fam.vision_width_layout(cfg), plan.vision_hidden, plan.vision_heads,
                  v["hidden_size"] // v["num_attention_heads"])
        fam.prune_projector_input(sd, plan.vision_hidden, v["hidden_size"])
        v["hidden_size"], v["num_attention_heads"] = len(plan.vision_hidden), len(plan.vision_heads[0])
    if plan.language:
        lm = fam.language_view(model)
        lfam = fam.language_family(cfg)
        for k in [k for k in sd if k.startswith(fam.LANGUAGE_PREFIX) or k == "lm_head.weight"]:
            del sd[k]
        for k, v in pruned_state(lm, lfam, plan.language).items():
            sd[fam.language_state_name(k)] = v
        text = pruned_config(lm, plan.language)
        cfg["text_config"] = {**cfg["text_config"], **{k: text[k] for k in (
            "hidden_size", "head_dim", "intermediate_size", "num_attention_heads", "num_key_value_heads")}}
        hid = torch.tensor(plan.language.hidden, dtype=torch.long)
        D = model.config.text_config.hidden_size
        if len(hid) < D:
            inner = torch.tensor(plan.projector_inner, dtype=torch.long) if plan.projector_inner else None
            fam.prune_projector(sd, hid, inner)
    return cfg, sd


def build_vlm(fam, cfg: dict, state: dict):
    import torch
    import transformers
    from transformers.modeling_utils import no_init_weights

    config = getattr(transformers, fam.config_class).from_dict(dict(cfg))
    with no_init_weights():
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(config.get_text_config().tie_word_embeddings)
    if set(missing) - ({"lm_head.weight"} if tied else set()) or unexpected:
        raise ValueError(f"pruned VLM does not match its config: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()


def iterative_vlm(model, fam, scores: VlmScores, plan: VlmPlan, calib, pad_id: int, steps: int, align: int,
                  batch_size: int = 4):
    """The model cut to plan's widths in `steps` re-scored steps. First-order saliency predicts the loss of a small
    cut, not of removing most of a layer at once (scored once, the units that looked cheapest together are not),
    so each step removes an equal share of the MLP neurons left to cut, scored by |w * grad| on the model the
    previous step left. The first step also applies plan's attention shape, hidden channels, projector cut and
    vision heads + hidden width, scored on the dense model (`scores`)."""
    import json as _json

    from edgekit.prune import allocate

    geo = fam.geometry(model.config.to_dict())
    I_v, I_l = geo.vision.layers[0].intermediate_size, geo.language.layers[0].intermediate_size
    t_v = plan.vision_intermediate(I_v)
    t_l = len(plan.language.layers[0].mlp) if plan.language else I_l

    def at(full, target, f):  # the aligned width a fraction f of the way from full to target
        return full if target >= full else max(target, int(round((full - (full - target) * f) / align)) * align)

    m, sc = model, scores
    for s in range(1, steps + 1):
        if s > 1:
            sc = normalize(saliency(m, fam, calib, pad_id, batch_size))
        g = fam.geometry(_json.loads(m.config.to_json_string()))
        lg, w = g.language, g.language.layers[0]
        kv, ki = at(I_v, t_v, s / steps), at(I_l, t_l, s / steps)
        vp = vision_plan(sc, g.vision, kv) if kv < g.vision.layers[0].intermediate_size else None
        lp = None
        if s == 1 and plan.language:
            k = len(plan.language.layers[0].kv)
            lp = allocate.uniform_plan(sc.language, lg, len(plan.language.hidden), k,
                                       len(plan.language.layers[0].heads) // k, ki)
            lp.hidden, lp.norm_scales = plan.language.hidden, plan.language.norm_scales
        elif ki < w.intermediate_size:
            lp = allocate.uniform_plan(sc.language, lg, lg.hidden_size, w.num_key_value_heads,
                                       w.num_attention_heads // w.num_key_value_heads, ki)
            lp.hidden = list(range(lg.hidden_size))
        first = s == 1
        if vp or lp or first and plan.vision_heads:
            width = (plan.vision_hidden, plan.vision_heads) if first else ()
            m = build_vlm(fam, *pruned_vlm(m, fam, VlmPlan(vp, lp, plan.projector_inner if first else None, *width)))
    return m


def caption_loss(model, items, pad_id: int, batch_size: int = 4) -> float:
    """Token-averaged caption cross-entropy (nats) given each image."""
    import torch

    from edgekit.vlm.data import batches

    total, n = 0.0, 0
    with torch.inference_mode():
        for b in batches(items, batch_size, pad_id):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                           use_cache=False).logits[:, :-1].float()
            tgt = b.labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            n += int((tgt != -100).sum())
    return total / max(n, 1)


# -- the verb -----------------------------------------------------------------------------------------------------

def _calibration(model_dir, fam, mcfg, cfg: VlmPruneConfig, log):
    from edgekit.vlm.data import encode, generate_pairs, load_pairs

    if cfg.calibration is None:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="edgekit-vlm-pairs-"))
        log(f"prune: no --calibration given: scoring on {cfg.num_samples + cfg.search_samples} generated "
            "shape images with captions (pass your own image+caption pairs for a real model)")
        pairs = load_pairs(generate_pairs(tmp, cfg.num_samples + cfg.search_samples))
    else:
        pairs = load_pairs(cfg.calibration)
    tok, _, items = encode(model_dir, pairs[:cfg.num_samples + cfg.search_samples], fam, mcfg)
    if len(items) <= cfg.search_samples:
        return tok, items, items
    return tok, items[:-cfg.search_samples], items[-cfg.search_samples:]


def prune_vlm(model_dir: Path, out: Path, cfg: VlmPruneConfig, log=print) -> dict:
    """Prune the VLM folder model_dir into out (atomically); returns the report (also written to out)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.arch import vlm_family_of
    from edgekit.fsutil import atomic_dir, atomic_write_json
    from edgekit.prune import allocate
    from edgekit.prune.apply import norm_scales
    from edgekit.vision.prune import check_heads

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    cfg.check()
    if not (model_dir / "config.json").is_file():
        raise EdgekitError(f"{model_dir} is not a model folder (no config.json)",
                           "pass a Hugging Face VLM folder (config.json + safetensors)")
    mcfg = json.loads((model_dir / "config.json").read_text())
    fam = vlm_family_of(mcfg)
    geo = fam.geometry(mcfg)
    total = geo.params()
    removed = int(round(cfg.ratio * total))
    vis, lang = geo.vision, geo.language
    A = cfg.align
    H_v = vis.layers[0].num_attention_heads
    check_heads(cfg.vision_heads, H_v, "--vision-heads")
    heads_cut = cfg.vision_heads is not None and cfg.vision_heads < H_v
    width_cut = 0  # what cutting the vision heads with the vision hidden width removes (projector input included)
    if heads_cut:
        geo_w = fam.geometry(vision_width_config(mcfg, cfg.vision_heads * vis.head_dim, cfg.vision_heads))
        width_cut = total - geo_w.params()
        if width_cut > removed:
            frac = width_cut / total
            raise EdgekitError(f"--vision-heads {cfg.vision_heads} alone removes {frac:.1%} of the parameters "
                               f"(vision hidden {vis.hidden_size} -> {geo_w.vision.hidden_size}), more than "
                               f"--ratio {cfg.ratio}", f"pass --ratio {math.ceil(frac * 1000) / 1000} or more, or "
                               "keep more --vision-heads")
        vis = geo_w.vision  # the MLP neurons and the language model share the rest of the cut
    rest = removed - width_cut
    vmlp_unit = len(vis.layers) * (2 * vis.hidden_size + 1)  # parameters of one vision MLP neuron in every layer
    I_v = vis.layers[0].intermediate_size
    v_most = 0 if cfg.keep_vision else (I_v - min(A, I_v)) * vmlp_unit
    l_small = allocate.smallest_uniform(lang, A)[0]
    l_most = 0 if cfg.keep_language else lang.params() - l_small
    if rest > v_most + l_most:
        most = math.floor((width_cut + v_most + l_most) / total * 1000) / 1000
        where = "the vision MLPs" if cfg.keep_language else "the language model" if cfg.keep_vision else \
            "the vision MLPs and the language model"
        where = where.replace("vision MLPs", "vision heads and MLPs") if heads_cut else where
        raise EdgekitError(f"--ratio {cfg.ratio} removes {removed:,} parameters, but {where} can give at most "
                           f"{width_cut + v_most + l_most:,} at --align {A} ({most:.1%} of the model)",
                           f"ask for --ratio {most} or less" + ("" if cfg.keep_language or cfg.keep_vision else
                                                                 ", or a smaller --align"))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok, calib, search = _calibration(model_dir, fam, mcfg, cfg, log)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    log(f"prune: scoring both towers on {len(calib)} image+caption pairs (" + {
        "modality": "activations on each modality's own tokens)", "ukmp": "|w * grad|, normalized per block and "
        "modality)", "activation": "plain activations)"}[cfg.criterion])
    t1 = time.perf_counter()
    if cfg.criterion == "ukmp":
        scores = normalize(saliency(model, fam, calib, pad, cfg.batch_size))
    else:
        scores = (modality_scores if cfg.criterion == "modality" else activation_scores)(
            model, fam, calib, pad, cfg.batch_size)
    score_s = round(time.perf_counter() - t1, 2)
    dense_loss = caption_loss(model, search, pad)
    lm = fam.language_view(model)
    lfam = fam.language_family(mcfg)
    D = lang.hidden_size
    d_keep = allocate.hidden_options(D, A, cfg.hidden_keep)[0] if cfg.hidden_keep < 1 else D
    hidden = _top(scores.language.hidden, d_keep)
    scales = None
    if d_keep < D:  # RMSNorm correction for the removed channels, on the captions' text
        seqs = _caption_sequences(calib, fam, mcfg)
        scales = norm_scales(lm, lfam, seqs, {d_keep: hidden})[d_keep]
    inner = _top(scores.projector_inner, d_keep) if d_keep < D and len(scores.projector_inner) else None

    w0 = lang.layers[0]
    attn_opts = allocate.attention_options(w0.num_attention_heads, w0.num_key_value_heads, lang.head_dim, A)

    def lang_plan(keep_params, kg):
        inter = allocate.solve_intermediate(lang, d_keep, kg[0] * kg[1], kg[0], keep_params, A, at_most=True)
        if inter is None:
            return None
        p = allocate.uniform_plan(scores.language, lang, d_keep, kg[0], kg[1], inter)
        p.hidden, p.norm_scales = hidden, scales
        return p

    def plans_for(share: float) -> list:
        """Plans taking `share` of the cut from the vision MLPs; for the language model, the two widest
        attention shapes (KV groups x heads per group) that leave an aligned MLP width on the budget."""
        v_cut = min(int(round(share * rest)), v_most)
        keep_mlp = I_v - math.ceil(v_cut / vmlp_unit / A) * A if v_cut else I_v
        keep_mlp = max(keep_mlp, min(A, I_v))
        l_cut = rest - (I_v - keep_mlp) * vmlp_unit
        if l_cut > l_most:
            return []
        vp = vision_plan(scores, vis, keep_mlp)
        if l_cut <= 0 and d_keep == D:
            return [((share, None), VlmPlan(vp, None, inner))]
        out = []
        for kg in attn_opts:
            lp = lang_plan(lang.params() - max(l_cut, 0), kg)
            if lp is not None:
                out.append(((share, kg), VlmPlan(vp, lp, inner)))
            if len(out) == 2:
                break
        return out

    shares = [0.0] if cfg.keep_vision else [1.0] if cfg.keep_language else \
        [cfg.vision_share] if cfg.vision_share is not None else list(SPLITS)
    cands = dict(kv for s in shares for kv in plans_for(s))
    if not cands:
        raise EdgekitError(f"no uniform cut of both towers lands on --ratio {cfg.ratio} at --align {A}",
                           "pass a smaller --ratio or --align")
    if heads_cut:  # one vision width cut, the same in every candidate
        v_hidden, v_heads = vision_width_plan(model, fam, scores, calib, cfg.vision_heads, cfg.batch_size)
        log(f"prune: vision heads {H_v} -> {cfg.vision_heads} per layer, vision hidden {geo.vision.hidden_size} -> "
            f"{len(v_hidden)} (head_dim {vis.head_dim}; the projector's input follows)")
        for p in cands.values():
            p.vision_hidden, p.vision_heads = v_hidden, v_heads
    units = unit_params(geo_w if heads_cut else geo)
    ranked = distinct(sorted(cands, key=lambda s: removed_saliency(scores, cands[s], units)), cands)
    iterative = cfg.criterion == "ukmp" and cfg.steps > 1

    def build(plan):
        if iterative:
            return iterative_vlm(model, fam, scores, plan, calib, pad, cfg.steps, A, cfg.batch_size)
        return build_vlm(fam, *pruned_vlm(model, fam, plan))

    tried, built = [], {}
    for key in ranked[:cfg.evaluate_splits]:
        built[key] = build(cands[key])
        loss = caption_loss(built[key], search, pad)
        share, kg = key
        tried.append({"vision_share": share, "language_kv_heads": kg and kg[0],
                      "language_heads": kg and kg[0] * kg[1],
                      "removed_saliency": round(removed_saliency(scores, cands[key], units), 4), "loss": loss,
                      "key": key})
        log(f"prune: {share:.0%} of the cut{' past the vision heads' if heads_cut else ''} from vision" + (
            f", language heads {kg[0] * kg[1]}/{kg[0]} kv" if kg else "") +
            f": normalized saliency removed {tried[-1]['removed_saliency']:.3f}, caption loss {loss:.4f}")
    best = min(tried, key=lambda t: t["loss"])
    pruned = built[best.pop("key")]
    for t in tried:
        t.pop("key", None)
    after = fam.geometry(json.loads(pruned.config.to_json_string()))
    final_loss = caption_loss(pruned, search, pad)
    report = {
        "source": str(model_dir), "arch": fam.model_type, "task": fam.task, "config": cfg.to_dict(),
        "params_before": total, "params_after": after.params(),
        "removed_fraction": round(1 - after.params() / total, 5),
        "parts_before": geo.parts(), "parts_after": after.parts(),
        "vision": {"intermediate": [I_v, after.vision.layers[0].intermediate_size],
                   "heads": [H_v, after.vision.layers[0].num_attention_heads],
                   "hidden": [geo.vision.hidden_size, after.vision.hidden_size],
                   **({} if heads_cut else {"heads_not_cut": "head_dim is hidden / heads: --vision-heads N cuts "
                                                              "heads together with the vision hidden width"})},
        "language": {"hidden": [D, after.language.hidden_size],
                     "intermediate": [lang.layers[0].intermediate_size, after.language.layers[0].intermediate_size],
                     "heads": [lang.layers[0].num_attention_heads, after.language.layers[0].num_attention_heads],
                     "kv_heads": [lang.layers[0].num_key_value_heads, after.language.layers[0].num_key_value_heads]},
        "splits": tried, "vision_share": best["vision_share"],
        "importance": {"criterion": cfg.criterion, "seconds": score_s, "pairs": len(calib),
                       "steps": cfg.steps if iterative else 1},
        "dense_search_loss": dense_loss, "pruned_search_loss": final_loss,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_dir(Path(out)) as tmp:
        pruned.save_pretrained(tmp, safe_serialization=True)
        _copy_companions(model_dir, tmp)
        atomic_write_json(tmp / REPORT_FILE, report)
    return report


def vision_width_config(mcfg: dict, hidden: int, heads: int) -> dict:
    """The VLM config with its vision tower narrowed to `heads` heads and `hidden` channels."""
    return {**mcfg, "vision_config": {**(mcfg.get("vision_config") or {}), "hidden_size": hidden,
                                      "num_attention_heads": heads}}


def vision_width_plan(model, fam, scores: VlmScores, items, heads: int, batch_size: int = 4) -> tuple[list, list]:
    """(kept vision hidden channels, per vision layer kept heads) for `heads` heads per layer: each layer's heads by
    the vision head scores, heads x head_dim channels by their activation score over everything that reads the
    tower's residual stream, the projector's input included (edgekit.vision.prune.width_scores), on the images."""
    from edgekit.vision.prune import kept_channels_and_heads, width_scores
    from edgekit.vlm.data import batches

    cfg = model.config.to_dict()
    D = cfg["vision_config"]["hidden_size"]
    hd = D // cfg["vision_config"]["num_attention_heads"]
    proj = fam.projector(model)[0]

    def run():
        for b in batches(items, batch_size, 0):
            fam.image_features(model, b.pixel_values)

    channels, _ = width_scores(model, fam.vision_width_layout(cfg), D, hd, run, [(proj, proj.weight)], heads=False)
    return kept_channels_and_heads(channels, scores.vision_heads, heads, hd)


def _caption_sequences(items, fam, mcfg) -> list:
    """Equal-length caption token windows (the language model's text side) for the RMSNorm correction."""
    n_img = int((items[0].labels[0] == -100).sum())  # the image prompt, however the family wraps it
    caps = [b.input_ids[0, n_img:] for b in items]
    T = min(len(c) for c in caps)
    return [c[:T] for c in caps]


def _copy_companions(src: Path, dst: Path) -> None:
    from edgekit.prune.apply import _COMPANIONS

    import shutil

    for f in Path(src).iterdir():
        if f.is_file() and (any(f.match(p) for p in _COMPANIONS) or f.name == "preprocessor_config.json") \
                and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
