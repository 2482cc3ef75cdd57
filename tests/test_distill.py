"""Distillation on tiny models: the loss falls, resume is exact, torchrun matches one process, the projection is
used when hidden channels were pruned, the order P -> KD -> Q is enforced, bad inputs give clear errors."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env

PY = sys.executable
TORCHRUN = Path(PY).with_name("torchrun")
TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and students "pruned" from it: narrower MLP, and narrower hidden size (same vocabulary)."""
    from edgekit.testing import make_tiny_model

    root = tmp_path_factory.mktemp("distill")
    teacher = make_tiny_model("llama", root / "teacher", seed=0)
    out = {"teacher": teacher}
    for name, kw in {"ffn": dict(intermediate_size=96), "hidden": dict(hidden_size=48, intermediate_size=96)}.items():
        s = make_tiny_model("llama", root / name, seed=1, tokenizer=False, **kw)
        for f in TOK_FILES:
            shutil.copy(teacher / f, s / f)
        out[name] = s
    return out


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _max_diff(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _small(**kw):
    from edgekit.distill import DataConfig, DistillConfig, OptimConfig

    base = dict(steps=12, batch_size=8, micro_batch_size=4, checkpoint_every=0,
                data=DataConfig(block_size=64, max_eval_blocks=16), optim=OptimConfig(lr=3e-3))
    return DistillConfig(**{**base, **kw})


def test_kd_loss_falls_and_output_is_a_plain_student(models, tmp_path):
    from edgekit.distill import distill
    from edgekit.models import load_torch_model

    cfg_path = models["ffn"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    student = tmp_path / "student"
    shutil.copytree(models["ffn"], student)
    cfg["edgekit_layer_widths"] = None  # a pruned model's extra config key must survive training
    (student / "config.json").write_text(json.dumps(cfg))
    from edgekit.distill import LossConfig

    # pure KD (ce_weight 0): the teacher here is a random model, so the default CE term would pull the other way
    rep = distill(models["teacher"], student, tmp_path / "out", _small(loss=LossConfig(ce_weight=0.0)),
                  progress=False)
    kd = [h[2] for h in rep["history"]]
    assert kd[-1] < 0.75 * kd[0], kd
    ppl = rep["heldout_perplexity"]
    assert ppl["after"] < ppl["before"]  # the random student moves toward the teacher on held-out text
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "edgekit_layer_widths" in out_cfg and out_cfg["intermediate_size"] == 96
    model, tok = load_torch_model(tmp_path / "out")
    assert tok is not None and model.config.intermediate_size == 96
    saved = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert saved["heldout_perplexity"] == ppl and saved["steps"] == 12
    assert not (tmp_path / "out.ckpt").exists() or not list((tmp_path / "out.ckpt").glob("step-*"))


def test_projection_used_when_hidden_channels_were_pruned(models, tmp_path):
    from edgekit.distill import LossConfig, distill

    rep = distill(models["teacher"], models["hidden"], tmp_path / "out",
                  _small(steps=10, loss=LossConfig(hidden_weight=1.0, hidden_layers=((1, 1), (2, 2)))),
                  progress=False)
    pj = rep["projection"]
    assert pj["used"] and (pj["student_width"], pj["teacher_width"]) == (48, 64) and pj["pairs"] == [[1, 1], [2, 2]]
    hid = [h[3] for h in rep["history"]]
    assert hid[0] > 0 and hid[-1] < hid[0], hid
    w = _weights(tmp_path / "out")
    assert not any(k.startswith("proj") for k in w), "the projection must be dropped after training"
    assert w["model.embed_tokens.weight"].shape[1] == 48
    # same widths: no projection
    rep = distill(models["teacher"], models["ffn"], tmp_path / "out2",
                  _small(steps=2, loss=LossConfig(hidden_weight=1.0)), progress=False)
    assert not rep["projection"]["used"]


def _run(args, env=None, check=0):
    p = subprocess.run([PY, "-m", "edgekit", "distill", *map(str, args)], capture_output=True, text=True,
                       timeout=600, env=cli_env(**(env or {})))
    if check is not None:
        assert p.returncode == check, p.stderr[-3000:]
    return p


def test_killed_run_resumes_exactly_and_teacher_cache_skips_teacher(models, tmp_path):
    """Uninterrupted top-k KD (live teacher) vs a run with the teacher cache SIGKILLed after step 5 (checkpoint at
    4) and rerun: the same final weights within 1e-6, and the resumed run read teacher logits from the cache."""
    data = tmp_path / "small.txt"  # ~20 blocks of 64 tokens: 8 steps x 8 sequences = several epochs
    from edgekit.data import calibration_text

    data.write_text(calibration_text()[:6000])
    common = ["--teacher", models["teacher"], "--student", models["ffn"], "--data", data, "--steps", 8,
              "--block-size", 64, "--batch-size", 8, "--micro-batch-size", 2, "--lr", 3e-3, "--top-k", 16,
              "--checkpoint-every", 2, "--temperature", 1, 2]
    _run([*common, "-o", tmp_path / "a"])
    p = _run([*common, "--teacher-cache", "-o", tmp_path / "b"], env={"EDGEKIT_FAULT_KILL_AT_STEP": "5"},
             check=None)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (tmp_path / "b").exists()
    assert sorted(x.name for x in (tmp_path / "b.ckpt").glob("step-*")) == ["step-0000002", "step-0000004"]
    p = _run([*common, "--teacher-cache", "-o", tmp_path / "b"])
    assert "resumed from" in p.stderr and "step 4/8" in p.stderr
    assert _max_diff(tmp_path / "a", tmp_path / "b") <= 1e-6
    rep = json.loads((tmp_path / "b" / "distill.json").read_text())
    assert rep["resumed_from_step"] == 4 and rep["teacher_cache"]["hits"] > 0
    a = json.loads((tmp_path / "a" / "distill.json").read_text())
    assert a["history"][-1][6] == 2.0  # the temperature schedule reached its end value


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_torchrun_two_processes_match_one_process(models, tmp_path):
    """2 ranks x 4 sequences (gloo) vs 1 process x 8 sequences (2 micro-batches of 4): same global batch of 8.
    Only float summation order differs; after 4 AdamW steps weights agree within 1e-4 (seen: ~1e-5)."""
    common = ["--teacher", models["teacher"], "--student", models["ffn"], "--steps", 4, "--block-size", 64,
              "--batch-size", 8, "--lr", 3e-3, "--checkpoint-every", 0]
    _run([*common, "--micro-batch-size", 4, "-o", tmp_path / "one"])
    args = [*common, "--micro-batch-size", 2, "-o", tmp_path / "two"]
    p = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "-m", "edgekit", "distill", *map(str, args)],
                       capture_output=True, text=True,
                       timeout=600, env=cli_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "distill.json").read_text())
    two = json.loads((tmp_path / "two" / "distill.json").read_text())
    assert (one["processes"], two["processes"], two["backend"]) == (1, 2, "gloo")
    assert _max_diff(tmp_path / "one", tmp_path / "two") <= 1e-4
    a, b = one["heldout_perplexity"]["after"], two["heldout_perplexity"]["after"]
    assert abs(a - b) / a < 1e-4
    assert abs(one["history"][-1][1] - two["history"][-1][1]) < 1e-4  # the logged global loss agrees too
    assert one["heldout_perplexity"]["after"] != one["heldout_perplexity"]["before"]  # it did train


