"""The distillation loop: student = the pruned model, teacher = the original; checkpointed, exactly resumable, and
data-parallel under torchrun (gloo on CPU, NCCL on GPU) with the same result as one process at the same global batch.

Determinism: the data of optimizer step s follows from (s, seed) alone (data.batch_indices); the loss of a
micro-batch is its token mean divided by the number of micro-batches per process, and DDP averages over processes,
so every layout of the same global batch computes the same global token mean. A checkpoint holds weights (with the
projections), optimizer, scheduler, step and RNG states; a run killed at any point restarts from the last one and
replays the steps after it bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgekit.distill.config import DistillConfig
from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_dir, atomic_write_json, sha256_json, sha256_tree

CKPT_PREFIX = "step-"
REPORT = "distill.json"
# Test hook: SIGKILL this process right after the optimizer update of this step (before its checkpoint), to prove
# that a run killed mid-way resumes exactly.
_KILL_ENV = "EDGEKIT_FAULT_KILL_AT_STEP"


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owned: bool = False  # this call created the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist() -> Dist:
    """One process, or one rank of a torchrun job (WORLD_SIZE/RANK/LOCAL_RANK set by torchrun)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", f"cuda:{local}"
        torch.cuda.set_device(local)
    else:
        backend, device = "gloo", "cpu"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend=backend)
    return Dist(world=world, rank=rank, device=device, backend=backend, owned=owned)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


@dataclass
class RunPaths:
    out: Path
    checkpoints: Path
    teacher_cache: Path | None = None


def default_paths(out: Path, checkpoint_dir: Path | None = None, cache_dir: Path | None = None) -> RunPaths:
    out = Path(out)
    ck = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".ckpt")
    return RunPaths(out=out, checkpoints=ck, teacher_cache=Path(cache_dir) if cache_dir else ck / "teacher-cache")


@dataclass
class _State:
    step: int = 0
    history: list = field(default_factory=list)  # [step, loss, kd, hidden, ce, lr, T] every log_every steps
    ppl_before: float | None = None
    teacher_ppl: float | None = None
    train_seconds: float = 0.0


def _lr_lambda(total: int, cfg):
    import math

    warm = int(round(total * cfg.warmup_fraction))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))

    return f


def _rng_state() -> dict:
    import numpy as np
    import torch

    npst = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [npst[0], torch.from_numpy(npst[1].copy()), *npst[2:]]}


def _set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))


def latest_checkpoint(ckdir: Path) -> Path | None:
    if not ckdir.is_dir():
        return None
    done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                  and (p / "state.json").is_file())
    return done[-1] if done else None


def perplexity(model, blocks, micro: int, d: Dist) -> float:
    """exp(mean next-token cross-entropy) over `blocks`, split over processes and summed exactly."""
    import math

    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    mine = blocks[d.rank::d.world]
    with torch.no_grad():
        for i in range(0, len(mine), micro):
            ids = mine[i:i + micro].to(d.device)
            logits = model(input_ids=ids, use_cache=False).logits
            V = logits.shape[-1]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1), reduction="sum")
            tot += torch.tensor([nll.item(), ids[:, 1:].numel()], dtype=torch.float64)
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tot)
    model.train(was_training)
    return math.exp(tot[0].item() / tot[1].item())


