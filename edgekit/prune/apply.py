"""Cut a model to a Plan, rebuild it as a standard Hugging Face model, save it, and load non-uniform folders back.

Query heads are kept with their whole head_dim (RoPE pairs stay intact); a KV group leaves with all its query heads;
hidden channels are cut in the embeddings, every norm, every projection and the LM head (tied or not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgekit.prune.arch import WIDTHS_KEY, get_adapter


def _head_rows(heads, hd):
    import torch

    return torch.tensor([h * hd + i for h in heads for i in range(hd)], dtype=torch.long)


def pruned_state(model, ad, plan) -> dict:
    """The pruned tensors under their standard HF names (tied LM head omitted, as save_pretrained does)."""
    import torch

    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hid = torch.tensor(plan.hidden, dtype=torch.long)
    sd = {}

    def put(name, t):
        sd[name] = t.detach().contiguous().clone()

    emb = model.get_input_embeddings().weight
    put("model.embed_tokens.weight", emb[:, hid])
    head = model.get_output_embeddings().weight
    if not cfg.tie_word_embeddings:
        put("lm_head.weight", head[:, hid])
    scales = plan.norm_scales or [1.0] * len(ad.norms(model))
    for i, (layer, lp) in enumerate(zip(ad.layers(model), plan.layers)):
        p = f"model.layers.{i}."
        a, m = layer.self_attn, layer.mlp
        qr, kvr = _head_rows(lp.heads, hd), _head_rows(lp.kv, hd)
        mlp = torch.tensor(lp.mlp, dtype=torch.long)
        for name, mod, rows in (("q_proj", a.q_proj, qr), ("k_proj", a.k_proj, kvr), ("v_proj", a.v_proj, kvr)):
            put(f"{p}self_attn.{name}.weight", mod.weight[rows][:, hid])
            if mod.bias is not None:
                put(f"{p}self_attn.{name}.bias", mod.bias[rows])
        put(f"{p}self_attn.o_proj.weight", a.o_proj.weight[hid][:, qr])
        for name, mod in (("gate_proj", m.gate_proj), ("up_proj", m.up_proj)):
            put(f"{p}mlp.{name}.weight", mod.weight[mlp][:, hid])
            if mod.bias is not None:
                put(f"{p}mlp.{name}.bias", mod.bias[mlp])
        put(f"{p}mlp.down_proj.weight", m.down_proj.weight[hid][:, mlp])
        for name, mod in (("self_attn.o_proj", a.o_proj), ("mlp.down_proj", m.down_proj)):
            if mod.bias is not None:
                put(f"{p}{name}.bias", mod.bias[hid])
        put(f"{p}input_layernorm.weight", layer.input_layernorm.weight[hid] * scales[2 * i])
        put(f"{p}post_attention_layernorm.weight", layer.post_attention_layernorm.weight[hid] * scales[2 * i + 1])
    put("model.norm.weight", model.model.norm.weight[hid] * scales[-1])
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

    ad = get_adapter(cfg["model_type"])
    config = getattr(transformers, ad.config_class).from_dict(dict(cfg))
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    widths = cfg.get(WIDTHS_KEY)
    if widths:
        _reshape_layers(model, ad, cfg, widths)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.get("tie_word_embeddings") else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"pruned checkpoint does not match its config: missing {sorted(set(missing) - allowed)}, "
                         f"unexpected {sorted(unexpected)}")
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    return model.eval()


def _reshape_layers(model, ad, cfg, widths) -> None:
    """Give each decoder layer its own widths (projections sized per layer; GQA group size per layer)."""
    from torch import nn

    D, hd = cfg["hidden_size"], cfg["head_dim"]
    for layer, w in zip(ad.layers(model), widths):
        a, m = layer.self_attn, layer.mlp
        H, K, I = w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]

        def lin(i, o, old):
            return nn.Linear(i, o, bias=old.bias is not None)

        a.q_proj, a.k_proj = lin(D, H * hd, a.q_proj), lin(D, K * hd, a.k_proj)
        a.v_proj, a.o_proj = lin(D, K * hd, a.v_proj), lin(H * hd, D, a.o_proj)
        a.num_key_value_groups = H // K
        m.gate_proj, m.up_proj, m.down_proj = lin(D, I, m.gate_proj), lin(D, I, m.up_proj), lin(I, D, m.down_proj)
        for n in ("num_heads", "num_attention_heads"):  # not read by current transformers; kept truthful anyway
            if hasattr(a, n):
                setattr(a, n, H)


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
    weights are multiplied by this ratio to give the kept channels the scale they had in the dense model."""
    import torch

    norms = ad.norms(model)
    idx = {k: torch.tensor(v, dtype=torch.long) for k, v in hidden_sets.items()}
    sums = {k: [0.0] * len(norms) for k in idx}
    count = [0]

    def hook(j):
        def f(mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            full = x.pow(2).mean(1).sqrt()
            for k, ix in idx.items():
                sums[k][j] += (x[:, ix].pow(2).mean(1).sqrt() / full.clamp_min(1e-12)).sum().item()
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
    return {k: [s / max(count[0], 1) for s in v] for k, v in sums.items()}
