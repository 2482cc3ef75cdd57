"""GPTQ for symmetric group-wise integer weights, backend-neutral (the backend packs what it returns).

GPTQ (Frantar et al. 2022) rounds a linear's input columns one at a time and spreads each column's rounding error
over the columns not yet rounded, weighted by the inverse Hessian H = E[x x^T] of the layer's inputs on calibration
text, so the layer's *outputs* move least. Here with the two refinements that matter most at 4 bits on small models
(measured on SmolLM2-135M, docs/executorch.md): columns in decreasing order of H's diagonal ("act order") with the
group scales fixed beforehand ("static groups", so act order keeps one scale per contiguous group, as the runtime
kernels need), and each group's scale chosen by a clipping search that minimises its squared rounding error.

Torch is imported at the top: only exporters import this module, and only when they quantize.
"""

from __future__ import annotations

import torch

CLIP_RATIOS = torch.linspace(1.0, 0.75, 11)  # scale = ratio * absmax / (qmax + 0.5): 1.0 is torchao's own choice


def _hessian_hooks(named: dict, sums: dict, counts: dict) -> list:
    def hook(name):
        def f(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    return [m.register_forward_hook(hook(n)) for n, m in named.items()]


def quantize_sequentially(model, layers: list, batches: list, quantize) -> None:
    """GPTQ layer by layer: each decoder layer's input Hessians come from the outputs of the layers before it,
    already quantized, so a layer corrects what its predecessors' rounding did. `quantize(name, linear, hessian)`
    replaces one linear's weight with its rounded values. Only one layer's Hessians are held at a time (a 0.5B
    model's would take gigabytes all at once). Linears outside the layers (the LM head) are calibrated on the
    unquantized model's inputs."""
    names = {id(m): n for n, m in model.named_modules()}
    inside = {id(m) for layer in layers for m in layer.modules()}
    outside = {names[id(m)]: m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in inside}
    calls: list[list] = [[] for _ in layers]  # per layer, per batch: the (args, kwargs) the model called it with

    def capture(i):
        def f(mod, args, kwargs):
            calls[i].append((args, kwargs))
        return f

    sums: dict = {}
    counts: dict = {}
    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks += _hessian_hooks(outside, sums, counts)
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for n, m in outside.items():
        quantize(n, m, (sums.pop(n) / counts[n]).float())
    xs = [args[0] for args, _ in calls[0]]
    for i, layer in enumerate(layers):
        linears = {names[id(m)]: m for m in layer.modules() if isinstance(m, torch.nn.Linear)}
        sums, counts = {}, {}
        hooks = _hessian_hooks(linears, sums, counts)
        with torch.no_grad():
            try:
                for x, (args, kwargs) in zip(xs, calls[i]):
                    layer(x, *args[1:], **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            for n, m in linears.items():
                quantize(n, m, (sums.pop(n) / counts[n]).float())
            outs = [layer(x, *args[1:], **kwargs) for x, (args, kwargs) in zip(xs, calls[i])]
        xs = [o[0] if isinstance(o, tuple) else o for o in outs]
        calls[i] = []


def group_scales(w: torch.Tensor, group: int, qmax: int, round_scale=lambda s: s) -> torch.Tensor:
    """One symmetric scale per `group` input columns (out, in/group), the clipping ratio with the least squared
    error per group; `round_scale` applies the runtime's scale format (e.g. bf16) before the choice."""
    wg = w.reshape(w.shape[0], -1, group)
    base = wg.abs().amax(-1).clamp_min(1e-8) / (qmax + 0.5)
    best, err = base, torch.full_like(base, float("inf"))
    for r in CLIP_RATIOS:
        s = round_scale(base * r)
        e = ((torch.clamp(torch.round(wg / s[..., None]), -qmax - 1, qmax) * s[..., None] - wg) ** 2).sum(-1)
        better = e < err
        best, err = torch.where(better, s, best), torch.where(better, e, err)
    return best


def gptq(w: torch.Tensor, hessian: torch.Tensor, group: int, bits: int = 4, round_scale=lambda s: s,
         damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer weights int8 (out, in), scales (out, in/group)) with w ~= q * scale per group."""
    qmax = 2 ** (bits - 1) - 1
    scales = group_scales(w.detach().float(), group, qmax, round_scale)
    q = gptq_on_grid(w, hessian, scales, torch.zeros_like(scales), -qmax - 1, qmax, damp, block)
    return q.to(torch.int8), scales


def gptq_on_grid(w: torch.Tensor, hessian: torch.Tensor, a: torch.Tensor, b: torch.Tensor, qmin: int, qmax: int,
                 damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ's integer codes (out, in) on a fixed affine grid: value = a * q + b, q in [qmin, qmax], with one (a, b)
    per row and group of in/a.shape[1] contiguous input columns (a runtime's block scales and minimums, chosen
    beforehand). A zero scale (an all-zero block) rounds to q = 0."""
    w = w.detach().clone().float()
    h = hessian.clone().float()
    ncol = w.shape[1]
    group = ncol // a.shape[1]
    col_a, col_b = a.float().repeat_interleave(group, dim=1), b.float().repeat_interleave(group, dim=1)
    safe_a = torch.where(col_a == 0, torch.ones_like(col_a), col_a)
    dead = torch.diag(h) == 0  # inputs that are always zero: any value is exact
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h, col_a, col_b, safe_a = w[:, perm], h[perm][:, perm], col_a[:, perm], col_b[:, perm], safe_a[:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(ncol)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, ncol, block):
        i2 = min(i1 + block, ncol)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col, s, o = w1[:, i], col_a[:, i1 + i], col_b[:, i1 + i]
            qi = torch.clamp(torch.round((col - o) / safe_a[:, i1 + i]), qmin, qmax)
            q[:, i1 + i] = torch.where(s == 0, torch.zeros_like(qi), qi)
            err = (col - (q[:, i1 + i] * s + o)) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int16)