def test_pipeline_refuses_quantize_before_training():
    from edgekit.errors import EdgekitError
    from edgekit.stages import STAGES, check_order

    check_order(STAGES)  # the shipped order passes
    by = {s.name: s for s in STAGES}
    bad = [by[n] for n in ("plan", "quantize", "prune", "distill", "export")]
    with pytest.raises(EdgekitError) as e:
        check_order(bad)
    assert "quantize before prune, distill" in str(e.value) and "destroys trainability" in str(e.value)
    assert "prune -> distill -> quantize" in e.value.fix


def test_refuses_quantized_student(models, tmp_path, cli):
    import torch
    from safetensors.torch import load_file, save_file

    q = tmp_path / "quantized"
    shutil.copytree(models["ffn"], q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "torchao"}
    (q / "config.json").write_text(json.dumps(cfg))
    p = cli("distill", "--teacher", models["teacher"], "--student", q, "--steps", 2, "-o", tmp_path / "o", check=2)
    assert "is quantized" in p.stderr and "destroys trainability" in p.stderr and "prune -> distill -> quantize" \
        in p.stderr
    assert len(p.stderr.strip().splitlines()[-1]) > 0 and p.stderr.count("edgekit: error:") == 1
    # int8 weights without a quantization_config are refused too
    i8 = tmp_path / "int8"
    shutil.copytree(models["ffn"], i8)
    w = load_file(str(i8 / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] = (w["model.layers.0.mlp.up_proj.weight"] * 100).to(torch.int8)
    save_file(w, str(i8 / "model.safetensors"), metadata={"format": "pt"})
    from edgekit.distill.guard import check_trainable
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="holds I8 weights"):
        check_trainable(i8)
    assert not (tmp_path / "o").exists()


