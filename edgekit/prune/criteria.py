"""Importance criteria: one registry, each entry scores every prunable structure of a model.

A criterion returns Scores: per layer one value per MLP neuron, per query head and per KV group (the part of a KV
group's cost not already in its query heads), and one value per hidden channel. Higher means keep.

- activation (default): Minitron-style, from calibration activations, but measured where a unit acts: the mean
  squared size of what it adds to the residual stream (an MLP neuron: E[h_j^2] * ||W_down[:, j]||^2; a head:
  E||W_o,h a_h||^2) and, for a hidden channel, E[y_c^2] after every RMSNorm times the squared weight of its column
  in the projections that read it.
- taylor: first-order Taylor |dL/dW * W| summed over each structure's weights (gradients of the calibration loss).
- magnitude: squared L2 norm of each structure's weights (no data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass
class Scores:
    mlp: list  # [layer] -> tensor (intermediate_size,)
    heads: list  # [layer] -> tensor (num_attention_heads,)
    kv: list  # [layer] -> tensor (num_key_value_heads,)
    hidden: object  # tensor (hidden_size,)


def _geom(model):
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return hd


def weight_saliency(model, ad, sal: Callable) -> Scores:
    """Sum sal(param) (an elementwise tensor) over the weights of each structure."""
    import torch

    hd = _geom(model)
    D = model.config.hidden_size
    hidden = torch.zeros(D, dtype=torch.float64)
    mlp, heads, kv = [], [], []

    def s(p):
        return sal(p).double()

    def rows(proj, kind="weight"):  # saliency of a logical projection: the rows of its (maybe fused) parameter
        p = getattr(proj.module, kind)
        return None if p is None else s(p)[proj.rows]

    for layer in ad.layers(model):
        (q, k, v), (g, u) = ad.qkv(layer), ad.gate_up(layer)
        o, d = ad.o(layer), ad.down(layer)
        H, K = q.out_features // hd, k.out_features // hd
        sq, sk, sv, so = rows(q), rows(k), rows(v), s(o.weight)
        sg, su, sd = rows(g), rows(u), s(d.weight)
        n = sg.sum(1) + su.sum(1) + sd.sum(0)
        if g.bias is not None:
            n += rows(g, "bias") + rows(u, "bias")
        mlp.append(n)
        h = sq.sum(1).view(H, hd).sum(1) + so.sum(0).view(H, hd).sum(1)
        if q.bias is not None:
            h += rows(q, "bias").view(H, hd).sum(1)
        heads.append(h)
        g_kv = (sk.sum(1) + sv.sum(1)).view(K, hd).sum(1)
        if k.bias is not None:
            g_kv += (rows(k, "bias") + rows(v, "bias")).view(K, hd).sum(1)
        kv.append(g_kv)
        hidden += sq.sum(0) + sk.sum(0) + sv.sum(0) + sg.sum(0) + su.sum(0) + so.sum(1) + sd.sum(1)
        for b in (o.bias, d.bias):
            if b is not None:
                hidden += s(b)
    for norm in ad.norms(model):
        hidden += s(norm.weight)
    emb = model.get_input_embeddings().weight
    hidden += s(emb).sum(0)
    head = model.get_output_embeddings().weight
    if head is not emb:
        hidden += s(head).sum(0)
    return Scores(mlp, heads, kv, hidden)


def magnitude(model, ad, batches: Iterable) -> Scores:
    import torch

    with torch.no_grad():
        return weight_saliency(model, ad, lambda p: p.detach() ** 2)


def taylor(model, ad, batches: Iterable) -> Scores:
    import torch

    model.zero_grad(set_to_none=True)
    n = 0
    for ids in batches:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        (out.loss * ids.shape[0]).backward()  # gradients accumulate over batches: the gradient of the total loss
        n += ids.shape[0]
    with torch.no_grad():
        res = weight_saliency(model, ad, lambda p: (p.grad * p.detach()).abs() / max(n, 1) if p.grad is not None
                              else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return res


def activation(model, ad, batches: Iterable) -> Scores:
    import torch

    hd = _geom(model)
    layers = list(ad.layers(model))
    L, D = len(layers), model.config.hidden_size
    mlp_sq = [None] * L
    head_sq = [None] * L
    norms = ad.norms(model)
    norm_sq = [torch.zeros(D, dtype=torch.float64) for _ in norms]
    tokens = [0]
    hooks = []

    def mlp_hook(i):
        def f(mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            v = x.pow(2).sum(0)
            mlp_sq[i] = v if mlp_sq[i] is None else mlp_sq[i] + v
        return f

    def head_hook(i, gram):
        def f(mod, inputs):
            a = inputs[0].detach().reshape(-1, gram.shape[0], hd).double()
            v = torch.einsum("nhd,hde,nhe->h", a, gram, a)  # ||W_o,h a_h||^2 summed over tokens
            head_sq[i] = v if head_sq[i] is None else head_sq[i] + v
        return f

    def norm_hook(j):
        def f(mod, inputs, output):
            y = output.detach().reshape(-1, D).double()
            norm_sq[j] += y.pow(2).sum(0)
            if j == 0:
                tokens[0] += y.shape[0]
        return f

    with torch.no_grad():
        for i, layer in enumerate(layers):
            o = ad.o(layer)
            H = o.in_features // hd
            w = o.weight.detach().double().view(D, H, hd)
            gram = torch.einsum("ohd,ohe->hde", w, w)
            hooks.append(ad.down(layer).register_forward_pre_hook(mlp_hook(i)))
            hooks.append(o.register_forward_pre_hook(head_hook(i, gram)))
        for j, nm in enumerate(norms):
            hooks.append(nm.register_forward_hook(norm_hook(j)))
        try:
            for ids in batches:
                model(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        n = max(tokens[0], 1)
        mlp, heads, kv = [], [], []
        hidden = torch.zeros(D, dtype=torch.float64)
        roles = ad.norm_role_list(L)
        per_layer = len(roles) // L if L else 0
        for i, layer in enumerate(layers):
            (q, k, v), (g, u) = ad.qkv(layer), ad.gate_up(layer)
            mlp.append(mlp_sq[i] / n * ad.down(layer).weight.detach().double().pow(2).sum(0))
            heads.append(head_sq[i] / n)
            kv.append(torch.zeros(k.out_features // hd, dtype=torch.float64))
            # a channel's weight in what reads each norm's output: q/k/v or gate/up columns; a post norm's output
            # joins the residual stream as it is
            readers = {"attn_in": sum(m.weight.detach().double().pow(2).sum(0) for m in (q, k, v)),
                       "mlp_in": sum(m.weight.detach().double().pow(2).sum(0) for m in (g, u))}
            for j in range(per_layer):
                idx = i * per_layer + j
                hidden += norm_sq[idx] / n * readers.get(roles[idx], 1.0)
        hidden += norm_sq[-1] / n * model.get_output_embeddings().weight.detach().double().pow(2).sum(0)
    return Scores(mlp, heads, kv, hidden)


# name -> (function(model, adapter, batches) -> Scores, needs calibration data)
CRITERIA: dict[str, tuple[Callable, bool]] = {
    "activation": (activation, True),
    "taylor": (taylor, True),
    "magnitude": (magnitude, False),
}
