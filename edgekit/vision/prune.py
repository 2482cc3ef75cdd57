"""Widthwise pruning of an image tower (CLIP / SigLIP vision model, ViT): MLP neurons, one uniform width for every
MLP that is `intermediate_size` wide (SigLIP's pooling head included), so from_pretrained loads the result.

A neuron's importance is its mean |activation| on calibration images times the L2 norm of its column in the down
projection (what it writes into the residual stream), the activation criterion the decoder pruner uses. After the cut
each down projection is refit in closed form (least squares with a small ridge) so that the kept neurons reproduce
the dense layer's output on the calibration images, bias included.

Heads (`heads`: kept per layer) are cut together with the hidden (residual) width, since all three families derive
head_dim from hidden_size / heads: hidden becomes heads x head_dim. Each layer keeps its heads with the largest
E||W_out,h a_h||^2; the tower keeps the hidden channels with the largest E[x_c^2] * ||W[:, c]||^2 summed over
everything that reads the residual stream (the decoder activation criterion's hidden score). That cut comes first;
the MLP neurons then make up the rest of --ratio, scored and refit on the narrowed tower. cut_width and width_scores
also serve the VLM pruner's vision tower.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError

REPORT_FILE = "edgekit-vision-prune.json"
RIDGE = 1e-3  # relative to the mean diagonal of the activation Gram matrix


@dataclass(frozen=True)
class VisionPruneConfig:
    ratio: float  # fraction of the tower's parameters removed
    align: int = 8
    calibration: Path | None = None  # image+caption pairs (folder with captions.jsonl or a .jsonl); None: generated
    num_samples: int = 32
    refit: bool = True
    heads: int | None = None  # attention heads kept per layer, the hidden width with them (None: all)

    def check(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and 0 < self.ratio < 1):
            raise EdgekitError(f"pruning ratio must be between 0 and 1 (exclusive), got {self.ratio}",
                               "e.g. --ratio 0.3 removes 30% of the parameters")
        if self.align < 1:
            raise EdgekitError(f"alignment must be a positive integer, got {self.align}", "e.g. --align 8")
        if self.num_samples < 2:
            raise EdgekitError(f"--samples {self.num_samples} is too few calibration images", "pass --samples 8 or more")
        check_heads(self.heads, None, "--heads")


def check_heads(heads, have: int | None, flag: str) -> None:
    """A kept-heads count: a whole number, at least 1 and (once the model is known) at most the heads it has."""
    if heads is None:
        return
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise EdgekitError(f"{flag} {heads} must leave at least one attention head per layer",
                           f"pass {flag} N with N a whole number of heads to keep, 1 or more")
    if have is not None and heads > have:
        raise EdgekitError(f"{flag} {heads} keeps more heads than the tower's {have}",
                           f"pass {flag} between 1 and {have}")


def load_encoder(model_dir: Path):
    """(model, family, config) of an image-tower folder, refused in one line when it is not one."""
    import torch
    import transformers

    from edgekit.arch import vision_encoder_of

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EdgekitError(f"{model_dir} is not a model folder (no config.json)",
                           "pass a Hugging Face image-tower folder (config.json + safetensors)")
    cfg = json.loads((model_dir / "config.json").read_text())
    fam = vision_encoder_of(cfg)
    if not (model_dir / "preprocessor_config.json").is_file():
        raise EdgekitError(f"{model_dir} has no preprocessor_config.json (the image processor)",
                           "save the model's image processor next to it (processor.save_pretrained)")
    model = getattr(transformers, fam.model_class).from_pretrained(model_dir, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    return model, fam, cfg


def calibration_pixels(model_dir: Path, cfg: dict, path: Path | None, n: int, seed: int = 0):
    """(n, C, H, W) pixel values of the calibration images, through the model's own image processor."""
    import tempfile

    import torch
    from transformers import AutoImageProcessor

    from edgekit.vlm.data import generate_pairs, load_image, load_pairs

    proc = AutoImageProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as d:
        pairs = load_pairs(Path(path) if path else generate_pairs(Path(d), n, size=int(cfg.get("image_size", 224)),
                                                                    seed=seed))[:n]
        ims = [load_image(p.image) for p in pairs]
        return torch.as_tensor(proc(images=ims, return_tensors="np")["pixel_values"])