def test_bad_inputs(models, tmp_path, cli):
    from edgekit.testing import make_tiny_model

    T, S = models["teacher"], models["ffn"]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    p = cli("distill", "--teacher", T, "--student", S, "--data", empty, "--steps", 2, "-o", tmp_path / "o", check=2)
    assert "holds no text" in p.stderr
    p = cli("distill", "--teacher", T, "--student", S, "--data", tmp_path / "nope", "--steps", 2, "-o", tmp_path / "o",
            check=2)
    assert "data path not found" in p.stderr
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words only")
    p = cli("distill", "--teacher", T, "--student", S, "--data", tiny, "--steps", 2, "-o", tmp_path / "o", check=2)
    assert "too few" in p.stderr or "less than one block" in p.stderr
    other = make_tiny_model("llama", tmp_path / "other", vocab_size=384, intermediate_size=96)
    p = cli("distill", "--teacher", T, "--student", other, "--steps", 2, "-o", tmp_path / "o", check=2)
    assert "vocabulary (384 tokens) is not the teacher's (512)" in p.stderr
    p = cli("distill", "--teacher", T, "--student", tmp_path / "missing", "--steps", 2, "-o", tmp_path / "o", check=2)
    assert "student not found" in p.stderr
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--batch-size", 6, "--micro-batch-size", 4,
            "-o", tmp_path / "o", check=2)
    assert "not a multiple" in p.stderr
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--teacher-cache", "-o", tmp_path / "o", check=2)
    assert "--top-k" in p.stderr
    assert not (tmp_path / "o").exists()


def test_build_stage_distills_the_current_model(models, tmp_path):
    from edgekit.models import resolve_model
    from edgekit.pipeline import BuildContext, BuildOptions
    from edgekit.stages.distill import DistillStage
    from edgekit.target import get_target

    ctx = BuildContext(target=get_target("x86-cpu"), model=resolve_model(str(models["teacher"])),
                       options=BuildOptions(distill_steps=2), build_dir=tmp_path / "build", log=lambda m: None)
    stage = DistillStage()
    ctx.current_model = ctx.model.path  # nothing pruned: nothing to recover
    assert stage.run(ctx, tmp_path / "s0").status == "passed-through"
    ctx.current_model = models["ffn"]
    out = tmp_path / "s1"
    res = stage.run(ctx, out)
    assert res.status == "done" and res.model_dir == "model" and res.summary["steps"] == 2
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert res.summary["heldout_perplexity"]["before"] != res.summary["heldout_perplexity"]["after"]
    assert stage.config(ctx)["steps"] == 2
