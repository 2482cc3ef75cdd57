"""Cut a model to a Plan, rebuild it as a standard Hugging Face model, save it, and load non-uniform folders back.

Query heads are kept with their whole head_dim (RoPE pairs stay intact); a KV group leaves with all its query heads;
hidden channels are cut in the embeddings, every norm, every projection and the LM head (tied or not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgekit.arch import WIDTHS_KEY, get_family


def _head_rows(heads, hd):
    import torch

    return torch.tensor([h * hd + i for h in heads for i in range(hd)], dtype=torch.long)


def pruned_state(model, ad, plan) -> dict:
    """The pruned tensors under their standard HF names (tied LM head omitted, as save_pretrained does)."""
    import torch

    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hid = torch.tensor(plan.hidden, dtype=torch.long)
    c = ad.embed_fixup(cfg.hidden_size, len(plan.hidden))
    sd = {}

    def put(name, t):
        sd[name] = t.detach().contiguous().clone()

    emb = model.get_input_embeddings().weight
    put("model.embed_tokens.weight", emb[:, hid] * c)
    head = model.get_output_embeddings().weight
    if not cfg.tie_word_embeddings:
        put("lm_head.weight", head[:, hid])
    norms = ad.norms(model)
    scales = plan.norm_scales or [1.0] * len(norms)
    per_layer = len(ad.norm_names)
    for i, (layer, lp) in enumerate(zip(ad.layers(model), plan.layers)):
        qr, kvr = _head_rows(lp.heads, hd), _head_rows(lp.kv, hd)
        mlp = torch.tensor(lp.mlp, dtype=torch.long)
        (q, k, v), (g, u) = ad.qkv(layer), ad.gate_up(layer)
        o, d = ad.o(layer), ad.down(layer)
        t = {}
        for name, proj, rows in (("q", q, qr), ("k", k, kvr), ("v", v, kvr), ("gate", g, mlp), ("up", u, mlp)):
            t[f"{name}.weight"] = proj.weight[rows][:, hid]
            if proj.bias is not None:
                t[f"{name}.bias"] = proj.bias[rows]
        t["o.weight"], t["down.weight"] = o.weight[hid][:, qr], d.weight[hid][:, mlp]
        for name, mod in (("o", o), ("down", d)):
            if mod.bias is not None:
                t[f"{name}.bias"] = mod.bias[hid]
        for j, (name, norm) in enumerate(zip(ad.norm_names, ad.layer_norms(layer))):
            t[f"{name}.weight"] = ad.scale_norm(norm.weight[hid], scales[i * per_layer + j])
        for name, norm in zip(("q_norm", "k_norm"), ad.qk_norms(layer)):
            t[f"{name}.weight"] = norm.weight  # head_dim wide: heads are kept whole
        for name, tensor in ad.layer_state(i, t).items():
            put(name, tensor)
    # a tied head reads the (rescaled) embedding: the final norm divides the rescale out again
    final = ad.scale_norm(ad.final_norm(model).weight[hid], scales[-1] / (c if cfg.tie_word_embeddings else 1.0))
    put("model.norm.weight", final)
    return sd


def pruned_config(model, plan) -> dict:
    cfg = model.config.to_dict()
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    widths = [lp.widths() for lp in plan.layers]
    cfg.update(hidden_size=len(plan.hidden), head_dim=hd,
               intermediate_size=max(w.intermediate_size for w in widths),
               num_attention_heads=max(w.num_attention_heads for w in widths),
               num_key_value_heads=max(w.num_key_value_heads for w in widths))
    cfg.pop(WIDTHS_KEY, None)
    if not plan.uniform:
        cfg[WIDTHS_KEY] = [w.to_dict() for w in widths]
    cfg.pop("_name_or_path", None)
    return cfg


def build_model(cfg: dict, state: dict):
    """A runnable fp32 model from a (possibly non-uniform) pruned config and its tensors."""
    import torch
    import transformers
    from transformers.modeling_utils import no_init_weights

    ad = get_family(cfg["model_type"])
    config = getattr(transformers, ad.config_class).from_dict(dict(cfg))
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    widths = cfg.get(WIDTHS_KEY)
    if widths:
        _reshape_layers(model, ad, cfg, widths)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"pruned checkpoint does not match its config: missing {sorted(set(missing) - allowed)}, "
                         f"unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _reshape_layers(model, ad, cfg, widths) -> None:
    """Give each decoder layer its own widths (projections sized per layer; GQA group size per layer)."""
    from edgekit.arch import LayerWidths

    for layer, w in zip(ad.layers(model), widths):
        ad.reshape_layer(layer, LayerWidths(**w), cfg["hidden_size"], cfg["head_dim"])


def load_pruned(path: Path):
    """(model, tokenizer) of a non-uniform pruned folder (edgekit_layer_widths in config.json)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    model = build_model(cfg, state)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
    return model, tok