def kept_width(geometry_params: int, n_mlps: int, hidden: int, width: int, ratio: float, align: int,
               already: int = 0) -> int:
    """The uniform MLP width that removes at least `ratio` of the parameters (each neuron: an up row and bias, a down
    column), a multiple of `align`, counting `already` removed parameters (a head cut) towards it; refused when even
    the narrowest cannot."""
    per_neuron = n_mlps * (2 * hidden + 1)
    k = (width - math.ceil(max(ratio * geometry_params - already, 0) / per_neuron)) // align * align
    if k < align:
        most = (already + (width - align) * per_neuron) / geometry_params
        raise EdgekitError(f"cutting MLP neurons {'after the head cut' if already else 'alone'} can give at most "
                           f"{most:.0%} of this tower's parameters (widths aligned to {align}); --ratio {ratio} asks "
                           "for more", f"pass --ratio {math.floor(most * 100) / 100:.2f} or less, or a smaller --align"
                           + (", or keep fewer --heads" if already else ""))
    return k


def mlp_statistics(model, fam, pixels, batch: int = 8):
    """Per MLP: (mean |activation| per neuron, Gram matrix of the activations, cross term with the dense output)."""
    import torch

    mlps = fam.mlps(model)
    stats = [{"abs": 0.0, "gram": 0.0, "cross": 0.0, "rows": 0} for _ in mlps]

    def hook(i, down):
        def fn(mod, args, out):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            y = (out - (down.bias if down.bias is not None else 0)).reshape(-1, out.shape[-1]).double()
            s = stats[i]
            s["abs"] = s["abs"] + a.abs().sum(0)
            s["gram"] = s["gram"] + a.T @ a
            s["cross"] = s["cross"] + a.T @ y
            s["rows"] += a.shape[0]
        return fn

    handles = [down.register_forward_hook(hook(i, down)) for i, (_, down) in enumerate(mlps)]
    try:
        with torch.no_grad():
            for i in range(0, len(pixels), batch):
                fam.image_features(model, pixels[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return mlps, stats


def cut_mlps(mlps, stats, k: int, refit: bool) -> list[list[int]]:
    import torch

    kept = []
    for (up, down), s in zip(mlps, stats):
        score = (s["abs"] / max(s["rows"], 1)) * down.weight.double().norm(dim=0)
        idx = torch.sort(torch.topk(score, k).indices).values
        with torch.no_grad():
            up.weight = torch.nn.Parameter(up.weight[idx].clone())
            if up.bias is not None:
                up.bias = torch.nn.Parameter(up.bias[idx].clone())
            new_w = down.weight[:, idx].clone()
            if refit:  # least squares: the kept activations reproduce the dense layer's output
                g = s["gram"][idx][:, idx]
                g = g + RIDGE * g.diagonal().mean() * torch.eye(k, dtype=g.dtype)
                new_w = torch.linalg.solve(g, s["cross"][idx]).T.to(down.weight.dtype)
            down.weight = torch.nn.Parameter(new_w)
        up.out_features, down.in_features = k, k
        kept.append(idx.tolist())
    return kept


def _head_rows(kept, head_dim: int):
    import torch

    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])