def distill(teacher: Path, student: Path, out: Path, cfg: DistillConfig, data: Path | None = None,
            heldout: Path | None = None, checkpoint_dir: Path | None = None, cache_dir: Path | None = None,
            fresh: bool = False, keep_checkpoints: bool = False, log: Callable[[str], None] | None = None,
            progress: bool | None = None) -> dict:
    """Train `student` to match `teacher`; write the student (a standard HF folder) to `out`; return the report."""
    import torch

    from edgekit.distill.cache import TopkCache
    from edgekit.distill.data import batch_indices, load_blocks
    from edgekit.distill.guard import check_same_vocab, check_trainable
    from edgekit.distill.losses import (Projections, default_pairs, hidden_loss, kd_full, kd_topk, next_token_ce,
                                        teacher_topk, temperature)
    from edgekit.models import load_torch_model

    d = init_dist()
    log = log or (lambda m: print(m, file=sys.stderr))
    say = (lambda m: log(m)) if d.main else (lambda m: None)
    cfg.validate(d.world)
    qat_plan = cfg.qat_plan()
    teacher, student = Path(teacher), Path(student)
    check_trainable(student, qat=qat_plan is not None)
    check_same_vocab(teacher, student)
    paths = default_paths(out, checkpoint_dir, cache_dir)
    L = cfg.loss
    total = cfg.total_steps()
    accum = cfg.batch_size // (cfg.micro_batch_size * d.world)

    t_model, tok = load_torch_model(teacher)
    s_model, s_tok = load_torch_model(student)
    tok = s_tok or tok
    if tok is None:
        raise EdgekitError(f"neither {teacher} nor {student} has a tokenizer", "pass models saved with tokenizer.json")
    blocks = load_blocks(tok, cfg.data.block_size, data, heldout, cfg.data.heldout_fraction)
    if int(blocks.train.max()) >= s_model.config.vocab_size:
        raise EdgekitError("the data tokenizes to ids beyond the student's vocabulary",
                           "use the student's own tokenizer.json")
    eval_blocks = blocks.heldout[: cfg.data.max_eval_blocks]
    qat_step = total
    if qat_plan is not None:
        from edgekit import qat

        qat.check_widths(s_model, qat_plan)  # a group that does not divide a width: refused before any training
        qat_step = min(total - 1, int(round(qat_plan.start_fraction * total)))
        say(f"distill: QAT {qat_plan.scheme} ({qat.recipe(qat_plan).description}, group {qat_plan.group_size}) "
            f"from step {qat_step}")
    fake_quantized = 0
    qat_scales = None  # the fixed scales of a GPTQ start: computed at the switch, or read back from a checkpoint
    learned = qat_plan is not None and qat_plan.init == "learned"  # scales trained with the weights (LSQ)
    gptq_seconds = 0.0
    say(f"distill: {len(blocks.train)} train blocks x {cfg.data.block_size} tokens from {blocks.source}, "
        f"{len(eval_blocks)} held-out; {total} steps of {cfg.batch_size} sequences "
        f"({total * cfg.batch_size * cfg.data.block_size:,} tokens), {d.world} process(es), accumulation {accum}")

    t_model.to(d.device).eval().requires_grad_(False)
    s_model.to(d.device).train()
    s_model.config.use_cache = False
    use_hidden = L.hidden_weight > 0
    use_teacher = L.kd_weight > 0 or use_hidden
    pairs = L.hidden_layers or default_pairs(s_model.config.num_hidden_layers, t_model.config.num_hidden_layers)
    for sp, tp in pairs if use_hidden else ():
        if not (0 <= sp <= s_model.config.num_hidden_layers and 0 <= tp <= t_model.config.num_hidden_layers):
            raise EdgekitError(f"hidden-state pair {sp}:{tp} is out of range (student has "
                               f"{s_model.config.num_hidden_layers} layers, teacher {t_model.config.num_hidden_layers})",
                               "pick indices between 0 (embeddings) and the layer count (last layer)")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    proj = Projections(pairs if use_hidden else (), s_model.config.hidden_size, t_model.config.hidden_size).to(d.device)
    wrapper = _Trainee(s_model, proj, pairs if use_hidden else ())
    decay = [p for n, p in wrapper.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in wrapper.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=cfg.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.optim))

    teacher_sha, data_sha = sha256_tree(teacher), blocks.fingerprint()
    fp = sha256_json({"config": {k: v for k, v in cfg.to_dict().items() if k not in ("checkpoint_every", "log_every",
                                                                                      "keep_checkpoints")},
                      "teacher": teacher_sha, "student": sha256_tree(student), "data": data_sha})
    st = _State()
    ck = None if fresh else latest_checkpoint(paths.checkpoints)
    if fresh and d.main and paths.checkpoints.exists():
        for p in paths.checkpoints.glob(CKPT_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)
    _barrier(d)
    if ck is not None:
        meta = json.loads((ck / "state.json").read_text())
        if meta.get("fingerprint") != fp:
            raise EdgekitError(f"the checkpoints in {paths.checkpoints} belong to another run (different models, data "
                               "or settings)", "pass --fresh to start over, or another --checkpoint-dir")
        from safetensors.torch import load_model

        if learned and meta["step"] > qat_step:
            # its checkpoint and optimizer hold the scale Parameters: put them back before loading either
            fake_quantized = qat.prepare(s_model, qat_plan, qat.load_scales(ck, qat_plan))
            _add_scale_groups(opt, sched, qat.learned_scales(s_model))
        load_model(wrapper, str(ck / "model.safetensors"), device=d.device)
        opt.load_state_dict(torch.load(ck / "optim.pt", weights_only=True, map_location=d.device))
        sched.load_state_dict(torch.load(ck / "sched.pt", weights_only=True))
        _set_rng_state(torch.load(ck / "rng.pt", weights_only=True))
        st = _State(step=meta["step"], history=meta["history"], ppl_before=meta["ppl_before"],
                    teacher_ppl=meta["teacher_ppl"], train_seconds=meta["train_seconds"])
        if qat_plan is not None and qat_plan.init == "gptq":
            qat_scales = qat.load_scales(ck)
            gptq_seconds = meta.get("qat_gptq_seconds", 0.0)
        say(f"distill: resumed from {ck} (step {st.step}/{total})")

    if st.ppl_before is None:
        st.teacher_ppl = perplexity(t_model, eval_blocks, cfg.micro_batch_size, d)
        st.ppl_before = perplexity(s_model, eval_blocks, cfg.micro_batch_size, d)
        say(f"distill: held-out perplexity: teacher {st.teacher_ppl:.3f}, student before {st.ppl_before:.3f}")
    if qat_plan is not None and qat_plan.equalize and st.step == 0:  # a resumed run's weights hold it already
        from edgekit.exporters.executorch import calibration_batches

        n = qat.equalize(s_model, qat_plan, calibration_batches(tok))
        say(f"distill: QAT equalization: activation-aware scales (alpha {qat_plan.equalize}) folded into gate/up "
            f"and o of {n} layers (the same function, a finer grid where activations are large)")

    model = wrapper
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(wrapper, device_ids=[int(d.device.split(":")[1])] if d.device.startswith("cuda") else None)

    cache = None
    if cfg.teacher_cache and use_teacher:
        cache = TopkCache(paths.teacher_cache, sha256_json({"teacher": teacher_sha, "data": data_sha}), L.top_k,
                          cfg.data.block_size)

    def teacher_out(idx: list[int], ids):
        """(full logits or None, top-k values/indices or None, hidden states or None) for these blocks."""
        if cache is not None:
            got = cache.get(idx)
            if got is not None:
                return None, (got[0].to(d.device), got[1].to(d.device)), None
        with torch.no_grad():
            o = t_model(input_ids=ids, use_cache=False, output_hidden_states=use_hidden)
        top = teacher_topk(o.logits, L.top_k) if L.top_k else None
        if cache is not None:
            cache.put(idx, *top)
        return o.logits, top, o.hidden_states

    kill_at = int(os.environ.get(_KILL_ENV, "0") or 0)
    tokens_per_step = cfg.batch_size * cfg.data.block_size
    bar = _Bar(total, st.step, enabled=d.main and (sys.stderr.isatty() if progress is None else progress))
    steps_here = 0
    try:
        for step in range(st.step, total):
            t0 = time.perf_counter()
            if step >= qat_step and not fake_quantized:  # the same Parameters: optimizer state carries over
                if qat_plan.init == "gptq" and qat_scales is None:
                    qat_scales, gptq_seconds = _gptq_start(s_model, tok, qat_plan, say)
                fake_quantized = qat.prepare(s_model, qat_plan, qat_scales)
                if learned:
                    _add_scale_groups(opt, sched, qat.learned_scales(s_model))
            T = temperature(step, total, L)
            g = batch_indices(step, cfg.batch_size, len(blocks.train), cfg.seed)
            per_rank = cfg.batch_size // d.world
            mine = g[d.rank * per_rank:(d.rank + 1) * per_rank]
            parts = {"kd": 0.0, "hidden": 0.0, "ce": 0.0, "loss": 0.0}
            for m in range(accum):
                idx = mine[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]
                ids = blocks.train[idx].to(d.device)
                # DDP all-reduces on the last micro-batch only; earlier ones just accumulate locally
                ctx = model.no_sync() if d.world > 1 and m < accum - 1 else contextlib.nullcontext()
                with ctx:
                    logits, s_hidden = model(ids, use_hidden)
                    loss = logits.new_zeros(())
                    if use_teacher:
                        t_logits, t_top, t_hidden = teacher_out(idx, ids)
                    if L.kd_weight > 0:
                        kd = kd_topk(logits, *t_top, T) if L.top_k else kd_full(logits, t_logits, T)
                        loss = loss + L.kd_weight * kd
                        parts["kd"] += kd.item() / accum
                    if use_hidden:
                        hl = sum(hidden_loss(h, t_hidden[tp], L.hidden_loss)
                                 for h, (_, tp) in zip(s_hidden, pairs)) / len(pairs)
                        loss = loss + L.hidden_weight * hl
                        parts["hidden"] += hl.item() / accum
                    if L.ce_weight > 0:
                        ce = next_token_ce(logits, ids)
                        loss = loss + L.ce_weight * ce
                        parts["ce"] += ce.item() / accum
                    parts["loss"] += loss.item() / accum
                    (loss / accum).backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(wrapper.parameters(), cfg.optim.grad_clip)
            opt.step()
            if learned:  # a scale is a divisor: keep it positive
                qat.clamp_learned_scales(s_model)
            sched.step()
            opt.zero_grad(set_to_none=True)
            if d.world > 1:  # report the global mean loss, not rank 0's share
                import torch.distributed as dist

                vec = torch.tensor([parts[k] for k in ("loss", "kd", "hidden", "ce")], dtype=torch.float64)
                dist.all_reduce(vec)
                parts = dict(zip(("loss", "kd", "hidden", "ce"), (vec / d.world).tolist()))
            st.step = step + 1
            steps_here += 1
            dt = time.perf_counter() - t0
            st.train_seconds += dt
            if step % cfg.log_every == 0 or st.step == total:
                st.history.append([st.step, round(parts["loss"], 6), round(parts["kd"], 6), round(parts["hidden"], 6),
                                   round(parts["ce"], 6), sched.get_last_lr()[0], round(T, 4)])
                if not bar.enabled:
                    say(f"distill: step {st.step}/{total} loss {parts['loss']:.4f} (kd {parts['kd']:.4f}) "
                        f"T {T:.2f} lr {sched.get_last_lr()[0]:.2e} {tokens_per_step / dt:,.0f} tok/s")
            bar.update(st.step, parts["loss"], tokens_per_step / dt)
            if kill_at and st.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0) and st.step < total:
                _save_checkpoint(paths.checkpoints, wrapper, opt, sched, st, fp, cfg.keep_checkpoints, d,
                                 qat.fixed_scales(s_model) if learned else qat_scales, gptq_seconds)
    finally:
        bar.close()
    student_model = s_model
    if qat_plan is not None and not fake_quantized:  # resumed after the last step: evaluate what QAT trained for
        fake_quantized = qat.prepare(s_model, qat_plan, qat_scales)
    if learned:  # the scales as the runtime stores them, for the evaluation below and the export
        qat.round_learned_scales(s_model, qat_plan)
        qat_scales = qat.fixed_scales(s_model)
    ppl_after = perplexity(student_model, eval_blocks, cfg.micro_batch_size, d)  # with QAT: fake-quantized
    qat_record = None
    if qat_plan is not None:
        from importlib.metadata import version

        qat.convert(s_model)  # plain linears holding the trained float weights; the exporter quantizes them
        qat_record = {"fake_quantized_linears": fake_quantized, "start_step": qat_step, "steps": total - qat_step,
                      "heldout_perplexity_fake_quant": round(ppl_after, 4), "torchao": version("torchao"),
                      **({"gptq_seconds": round(gptq_seconds, 1)} if qat_scales is not None else {})}
    tokens = total * tokens_per_step
    report = {
        "teacher": str(teacher), "student": str(student), "data": blocks.source,
        "train_blocks": len(blocks.train), "heldout_blocks": len(eval_blocks), "block_size": cfg.data.block_size,
        "steps": total, "tokens": tokens, "processes": d.world, "backend": d.backend,
        "heldout_perplexity": {"teacher": round(st.teacher_ppl, 4), "before": round(st.ppl_before, 4),
                               "after": round(ppl_after, 4),
                               "after_over_teacher": round(ppl_after / st.teacher_ppl, 4)},
        "train_seconds": round(st.train_seconds, 2),
        "tokens_per_s": round(tokens / st.train_seconds, 1) if st.train_seconds else None,
        "resumed_from_step": total - steps_here if steps_here < total else 0,
        "projection": {"used": proj.active, "pairs": [list(p) for p in pairs] if use_hidden else [],
                       "student_width": s_model.config.hidden_size, "teacher_width": t_model.config.hidden_size},
        "teacher_cache": cache.stats() if cache else None,
        "qat": {**qat_plan.to_dict(), **qat_record} if qat_plan is not None else None,
        "config": cfg.to_dict(),
        "history_columns": ["step", "loss", "kd", "hidden", "ce", "lr", "T"],
        "history": st.history,
    }
    say(f"distill: held-out perplexity {st.ppl_before:.3f} -> {ppl_after:.3f} (teacher {st.teacher_ppl:.3f}); "
        f"{report['tokens_per_s']} tok/s")
    if d.main:
        with atomic_dir(paths.out) as tmp:
            student_model.config.use_cache = True
            student_model.save_pretrained(tmp, safe_serialization=True)  # the student alone: projections dropped
            tok.save_pretrained(tmp)
            if qat_plan is not None:
                qat.write(tmp, qat_plan, qat_record)  # export lowers this scheme on this grid
                if qat_scales is not None:
                    qat.save_scales(tmp, qat_scales)  # ... with the scales it trained on
            atomic_write_json(tmp / REPORT, report)
        if not keep_checkpoints:
            for p in paths.checkpoints.glob(CKPT_PREFIX + "*"):
                shutil.rmtree(p, ignore_errors=True)
    _barrier(d)
    if d.owned:
        import torch.distributed as dist

        dist.destroy_process_group()
    return report


