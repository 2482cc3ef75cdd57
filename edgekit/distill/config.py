"""Every knob of a distillation run, typed, with defaults that work for a width-pruned small LM on a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgekit.errors import EdgekitError

HIDDEN_LOSSES = ("cosine", "mse")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class LossConfig:
    """loss = kd_weight * KL(teacher || student at temperature T) * T^2 + hidden_weight * hidden + ce_weight * CE."""

    kd_weight: float = 1.0
    temperature_start: float = 1.0  # T rises (or falls) from start to end over the run
    temperature_end: float = 1.0
    temperature_schedule: str = "linear"  # linear | cosine | constant (= temperature_start throughout)
    top_k: int = 0  # > 0: KL over the teacher's top-k logits only (required with a teacher cache)
    hidden_weight: float = 0.0  # > 0: match hidden states of chosen layer pairs
    hidden_loss: str = "cosine"  # cosine | mse
    # (student_layer, teacher_layer) indices into HF hidden_states (0 = embeddings, L = last, after the final norm);
    # empty = four evenly spaced pairs ending at the last layer
    hidden_layers: tuple[tuple[int, int], ...] = ()
    ce_weight: float = 1.0  # next-token cross-entropy mixed in: beats pure KD and pure CE at CPU budgets (docs/distill.md)


@dataclass(frozen=True)
class DataConfig:
    block_size: int = 256  # tokens per packed training sequence
    heldout_fraction: float = 0.05  # of the user's blocks, when no separate held-out data is given
    max_eval_blocks: int = 64  # held-out blocks scored for perplexity (bounds eval time)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05  # of total steps, linear from 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 0  # optimizer steps; 0 = derived from `tokens`
    tokens: int = 0  # token budget (training tokens seen by the student); used when steps == 0
    batch_size: int = 8  # sequences per optimizer step, over all processes (the global batch)
    micro_batch_size: int = 4  # sequences per forward pass in one process; batch_size / (micro * world) = accumulation
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = 50  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    teacher_cache: bool = False  # cache the teacher's top-k logits on disk (needs loss.top_k > 0, hidden_weight 0)
    log_every: int = 10
    # quantization-aware training (edgekit/qat.py): a QAT-able precision name ("" = plain float distillation), the
    # backend that will lower it ("" = the first that declares it), the weight group size and the fraction of the
    # steps after which fake quantization starts (0 = the whole run is QAT) and how it starts (edgekit.qat.INITS:
    # "max" torchao's scales from max |w| at every step; "gptq" GPTQ's rounding at the switch, scales kept)
    qat: str = ""
    qat_backend: str = ""
    qat_group_size: int = 32
    qat_start: float = 0.0
    qat_init: str = "max"
    qat_equalize: float | None = None  # activation-aware scales before QAT: their exponent (None: the recipe's)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DistillConfig":
        sub = {"loss": LossConfig, "data": DataConfig, "optim": OptimConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EdgekitError(f"unknown distillation settings: {', '.join(sorted(unknown))}",
                               f"use only {', '.join(sorted(known))}")
        kw = {}
        for k, v in d.items():
            if k in sub:
                sub_known = {f.name for f in fields(sub[k])}
                bad = set(v) - sub_known
                if bad:
                    raise EdgekitError(f"unknown {k} settings: {', '.join(sorted(bad))}",
                                       f"use only {', '.join(sorted(sub_known))}")
                if k == "loss" and "hidden_layers" in v:
                    v = {**v, "hidden_layers": tuple(tuple(p) for p in v["hidden_layers"])}
                if k == "optim" and "betas" in v:
                    v = {**v, "betas": tuple(v["betas"])}
                kw[k] = sub[k](**v)
            else:
                kw[k] = v
        return cls(**kw)

    def validate(self, world_size: int = 1) -> None:
        """Refuse settings that cannot work, before any model is loaded."""
        L, D, O = self.loss, self.data, self.optim
        if self.steps < 0 or self.tokens < 0 or (self.steps == 0 and self.tokens == 0):
            raise EdgekitError("distillation needs a positive number of steps or tokens",
                               "pass --steps N or --tokens N")
        if self.micro_batch_size < 1 or self.batch_size < 1:
            raise EdgekitError("batch sizes must be positive", "e.g. --batch-size 8 --micro-batch-size 4")
        if self.batch_size % (self.micro_batch_size * world_size):
            raise EdgekitError(
                f"global batch {self.batch_size} is not a multiple of micro batch {self.micro_batch_size} x "
                f"{world_size} process(es)", "make --batch-size a multiple of --micro-batch-size times the process count")
        if self.qat and self.qat_init == "learned" and world_size > 1:  # DDP registers its parameters up front
            raise EdgekitError("--qat-init learned adds its scales as parameters mid-run, which DDP cannot take: it "
                               f"runs in one process, not {world_size}",
                               "run it with plain python (no torchrun), or use --qat-init max")
        if L.kd_weight < 0 or L.ce_weight < 0 or L.hidden_weight < 0:
            raise EdgekitError("loss weights must be >= 0", "set kd/ce/hidden weights to 0 or more")
        if L.kd_weight == 0 and L.ce_weight == 0 and L.hidden_weight == 0:
            raise EdgekitError("every loss weight is 0: nothing to train on", "set --kd-weight or --ce-weight above 0")
        if min(L.temperature_start, L.temperature_end) <= 0:
            raise EdgekitError("temperatures must be > 0", "e.g. --temperature 1 2 (rising from 1 to 2)")
        if L.temperature_schedule not in SCHEDULES:
            raise EdgekitError(f"unknown temperature schedule {L.temperature_schedule!r}",
                               f"use one of {', '.join(SCHEDULES)}")
        if L.hidden_loss not in HIDDEN_LOSSES:
            raise EdgekitError(f"unknown hidden-state loss {L.hidden_loss!r}", f"use one of {', '.join(HIDDEN_LOSSES)}")
        if L.top_k < 0:
            raise EdgekitError("top_k must be >= 0", "0 = KL over the full vocabulary")
        if self.teacher_cache and L.kd_weight > 0 and L.top_k == 0:
            raise EdgekitError("the teacher cache stores top-k logits, but top_k is 0",
                               "pass --top-k K (e.g. 64) with --teacher-cache")
        if self.teacher_cache and L.hidden_weight > 0:
            raise EdgekitError("the teacher cache holds logits only, so it cannot serve a hidden-state loss",
                               "drop --teacher-cache or set --hidden-weight 0")
        if D.block_size < 8:
            raise EdgekitError(f"block size {D.block_size} is too small", "use --block-size 64 or more")
        if not 0 <= D.heldout_fraction < 0.5:
            raise EdgekitError("heldout_fraction must be in [0, 0.5)", "e.g. 0.05")
        if self.qat:
            self.qat_plan()
        if O.lr <= 0 or not 0 <= O.warmup_fraction < 1 or not 0 <= O.min_lr_ratio <= 1:
            raise EdgekitError("invalid learning-rate schedule", "lr > 0, warmup in [0, 1), min_lr_ratio in [0, 1]")

    def qat_plan(self):
        """The QAT request resolved against the registries (one-line refusals), or None for float distillation."""
        if not self.qat:
            return None
        from edgekit.qat import resolve

        return resolve(self.qat, self.qat_backend or None, self.qat_group_size, self.qat_start, self.qat_init,
                       self.qat_equalize)

    def total_steps(self) -> int:
        if self.steps:
            return self.steps
        return max(1, -(-self.tokens // (self.batch_size * self.data.block_size)))
