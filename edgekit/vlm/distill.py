"""Recovery of a pruned VLM by distillation from the dense one, in three phases (projector first, as UKMP
recommends: the vision-language interface is what structural pruning breaks first):

1. projector only: the student's projector learns to map its (pruned) vision features to what its (pruned)
   language model reads, on the teacher's caption logits (KL) + the caption (CE); both towers frozen;
2. vision tower + projector: on the teacher's vision hidden states at the feature layer (relative MSE; the vision
   hidden width is not pruned, so they compare channel for channel) + the logits KL;
3. the whole model: logits KL (temperature T, T^2-scaled) + CE.

Each phase reports its own loss on held-out pairs before and after, so "the loss falls in each phase" is measured,
not assumed. The student is written as a plain Hugging Face folder (from_pretrained loads it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError

REPORT_FILE = "edgekit-vlm-distill.json"
PHASES = ("projector", "vision+projector", "whole")


@dataclass(frozen=True)
class VlmDistillConfig:
    steps: tuple[int, int, int] = (30, 30, 30)  # optimizer steps per phase (0 skips a phase)
    lr: tuple[float, float, float] = (3e-3, 1e-3, 5e-4)
    batch_size: int = 4
    temperature: float = 2.0
    ce_weight: float = 0.5
    calibration: Path | None = None  # image+caption pairs; None: generated
    num_samples: int = 32
    held_out: int = 8
    seed: int = 0

    def check(self) -> None:
        if len(self.steps) != 3 or any(s < 0 for s in self.steps) or not any(self.steps):
            raise EdgekitError(f"--steps needs three non-negative step counts, one per phase, got {self.steps}",
                               "e.g. --steps 30,30,30 (projector, vision+projector, whole model)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise EdgekitError(f"temperature must be positive, got {self.temperature}", "e.g. --temperature 2")
        if len(self.lr) != 3 or any(not (math.isfinite(x) and x > 0) for x in self.lr):
            raise EdgekitError(f"learning rates must be positive, got {self.lr}", "use the default rates")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["calibration"] = str(self.calibration) if self.calibration else None
        return d


def _kl_ce(s_logits, t_logits, labels, T: float, ce_weight: float):
    import torch.nn.functional as F

    tgt = labels[:, 1:]
    keep = tgt != -100
    s, t = s_logits[:, :-1][keep].float(), t_logits[:, :-1][keep].float()
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
    ce = F.cross_entropy(s, tgt[keep])
    return (1 - ce_weight) * kl + ce_weight * ce


def _vision_feats(model, fam, pixel_values):
    return fam.vision_features(model, pixel_values)


def _set_trainable(student, fam, phase: str) -> list:
    for p in student.parameters():
        p.requires_grad_(phase == "whole")
    if phase != "whole":
        mods = list(fam.projector(student)) + ([fam.vision_tower(student)] if phase == "vision+projector" else [])
        for m in mods:
            for p in m.parameters():
                p.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]


def phase_loss(student, teacher, fam, b, phase: str, cfg: VlmDistillConfig, t_cache=None):
    import torch

    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values, use_cache=False)
    with torch.no_grad():
        t_logits = teacher(**kw).logits
        t_feats = _vision_feats(teacher, fam, b.pixel_values) if phase == "vision+projector" else None
    loss = _kl_ce(student(**kw).logits, t_logits, b.labels, cfg.temperature, cfg.ce_weight)
    if t_feats is not None:
        s_feats = _vision_feats(student, fam, b.pixel_values)
        loss = loss + ((s_feats - t_feats) ** 2).mean() / (t_feats.var() + 1e-8)
    return loss


def _eval(student, teacher, fam, items, phase, cfg, pad) -> float:
    import torch

    from edgekit.vlm.data import batches

    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches(items, cfg.batch_size, pad):
            total += float(phase_loss(student, teacher, fam, b, phase, cfg)) * b.input_ids.shape[0]
            n += b.input_ids.shape[0]
    return total / max(n, 1)


def distill_vlm(teacher_dir: Path, student_dir: Path, out: Path, cfg: VlmDistillConfig = VlmDistillConfig(),
                log=print) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.arch import vlm_family_of
    from edgekit.fsutil import atomic_dir, atomic_write_json
    from edgekit.vlm.data import batches, encode, generate_pairs, load_pairs
    from edgekit.vlm.prune import _copy_companions, caption_loss

    cfg.check()
    t0 = time.perf_counter()
    cfgs = {}
    for role, d in (("teacher", teacher_dir), ("student", student_dir)):
        if not (Path(d) / "config.json").is_file():
            raise EdgekitError(f"the {role} {d} is not a model folder (no config.json)",
                               f"pass a Hugging Face VLM folder as the {role}")
        cfgs[role] = json.loads((Path(d) / "config.json").read_text())
    fam = vlm_family_of(cfgs["student"])
    if vlm_family_of(cfgs["teacher"]) is not fam or cfgs["teacher"]["text_config"].get("vocab_size") != \
            cfgs["student"]["text_config"].get("vocab_size"):
        raise EdgekitError("teacher and student are not the same VLM family with the same vocabulary",
                           "distill a pruned model from the model it was pruned from")
    torch.manual_seed(cfg.seed)
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForImageTextToText.from_pretrained(student_dir, dtype=torch.float32)
    if cfg.calibration is None:
        import tempfile

        pairs = load_pairs(generate_pairs(Path(tempfile.mkdtemp(prefix="edgekit-vlm-pairs-")),
                                          cfg.num_samples + cfg.held_out, seed=cfg.seed + 1))
    else:
        pairs = load_pairs(cfg.calibration)
    tok, _, items = encode(student_dir, pairs[:cfg.num_samples + cfg.held_out], fam, cfgs["student"])
    if len(items) < 2:
        raise EdgekitError("distillation needs at least 2 image+caption pairs", "pass more pairs")
    held = items[-cfg.held_out:] if len(items) > cfg.held_out else items[-1:]
    train = items[:-len(held)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    report = {"teacher": str(teacher_dir), "student": str(student_dir), "config": cfg.to_dict(), "phases": [],
              "caption_loss": {"teacher": caption_loss(teacher, held, pad), "before": caption_loss(student, held, pad)}}
    for phase, steps, lr in zip(PHASES, cfg.steps, cfg.lr):
        if not steps:
            continue
        params = _set_trainable(student, fam, phase)
        before = _eval(student.eval(), teacher, fam, held, phase, cfg, pad)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        student.train()
        done, curve = 0, []
        while done < steps:
            for b in batches(train, cfg.batch_size, pad):
                loss = phase_loss(student, teacher, fam, b, phase, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                curve.append(round(float(loss.detach()), 5))
                done += 1
                if done == steps:
                    break
        after = _eval(student.eval(), teacher, fam, held, phase, cfg, pad)
        n_train = sum(p.numel() for p in params)
        report["phases"].append({"phase": phase, "steps": steps, "trainable_params": n_train,
                                 "held_out_loss_before": before, "held_out_loss_after": after,
                                 "train_loss_first": curve[0], "train_loss_last": curve[-1]})
        log(f"distill: phase {phase} ({n_train:,} trainable, {steps} steps): held-out loss {before:.4f} -> "
            f"{after:.4f}")
    for p in student.parameters():
        p.requires_grad_(True)
    report["caption_loss"]["after"] = caption_loss(student.eval(), held, pad)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    with atomic_dir(Path(out)) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        _copy_companions(student_dir, tmp)
        atomic_write_json(tmp / REPORT_FILE, report)
    return report
