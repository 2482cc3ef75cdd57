"""Widthwise pruning of an image tower (CLIP / SigLIP vision model, ViT): MLP neurons, one uniform width for every
MLP that is `intermediate_size` wide (SigLIP's pooling head included), so from_pretrained loads the result.

A neuron's importance is its mean |activation| on calibration images times the L2 norm of its column in the down
projection (what it writes into the residual stream), the activation criterion the decoder pruner uses. After the cut
each down projection is refit in closed form (least squares with a small ridge) so that the kept neurons reproduce
the dense layer's output on the calibration images, bias included. Heads are not cut: all three families derive
head_dim from hidden_size / heads (edgekit/arch/vision.py).
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

    def check(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and 0 < self.ratio < 1):
            raise EdgekitError(f"pruning ratio must be between 0 and 1 (exclusive), got {self.ratio}",
                               "e.g. --ratio 0.3 removes 30% of the parameters")
        if self.align < 1:
            raise EdgekitError(f"alignment must be a positive integer, got {self.align}", "e.g. --align 8")
        if self.num_samples < 2:
            raise EdgekitError(f"--samples {self.num_samples} is too few calibration images", "pass --samples 8 or more")


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


def kept_width(geometry_params: int, n_mlps: int, hidden: int, width: int, ratio: float, align: int) -> int:
    """The uniform MLP width that removes at least `ratio` of the parameters (each neuron: an up row and bias, a down
    column), a multiple of `align`; refused when even the narrowest cannot."""
    per_neuron = n_mlps * (2 * hidden + 1)
    k = (width - math.ceil(ratio * geometry_params / per_neuron)) // align * align
    if k < align:
        most = (width - align) * per_neuron / geometry_params
        raise EdgekitError(f"cutting MLP neurons alone can give at most {most:.0%} of this tower's parameters "
                           f"(widths aligned to {align}); --ratio {ratio} asks for more",
                           f"pass --ratio {math.floor(most * 100) / 100:.2f} or less, or a smaller --align")
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


def embedding_agreement(dense_out, pruned_out) -> dict:
    from edgekit.vlm.export import compare_embeddings

    tokens, pooled = (compare_embeddings(d.numpy(), p.numpy()) for d, p in zip(dense_out, pruned_out))
    return {"token_mean_cosine": tokens["mean_cosine"], "pooled_mean_cosine": pooled["mean_cosine"],
            "pooled_min_cosine": pooled["min_cosine"]}


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
    width = mcfg["intermediate_size"]
    mlps, stats = mlp_statistics(model, fam, pixels)
    k = kept_width(before, len(mlps), mcfg["hidden_size"], width, cfg.ratio, cfg.align)
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
              "held_out": embedding_agreement(dense, pruned), "config": {**asdict(cfg), "calibration":
                                                                         str(cfg.calibration or "generated")}}
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copy2(Path(model_dir) / "preprocessor_config.json", tmp / "preprocessor_config.json")
        atomic_write_json(tmp / REPORT_FILE, report)
    return report
