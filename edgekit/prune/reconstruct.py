"""One-shot weight reconstruction after a structured cut: closed form, no training.

Removing MLP neurons or query heads removes their share of what each layer writes into the residual stream; the kept
units can make up much of it. Each layer's output projections (o_proj, then down_proj) are refitted by least squares
so that, on calibration text, the pruned layer writes what the dense layer would have written, given the inputs the
pruned model actually sees. Layers are refitted in order, so each also absorbs the drift of the layers before it.

The target is the dense layer run on the pruned model's own stream when the hidden width is kept (the fit then only
has to replace the removed units), or the dense model's stream restricted to the kept channels when hidden channels
were cut too (the dense layer cannot read a narrower stream). The ridge term pulls towards the weights the cut left,
not towards zero: with a few thousand calibration tokens a plain fit overfits (measured in bench/ and docs/pruning.md).

Cost: about three forward passes over the calibration tokens (run layer by layer on cached hidden states) plus one
solve per projection, of its input width squared.
"""

from __future__ import annotations


class _Stop(Exception):
    pass


def _layer_inputs(model, ad, batches) -> list:
    """Per batch: (hidden states entering layer 0, per layer the keyword arguments the model passes it). Layers may
    get different masks and rotary tables (Gemma 3's sliding and global layers), so each layer keeps its own."""
    caught = []
    layers = ad.layers(model)

    def grab(i):
        def f(mod, args, kwargs):
            kw = dict(kwargs)
            x = args[0] if args else kw.pop("hidden_states")
            kw.pop("hidden_states", None)
            if i == 0:
                caught.append([x.detach(), []])
            caught[-1][1].append(kw)
            if i == len(layers) - 1:
                raise _Stop  # the rest of the model is not needed
            return None
        return f

    hooks = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return [(x, kw) for x, kw in caught]


def _run(layer, xs: list, *taps, index: int = 0) -> tuple:
    """Run decoder layer `index` over cached inputs. Each tap is (module, "in" | "out"); returns the layer outputs
    and, per tap, what that module saw (its input or output, flattened to 2-D) batch by batch."""
    seen = [[] for _ in taps]
    hooks = []
    for (mod, what), store in zip(taps, seen):
        def keep(t, s=store):
            s.append(t.reshape(-1, t.shape[-1]))
        if what == "in":
            hooks.append(mod.register_forward_pre_hook(lambda m, a, k=keep: k(a[0])))
        else:
            hooks.append(mod.register_forward_hook(lambda m, a, o, k=keep: k(o)))
    outs = []
    try:
        for x, kws in xs:
            out = layer(x, **kws[index])
            outs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for h in hooks:
            h.remove()
    return (outs, *seen)


def ridge_solve(A, B, W_now, damp: float):
    """argmin_W ||X W^T - Y||^2 + damp * mean(diag X^T X) * ||W - W_now||^2, given A = X^T X and B = X^T Y (float64);
    the ridge pulls towards the weights the cut left (see the module doc). Returns W (out x in)."""
    import torch

    lam = damp * A.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), B + lam * W_now.T).T


def _refit(linear, inputs: list, targets: list, damp: float) -> None:
    """linear.weight := ridge_solve on the inputs and targets (its bias is kept)."""
    import torch

    n = inputs[0].shape[1]
    A = torch.zeros(n, n, dtype=torch.float64)
    B = torch.zeros(n, targets[0].shape[1], dtype=torch.float64)
    bias = linear.bias.detach().double() if linear.bias is not None else 0.0
    for x, y in zip(inputs, targets):
        x = x.double()
        A += x.T @ x
        B += x.T @ (y.double() - bias)
    W = ridge_solve(A, B, linear.weight.detach().double(), damp)
    linear.weight.data.copy_(W.to(linear.weight.dtype))


def reconstruct(dense, pruned, ad, hidden: list, batches, damp: float = 0.1) -> dict:
    """Refit every o_proj and down_proj of `pruned` (a cut of `dense` that keeps hidden channels `hidden`), in place,
    on the calibration batches. Returns what it did."""
    import torch

    hid = torch.tensor(hidden, dtype=torch.long)
    local = len(hidden) == dense.config.hidden_size
    batches = list(batches)
    with torch.no_grad():
        xs_p = _layer_inputs(pruned, ad, batches)
        xs_d = None if local else _layer_inputs(dense, ad, batches)
        for i, (ld, lp) in enumerate(zip(ad.layers(dense), ad.layers(pruned))):
            src = xs_p if local else xs_d
            nxt_d, o_out, d_out = _run(ld, src, (ad.o(ld), "out"), (ad.down(ld), "out"), index=i)
            _, o_in = _run(lp, xs_p, (ad.o(lp), "in"), index=i)
            _refit(ad.o(lp), o_in, [y[:, hid] for y in o_out], damp)
            del o_in, o_out
            outs, d_in = _run(lp, xs_p, (ad.down(lp), "in"), index=i)
            old = ad.down(lp).weight.detach().clone()
            _refit(ad.down(lp), d_in, [y[:, hid] for y in d_out], damp)
            delta = ad.down(lp).weight.detach() - old
            # the layer's new output differs from the one just computed only through the down_proj change
            xs_p = [(o + (a @ delta.T).reshape(o.shape), kw) for o, a, (_, kw) in zip(outs, d_in, xs_p)]
            if not local:
                xs_d = [(y, kw) for y, (_, kw) in zip(nxt_d, xs_d)]
    return {"target": "dense layer on the pruned stream" if local else "dense stream, kept channels",
            "layers": len(ad.layers(pruned)), "tokens": sum(int(b.numel()) for b in batches), "damp": damp}
