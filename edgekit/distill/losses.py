"""Distillation losses. All return a mean over predicted tokens, so micro-batches of equal size average exactly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.distill.config import LossConfig


def temperature(step: int, total: int, cfg: LossConfig) -> float:
    """T at optimizer step `step` of `total`: moves from temperature_start to temperature_end."""
    a, b = cfg.temperature_start, cfg.temperature_end
    if cfg.temperature_schedule == "constant" or total <= 1:
        return a
    f = min(max(step / (total - 1), 0.0), 1.0)
    if cfg.temperature_schedule == "cosine":
        f = 0.5 * (1 - math.cos(math.pi * f))
    return a + (b - a) * f


def kd_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Forward KL(teacher || student) over the whole vocabulary at temperature T, scaled by T^2 (so gradient
    magnitudes stay comparable as T changes)."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, V).float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, V).float() / T, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (T * T)


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = teacher_logits.float().topk(k, dim=-1)
    return vals, idx.to(torch.int32)


def kd_topk(student_logits: torch.Tensor, top_vals: torch.Tensor, top_idx: torch.Tensor, T: float) -> torch.Tensor:
    """KL from the teacher's distribution restricted (and renormalized) to its top-k tokens to the student's full
    distribution on those tokens; the student keeps its full softmax, so mass it puts elsewhere is still penalized."""
    V = student_logits.shape[-1]
    k = top_vals.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, V).float() / T, dim=-1)
    s_k = s.gather(-1, top_idx.reshape(-1, k).long())
    t_k = F.log_softmax(top_vals.reshape(-1, k).float() / T, dim=-1)
    return (t_k.exp() * (t_k - s_k)).sum(-1).mean() * (T * T)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))


def hidden_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        return (1 - F.cosine_similarity(student_h.float(), teacher_h.float(), dim=-1)).mean()
    # MSE relative to the teacher's mean square, so layers of different scale weigh alike
    return F.mse_loss(student_h.float(), teacher_h.float()) / teacher_h.float().pow(2).mean().clamp_min(1e-8)


class Projections(nn.Module):
    """One learned linear map student width -> teacher width per hidden-state pair, only when the widths differ.
    It trains with the student and is dropped afterwards: the saved model is the student alone."""

    def __init__(self, pairs: tuple[tuple[int, int], ...], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = tuple(pairs)
        self.maps = nn.ModuleList()
        if student_width != teacher_width:
            for _ in self.pairs:
                lin = nn.Linear(student_width, teacher_width, bias=False)
                with torch.no_grad():  # start as "kept channels map to themselves", which pruning roughly preserves
                    lin.weight.copy_(torch.eye(teacher_width, student_width))
                self.maps.append(lin)

    @property
    def active(self) -> bool:
        return len(self.maps) > 0

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.maps[i](h) if self.active else h


def default_pairs(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """Four evenly spaced (student, teacher) hidden-state indices, ending at the last (normed) state."""
    out = []
    for q in (0.25, 0.5, 0.75, 1.0):
        p = (max(1, round(student_layers * q)), max(1, round(teacher_layers * q)))
        if p not in out:
            out.append(p)
    return tuple(out)