def _trainee_class():
    from torch import nn

    class Trainee(nn.Module):
        """Student + projections as one module, so DDP (which hooks only its module's forward) syncs both."""

        def __init__(self, student, proj, pairs):
            super().__init__()
            self.student, self.proj, self.pairs = student, proj, tuple(pairs)

        def forward(self, ids, hidden: bool):
            o = self.student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            hs = [self.proj(i, o.hidden_states[sp]) for i, (sp, _) in enumerate(self.pairs)] if hidden else None
            return o.logits, hs

    return Trainee


def _Trainee(student, proj, pairs):
    return _trainee_class()(student, proj, pairs)


def _gptq_start(model, tok, plan, say) -> tuple[dict, float]:
    """QAT's GPTQ start: the student rounded onto the grid on edgekit's calibration text (as the exporter would
    quantize it without QAT); returns the scales that stay fixed for the rest of training, and the seconds."""
    from edgekit import qat
    from edgekit.exporters.executorch import calibration_batches

    t0 = time.perf_counter()
    scales = qat.calibrate(model, plan, calibration_batches(tok))
    dt = time.perf_counter() - t0
    say(f"distill: QAT starts from GPTQ on the calibration text ({len(scales)} linears, {dt:.0f} s)")
    return scales, dt


def _add_scale_groups(opt, sched, params: list) -> None:
    """Learned QAT scales join the optimizer at the switch, on the weights' schedule without weight decay, one group
    per tensor: Adam moves a parameter by about its learning rate per step whatever its size, and 8-bit scales are
    ~10x smaller than 4-bit ones, so each tensor's rate is LEARNED_LR x its median scale x the weights' peak-relative
    schedule (a shared rate drove the smallest scales negative)."""
    from edgekit.qat import LEARNED_LR

    for p in params:
        base = LEARNED_LR * float(p.detach().abs().median())
        opt.add_param_group({"params": [p], "weight_decay": 0.0, "initial_lr": base,
                             "lr": base * sched.lr_lambdas[0](sched.last_epoch)})
        sched.base_lrs.append(base)
        sched.lr_lambdas.append(sched.lr_lambdas[0])