def cut_width(sd: dict, layout, channels, heads, head_dim: int) -> None:
    """Cut state dict sd (in place) to the kept hidden channels and, per attention block of layout
    (edgekit.arch.vlm.WidthLayout), its kept heads: q/k/v rows by head, their input columns by channel; out rows by
    channel, its columns by head. Names absent from sd (an optional pooler or mask token) are skipped: loading the
    result into the narrowed config checks every shape."""
    import torch

    if len(heads) != len(layout.attention):
        raise ValueError(f"{len(heads)} kept-head lists for {len(layout.attention)} attention blocks")
    c = torch.as_tensor(channels, dtype=torch.long)

    def cut(name, dim, ix):
        if name in sd:
            sd[name] = sd[name].index_select(dim, ix)

    for n in layout.vectors:
        cut(n, -1, c)
    for p in layout.writers:
        cut(p + "weight", 0, c)
        cut(p + "bias", 0, c)
    for n in layout.readers:
        cut(n, 1, c)
    for (qkv, out), kept in zip(layout.attention, heads):
        cols = rows = _head_rows(kept, head_dim)  # out's columns; q/k/v's rows
        if len(qkv) == 1:  # a fused [q; k; v] in_proj: the same heads in each third
            third = sd[qkv[0] + "weight"].shape[0] // 3
            rows = torch.cat([cols + j * third for j in range(3)])
        for p in qkv:
            cut(p + "weight", 0, rows)
            cut(p + "weight", 1, c)
            cut(p + "bias", 0, rows)
        cut(out + "weight", 0, c)
        cut(out + "weight", 1, cols)
        cut(out + "bias", 0, c)


def width_scores(model, layout, width: int, head_dim: int, run, consumers=(), heads: bool = True):
    """(hidden-channel scores (width,), per attention block of layout head scores or None) on the forwards run()
    drives. A channel scores E[x_c^2] * ||W[:, c]||^2 summed over everything that reads the residual stream (each
    layer's q/k/v and MLP up projection, behind their norms; a pooling head; `consumers`: (module, weight) pairs after
    the tower, whose input is blocks of the hidden width) plus E[y_c^2] of each tensor run() returns (an encoder's
    output, read as it is). A head scores E||W_out,h a_h||^2 (what it adds to the residual stream)."""
    import torch

    def module(prefix):
        return model.get_submodule(prefix.removesuffix("."))

    def wsq(w):
        return w.detach().double().pow(2).sum(0)

    readers = [(module(n[:-len("weight")]), 0, wsq(model.get_parameter(n))) for n in layout.readers]
    for qkv, _ in layout.attention:
        if len(qkv) == 1:  # MultiheadAttention(query, key, value): each argument read by its third of in_proj
            m = module(qkv[0].rsplit(".", 1)[0])  # "...attention.in_proj_" -> the MultiheadAttention
            readers += [(m, j, wsq(w)) for j, w in enumerate(m.in_proj_weight.chunk(3))]
        else:
            m = [module(p) for p in qkv]
            readers.append((m[0], 0, sum(wsq(x.weight) for x in m)))
    readers += [(m, 0, wsq(w)) for m, w in consumers]
    sums, counts = [0.0] * len(readers), [0] * len(readers)
    hsq = [0.0] * len(layout.attention)
    hooks = []

    def reader_hook(i, arg):
        def f(mod, args):
            x = args[arg].detach().double()
            x = x.reshape(-1, x.shape[-1])
            sums[i] = sums[i] + x.pow(2).sum(0)
            counts[i] += x.shape[0]
        return f

    def head_hook(i, gram):
        def f(mod, args):
            a = args[0].detach().double().reshape(-1, gram.shape[0], head_dim)
            hsq[i] = hsq[i] + torch.einsum("nhd,hde,nhe->h", a, gram, a)
        return f

    def pool_hook(i, gram):  # MultiheadAttention fuses the heads: their outputs rebuilt from its weights
        def f(mod, args):
            H, D = gram.shape[0], mod.embed_dim
            w = mod.in_proj_weight.detach().double()
            b = mod.in_proj_bias.detach().double() if mod.in_proj_bias is not None else torch.zeros(3 * D).double()
            q, k, v = (torch.nn.functional.linear(x.detach().double(), w[j * D:(j + 1) * D], b[j * D:(j + 1) * D])
                       .unflatten(-1, (H, head_dim)).transpose(1, 2) for j, x in enumerate(args[:3]))
            a = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, -1) @ v  # (B, H, Tq, hd)
            a = a.transpose(1, 2).reshape(-1, H, head_dim)
            hsq[i] = hsq[i] + torch.einsum("nhd,hde,nhe->h", a, gram, a)
        return f

    outs, n_out = [0.0], [0]
    try:
        for i, (m, arg, _) in enumerate(readers):
            hooks.append(m.register_forward_pre_hook(reader_hook(i, arg)))
        if heads:
            for i, (qkv, out) in enumerate(layout.attention):
                o = module(out)
                w = o.weight.detach().double().view(o.weight.shape[0], -1, head_dim)
                gram = torch.einsum("ohd,ohe->hde", w, w)
                hooks.append(module(qkv[0].rsplit(".", 1)[0]).register_forward_pre_hook(pool_hook(i, gram))
                             if len(qkv) == 1 else o.register_forward_pre_hook(head_hook(i, gram)))
        with torch.no_grad():
            for y in run() or ():
                y = y.detach().double().reshape(-1, y.shape[-1])
                outs[0] = outs[0] + y.pow(2).sum(0)
                n_out[0] += y.shape[0]
    finally:
        for h in hooks:
            h.remove()
    score = torch.zeros(width, dtype=torch.float64)
    for (_, _, w), s, n in zip(readers, sums, counts):
        if n:
            score += (s / n * w).view(-1, width).sum(0)
    if n_out[0]:
        score += (outs[0] / n_out[0]).view(-1, width).sum(0)
    return score, ([torch.as_tensor(h, dtype=torch.float64) for h in hsq] if heads else None)