# What a model folder needs besides its config and weights; anything else in the source (old weight indexes,
# backups, notes) is not copied, so the pruned folder never points at shards it does not have.
_COMPANIONS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
               "chat_template.*", "generation_config.json", "README.md", "LICENSE*", "NOTICE*")


def save_pruned(model, out: Path, src: Path) -> None:
    """save_pretrained (standard names and layout) plus the source's tokenizer, generation and licence files."""
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(src).iterdir():
        if f.is_file() and any(f.match(p) for p in _COMPANIONS) and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)


def norm_scales(model, ad, seqs, hidden_sets: dict) -> dict:
    """For each candidate kept-hidden set: per RMSNorm, the mean over tokens of rms(x_kept) / rms(x).

    RMSNorm divides by the RMS over the channels it sees; after cutting channels that RMS changes, so the kept
    weights are multiplied by this ratio to give the kept channels the scale they had in the dense model.

    The candidate sets are normally nested (each is the top-d channels by one score), so with the channels in that
    ranking every set is a prefix and one cumulative sum of x^2 gives all widths at once; sets that are not nested
    are computed one by one."""
    import torch

    norms = ad.norms(model)
    keys = list(hidden_sets)
    sets = [list(hidden_sets[k]) for k in keys]
    if not keys:
        return {}
    order = None
    if all(s and len(set(s)) == len(s) for s in sets):
        seen = {}
        for s in sets:
            for c in s:
                seen[c] = seen.get(c, 0) + 1
        # channels in more sets rank higher; nested sets are then exactly the prefixes of this order
        order = sorted(max(sets, key=len), key=lambda c: -seen[c])
        if any(set(order[:len(s)]) != set(s) for s in sets):
            order = None
    sums = [None] * len(norms)  # per norm: float64 tensor of per-key sums over tokens
    count = [0]
    on = {}  # index tensors per device

    def index(device):
        if device not in on:
            if order is not None:
                on[device] = (torch.tensor(order, dtype=torch.long, device=device),
                              torch.tensor([len(s) - 1 for s in sets], dtype=torch.long, device=device),
                              torch.tensor([len(s) for s in sets], dtype=torch.float64, device=device))
            else:
                on[device] = [torch.tensor(s, dtype=torch.long, device=device) for s in sets]
        return on[device]

    def hook(j):
        def f(mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sq = x.pow(2)
            full = sq.mean(1).sqrt().clamp_min(1e-12)
            if order is not None:
                ix, ends, widths = index(x.device)
                kept = sq.index_select(1, ix).cumsum(1).index_select(1, ends) / widths
            else:
                kept = torch.stack([sq.index_select(1, ix).mean(1) for ix in index(x.device)], 1)
            part = (kept.sqrt() / full[:, None]).sum(0)
            sums[j] = part if sums[j] is None else sums[j] + part
            if j == 0:
                count[0] += x.shape[0]
        return f

    hooks = [nm.register_forward_pre_hook(hook(j)) for j, nm in enumerate(norms)]
    try:
        from edgekit.prune.calib import batches

        with torch.inference_mode():
            for ids in batches(seqs, 4):
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    per_norm = [[0.0] * len(keys) if t is None else t.tolist() for t in sums]
    return {k: [v[i] / max(count[0], 1) for v in per_norm] for i, k in enumerate(keys)}