def _save_checkpoint(ckdir: Path, wrapper, opt, sched, st: _State, fp: str, keep: int, d: Dist,
                     qat_scales: dict | None = None, gptq_seconds: float = 0.0) -> None:
    import torch
    from safetensors.torch import save_model

    if d.main:
        with atomic_dir(ckdir / f"{CKPT_PREFIX}{st.step:07d}") as tmp:
            save_model(wrapper, str(tmp / "model.safetensors"))
            if qat_scales is not None:  # a resume past the switch trains on these, not on a second GPTQ
                from edgekit.qat import save_scales

                save_scales(tmp, qat_scales)
            torch.save(opt.state_dict(), tmp / "optim.pt")
            torch.save(sched.state_dict(), tmp / "sched.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            atomic_write_json(tmp / "state.json", {"fingerprint": fp, "step": st.step, "history": st.history,
                                                   "ppl_before": st.ppl_before, "teacher_ppl": st.teacher_ppl,
                                                   "train_seconds": st.train_seconds,
                                                   "qat_gptq_seconds": gptq_seconds})
        old = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
        for p in old[:-max(1, keep)]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier(d)


class _Bar:
    """A rich progress bar with loss and tokens/s on a terminal; nothing otherwise (log lines instead)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.p = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        except ModuleNotFoundError:
            self.enabled = False
            return
        self.p = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                          TimeRemainingColumn(), console=Console(stderr=True))
        self.p.start()
        self.task = self.p.add_task("distill", total=total, completed=done, loss=float("nan"), tps=0.0)

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.p:
            self.p.update(self.task, completed=step, loss=loss, tps=tps)

    def close(self) -> None:
        if self.p:
            self.p.stop()