def kept_channels_and_heads(channel_scores, head_scores, heads: int, head_dim: int) -> tuple[list, list]:
    """The top heads x head_dim channels and each block's top `heads` heads, in their original order."""
    import torch

    def top(t, k):
        return sorted(torch.topk(t, k).indices.tolist()) if k < len(t) else list(range(len(t)))

    return top(channel_scores, heads * head_dim), [top(h, heads) for h in head_scores]


def cut_encoder_width(model, fam, channels, heads):
    """A new tower of `model`'s class with its hidden width cut to `channels` and each attention block to its kept
    heads (fam: the vision-encoder family), loaded strictly (every tensor of the narrowed config accounted for)."""
    from transformers.modeling_utils import no_init_weights

    cfg = model.config.to_dict()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cut_width(sd, fam.width_layout(cfg), channels, heads, cfg["hidden_size"] // cfg["num_attention_heads"])
    config = type(model.config).from_dict(fam.width_config(cfg, len(channels), len(heads[0])))
    config._attn_implementation = model.config._attn_implementation
    with no_init_weights():
        new = type(model)(config)
    new.load_state_dict(sd, strict=True)
    return new.eval()


def embedding_agreement(dense_out, pruned_out, channels=None) -> dict:
    """Cosine agreement of the pruned tower's outputs with the dense ones; an output the hidden cut narrowed is
    compared on the kept channels."""
    from edgekit.vlm.export import compare_embeddings

    def kept(d, p):
        return d[..., channels] if channels is not None and d.shape[-1] != p.shape[-1] else d

    tokens, pooled = (compare_embeddings(kept(d, p).numpy(), p.numpy()) for d, p in zip(dense_out, pruned_out))
    return {"token_mean_cosine": tokens["mean_cosine"], "pooled_mean_cosine": pooled["mean_cosine"],
            "pooled_min_cosine": pooled["min_cosine"]}


def _cut_heads(model, fam, pixels, heads: int, before: int, ratio: float, log, batch: int = 8):
    """(the tower narrowed to `heads` heads per attention block and heads x head_dim hidden channels, scored on
    pixels; the kept channels); refused when that alone removes more than `ratio` of the parameters."""
    cfg = model.config.to_dict()
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = D // H
    cut = before - fam.geometry(fam.width_config(cfg, heads * hd, heads)).params()
    if cut > ratio * before:
        raise EdgekitError(f"--heads {heads} alone removes {cut / before:.1%} of this tower's parameters, more than "
                           f"--ratio {ratio}", f"pass --ratio {math.ceil(cut / before * 100) / 100:.2f} or more, "
                           "or keep more --heads")

    def run():
        for i in range(0, len(pixels), batch):
            yield fam.image_features(model, pixels[i:i + batch])[0]  # last_hidden_state: hidden channels as they are

    layout = fam.width_layout(cfg)
    ch, hs = width_scores(model, layout, D, hd, run)
    channels, kept = kept_channels_and_heads(ch, hs, heads, hd)
    log(f"prune: {fam.name}: {len(kept)} attention blocks {H} -> {heads} heads, hidden {D} -> {len(channels)} "
        f"(head_dim stays {hd})")
    return cut_encoder_width(model, fam, channels, kept), channels


def prune_vision_encoder(model_dir: Path, out: Path, cfg: VisionPruneConfig, log=print) -> dict:
    """Cut the tower's MLPs to one uniform width and save a plain Hugging Face folder into out (atomically)."""
    import torch

    from edgekit.fsutil import atomic_dir, atomic_write_json

    cfg.check()
    model, fam, mcfg = load_encoder(model_dir)
    g = fam.geometry(mcfg)
    before = g.params()
    pixels = calibration_pixels(model_dir, mcfg, cfg.calibration, cfg.num_samples)
    held = calibration_pixels(model_dir, mcfg, None, 8, seed=777)  # held-out: never calibrated on
    with torch.no_grad():
        dense = fam.image_features(model, held)
    D, H = mcfg["hidden_size"], mcfg["num_attention_heads"]
    check_heads(cfg.heads, H, "--heads")
    already, channels = 0, None
    if cfg.heads is not None and cfg.heads < H:
        model, channels = _cut_heads(model, fam, pixels, cfg.heads, before, cfg.ratio, log)
        mcfg = model.config.to_dict()
        already = before - fam.geometry(mcfg).params()
    width = mcfg["intermediate_size"]
    mlps, stats = mlp_statistics(model, fam, pixels)
    k = kept_width(before, len(mlps), mcfg["hidden_size"], width, cfg.ratio, cfg.align, already)
    log(f"prune: {fam.name}: {len(mlps)} MLPs {width} -> {k} neurons each (activation x |down column|"
        f"{', least-squares refit of the down projections' if cfg.refit else ''})")
    cut_mlps(mlps, stats, k, cfg.refit)
    model.config.intermediate_size = k
    with torch.no_grad():
        pruned = fam.image_features(model, held)
    after = fam.geometry(model.config.to_dict()).params()
    actual = sum(p.numel() for p in model.parameters())
    if actual != after:
        raise EdgekitError(f"the pruned tower has {actual} parameters but its geometry counts {after}",
                           "report it as an edgekit bug with the model's config.json")
    report = {"arch": fam.model_type, "params_before": before, "params_after": after,
              "removed_fraction": 1 - after / before, "intermediate_size": [width, k], "mlps": len(mlps),
              "hidden_size": [D, model.config.hidden_size],
              "num_attention_heads": [H, model.config.num_attention_heads],
              "held_out": embedding_agreement(dense, pruned, channels), "config": {**asdict(cfg), "calibration":
                                                                         str(cfg.calibration or "generated")}}
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copy2(Path(model_dir) / "preprocessor_config.json", tmp / "preprocessor_config.json")
        atomic_write_json(tmp / REPORT_FILE, report)
    return report
