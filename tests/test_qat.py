"""Quantization-aware training by distillation (edgekit/qat.py): distill --qat trains through the exporter's grid,
records the scheme, export lowers it on that grid and the real ExecuTorch runtime reproduces the fake-quantized
eager model; bad QAT requests are one line and write nothing; fake-quant insertion goes through each family."""

import json
import shutil

import numpy as np
import pytest

TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and a random student of a narrower MLP (96: a multiple of 32) sharing its tokenizer."""
    from edgekit.testing import make_tiny_model

    root = tmp_path_factory.mktemp("qat")
    teacher = make_tiny_model("llama", root / "teacher", seed=0)
    student = make_tiny_model("llama", root / "student", seed=1, tokenizer=False, intermediate_size=96)
    for f in TOK_FILES:
        shutil.copy(teacher / f, student / f)
    return {"teacher": teacher, "student": student}


def _cfg(**kw):
    from edgekit.distill import DataConfig, DistillConfig, LossConfig, OptimConfig

    base = dict(steps=16, batch_size=8, micro_batch_size=4, checkpoint_every=0, qat="8da4w",
                loss=LossConfig(ce_weight=0.0), data=DataConfig(block_size=64, max_eval_blocks=8),
                optim=OptimConfig(lr=3e-3))
    return DistillConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def qat_run(models, tmp_path_factory):
    from edgekit.distill import distill

    out = tmp_path_factory.mktemp("qatrun") / "student-qat"
    rep = distill(models["teacher"], models["student"], out, _cfg(qat_start=0.25, qat_init="gptq"), progress=False,
                  log=lambda *_: None)
    return out, rep


def test_distill_qat_trains_and_records_the_scheme(qat_run):
    out, rep = qat_run
    kd = [h[2] for h in rep["history"]]
    assert kd[-1] < 0.75 * kd[0], kd  # the KD loss falls, through the fake quantizer for the last 12 steps
    q = rep["qat"]
    assert q["scheme"] == "8da4w" and q["backend"] == "executorch" and q["group_size"] == 32
    assert q["start_step"] == 4 and q["steps"] == 12 and q["fake_quantized_linears"] == 2 * 7 + 1
    assert rep["heldout_perplexity"]["after"] < rep["heldout_perplexity"]["before"]
    rec = json.loads((out / "qat.json").read_text())
    assert rec["scheme"] == "8da4w" and rec["recipe"] == "int8dyn-int4sym-mix" and rec["group_size"] == 32
    assert rec["init"] == "gptq" and q["gptq_seconds"] >= 0  # QAT started from GPTQ's rounding, scales kept
    from edgekit import qat

    scales = qat.load_scales(out)
    assert len(scales) == 15 and scales["lm_head"].shape[1] == 1 and scales["model.layers.0.mlp.up_proj"].shape[1] == 2
    # the saved folder is a plain float HF model (no fake-quant modules, no quantization_config)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    from edgekit.models import load_torch_model

    model, _ = load_torch_model(out)
    assert all(type(m).__name__ != "FakeQuantizedLinear" for m in model.modules())


def test_qat_export_lowers_the_scheme_and_matches_the_fake_quant_model(qat_run, tmp_path):
    """What QAT trains is what ships: the .pte (real ExecuTorch runtime) reproduces the fake-quantized eager model
    far more closely than it reproduces the float weights it was exported from."""
    import torch

    from edgekit import qat
    from edgekit.export import ExportConfig, export_model
    from edgekit.models import load_torch_model
    from edgekit.runtime import open_artifact
    from edgekit.runtime.base import sequence_logits

    out, _ = qat_run
    art = tmp_path / "pte"
    meta = export_model(out, art, ExportConfig(backend="executorch", context_length=128), log=lambda *_: None)
    assert meta["precision"] == "8da4w" and meta["qat"]["scheme"] == "8da4w"
    assert meta["weight_rounding"] == "qat-grid" and meta["quantized_linears"] == 15 and meta["group_size"] == 32
    bits = meta["weight_bits"]  # the exporter's mix, trained as such: head, down, k and v at 8 bits per channel
    assert bits["lm_head"] == bits["model.layers.1.mlp.down_proj"] == bits["model.layers.0.self_attn.v_proj"] == 8
    assert bits["model.layers.0.self_attn.q_proj"] == bits["model.layers.1.mlp.up_proj"] == 4
    assert meta["gate"]["passed"] and meta["gate_reference"].startswith("fake-quantized"), meta["gate"]["failures"]
    model, _ = load_torch_model(out)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 48)
    with torch.no_grad():
        float_logits = model(input_ids=torch.tensor(ids)[None]).logits[0].numpy()
        qat.prepare(model, qat.read(out), qat.load_scales(out))  # the GPTQ start's fixed scales
        fq_logits = model(input_ids=torch.tensor(ids)[None]).logits[0].numpy()
    got = sequence_logits(open_artifact(art), ids)
    d_fq, d_float = np.abs(got - fq_logits).max(), np.abs(got - float_logits).max()
    scale = np.abs(fq_logits).max()
    assert d_fq < 0.02 * scale and d_fq < 0.2 * d_float, (d_fq, d_float, scale)
    assert (got.argmax(-1) == fq_logits.argmax(-1)).mean() >= 0.97


@pytest.mark.slow
def test_killed_qat_run_resumes_on_the_same_gptq_grid(models, tmp_path, cli):
    """SIGKILL after the GPTQ start (step 2 of 8, checkpoint at 4), then the same command: the rerun trains on the
    scales the checkpoint kept (no second GPTQ) and ends with the uninterrupted run's weights and scales."""
    import signal

    from safetensors.torch import load_file

    from edgekit import qat

    common = ["distill", "--teacher", models["teacher"], "--student", models["student"], "--steps", 8,
              "--block-size", 64, "--batch-size", 8, "--micro-batch-size", 4, "--lr", 3e-3, "--checkpoint-every", 2,
              "--qat", "8da4w", "--qat-start", 0.25, "--qat-init", "gptq"]
    cli(*common, "-o", tmp_path / "a", check=0)
    p = cli(*common, "-o", tmp_path / "b", EDGEKIT_FAULT_KILL_AT_STEP="5")
    assert p.returncode == -signal.SIGKILL and (tmp_path / "b.ckpt" / "step-0000004" / qat.SCALES_FILE).is_file()
    p = cli(*common, "-o", tmp_path / "b", check=0)
    assert "step 4/8" in p.stderr and "starts from GPTQ" not in p.stderr, p.stderr[-2000:]
    for f in ("model.safetensors", qat.SCALES_FILE):
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_qat_export_refuses_another_grid(qat_run, tmp_path):
    from edgekit.errors import EdgekitError
    from edgekit.export import ExportConfig, export_model

    out, _ = qat_run
    with pytest.raises(EdgekitError, match="trained for executorch 8da4w"):
        export_model(out, tmp_path / "a", ExportConfig(backend="gguf", precision="q4_0"), log=lambda *_: None)
    with pytest.raises(EdgekitError, match="group size 32, not 64"):
        export_model(out, tmp_path / "b", ExportConfig(backend="executorch", group_size=64), log=lambda *_: None)
    lost = tmp_path / "lost"  # a QAT folder without the scales its GPTQ start trained on
    shutil.copytree(out, lost)
    (lost / "qat_scales.safetensors").unlink()
    with pytest.raises(EdgekitError, match="qat_scales.safetensors is missing"):
        export_model(lost, tmp_path / "c", ExportConfig(backend="executorch"), log=lambda *_: None)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_bad_qat_requests_are_one_line_and_write_nothing(models, tmp_path, cli):
    T, S = models["teacher"], models["student"]
    o = tmp_path / "o"
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--qat", "q4_k_m", "-b", "onnxruntime",
            "-o", o, check=2)
    assert "backend onnxruntime cannot lower the QAT scheme 'q4_k_m'" in p.stderr and "fix:" in p.stderr
    assert p.stderr.count("edgekit: error:") == 1
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--qat", "q4_k_m", "-o", o, check=2)
    assert "no quantization-aware training recipe" in p.stderr and "--qat 8da4w" in p.stderr
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--qat", "8da4w", "--group-size", 48,
            "-o", o, check=2)
    assert "group size 48 does not divide the input width" in p.stderr and "(in 64)" in p.stderr
    assert "--group-size 32" in p.stderr
    q = tmp_path / "quantized"
    shutil.copytree(S, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "torchao"}
    (q / "config.json").write_text(json.dumps(cfg))
    p = cli("distill", "--teacher", T, "--student", q, "--steps", 2, "--qat", "8da4w", "-o", o, check=2)
    assert "with QAT" in p.stderr and "is quantized" in p.stderr and "full-precision weights" in p.stderr
    art = tmp_path / "artifact"
    shutil.copytree(S, art)
    (art / "artifact.json").write_text(json.dumps({"backend": "executorch", "precision": "8da4w"}))
    p = cli("distill", "--teacher", T, "--student", art, "--steps", 2, "--qat", "8da4w", "-o", o, check=2)
    assert "exported edgekit artifact" in p.stderr and "with QAT" in p.stderr
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--group-size", 32, "-o", o, check=2)
    assert "only apply to quantization-aware training" in p.stderr
    assert not o.exists() and not (tmp_path / "o.ckpt").exists()


@pytest.mark.parametrize("arch", sorted(__import__("edgekit.arch", fromlist=["FAMILIES"]).FAMILIES))
def test_equalize_keeps_the_function_and_moves_the_scales(arch, tmp_path):
    """int4's activation-aware equalization, through every family (Gemma's 1 + w norms, Phi-3's fused gate_up): the
    logits stay while the gate/up columns and the MLP-input norm change."""
    import torch

    from edgekit import qat
    from edgekit.arch import get_family
    from edgekit.models import load_torch_model
    from edgekit.testing import make_tiny_model

    model, _ = load_torch_model(make_tiny_model(arch, tmp_path / arch, quirks=True))
    plan = qat.resolve("int4")
    assert plan.equalize == qat.EQUALIZE_ALPHA > 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=g)
    fam = get_family(arch)
    layer = fam.layers(model)[0]
    gate, norm = fam.gate_up(layer)[0].module, fam.layer_norms(layer)[fam.norm_roles.index("mlp_in")]
    with torch.no_grad():  # some loud channels, as trained models have them, so the scales have work to do
        model.get_input_embeddings().weight[:, :3] *= 8
        ref = model(input_ids=ids).logits
        w0, n0 = gate.weight.clone(), norm.weight.clone()
    calib = [torch.randint(0, model.config.vocab_size, (2, 32), generator=g) for _ in range(2)]
    assert qat.equalize(model, plan, calib) == len(fam.layers(model))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max()), (out - ref).abs().max()
    assert not torch.equal(gate.weight, w0) and not torch.equal(norm.weight, n0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_fake_quant_covers_every_linear_the_exporter_quantizes(arch, tmp_path):
    """Insertion goes through the family's module access: every nn.Linear the 8da4w exporter quantizes (fused
    projections once, the head) is fake-quantized, gradients reach the float weights, convert restores the model."""
    import torch
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    from edgekit import qat
    from edgekit.models import load_torch_model
    from edgekit.testing import make_tiny_model

    model, _ = load_torch_model(make_tiny_model(arch, tmp_path / arch, quirks=True))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    keys = set(model.state_dict())
    plan = qat.resolve("8da4w")
    ids = torch.arange(16)[None] % model.config.vocab_size
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert qat.prepare(model, plan) == len(linears)
    assert {n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)} == linears
    out = model(input_ids=ids).logits
    assert 0 < (out - ref).abs().max() < 0.5 * ref.abs().max()  # quantized numerics, not noise
    out.square().mean().backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in linears)
    assert qat.convert(model) == len(linears) and set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)  # the float weights are untouched without training


def test_qat_recipes_live_in_the_precision_registry():
    from edgekit import qat
    from edgekit.precision import PRECISIONS, backends_for, qat_schemes

    assert qat_schemes() == ["int4", "8da4w"]
    for name in qat_schemes():
        assert PRECISIONS[name].fake_quant in qat.RECIPES and PRECISIONS[name].quantized and backends_for(name)
    assert qat.resolve("A8W4").scheme == "8da4w"  # aliases and case work like every precision flag
    assert qat.resolve("W4").backend == "onnxruntime" and qat.resolve("int4").recipe == "int4asym-mix"


def test_int4_qat_refusals_are_one_line_and_write_nothing(models, tmp_path, cli):
    """ONNX Runtime int4's QAT: its grid has no GPTQ or learned start, its kernels take groups of 32/64/128 only,
    ExecuTorch cannot lower it, and a folder trained for it exports to nothing else."""
    from edgekit import qat
    from edgekit.errors import EdgekitError
    from edgekit.export import ExportConfig, export_model

    with pytest.raises(EdgekitError, match="--qat-init gptq is for symmetric grids"):
        qat.resolve("int4", init="gptq")
    with pytest.raises(EdgekitError, match="onnxruntime int4 takes group sizes 32, 64, 128, not 16"):
        qat.resolve("int4", group_size=16)
    with pytest.raises(EdgekitError, match="backend executorch cannot lower the QAT scheme 'int4'; int4 is built by "
                                           "onnxruntime") as e:
        qat.resolve("int4", backend="executorch")
    assert "--qat 8da4w" in e.value.fix
    T, S, o = models["teacher"], models["student"], tmp_path / "o"
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--qat", "int4", "--qat-init", "learned",
            "-o", o, check=2)
    assert p.stderr.count("edgekit: error:") == 1 and "--qat-init learned is for symmetric grids" in p.stderr
    p = cli("distill", "--teacher", T, "--student", S, "--steps", 2, "--qat", "int4", "--qat-equalize", 2,
            "-o", o, check=2)
    assert p.stderr.count("edgekit: error:") == 1 and "--qat-equalize must be in [0, 1], got 2.0" in p.stderr
    assert not o.exists() and not (tmp_path / "o.ckpt").exists()
    folder = tmp_path / "int4-qat"  # what distill --qat int4 writes beside the weights
    shutil.copytree(S, folder)
    qat.write(folder, qat.resolve("int4"))
    with pytest.raises(EdgekitError, match="trained for onnxruntime int4"):
        export_model(folder, tmp_path / "a", ExportConfig(backend="executorch", precision="8da4w"),
                     log=lambda *_: None)
    with pytest.raises(EdgekitError, match="trained for onnxruntime int4"):
        export_model(folder, tmp_path / "b", ExportConfig(backend="onnxruntime", precision="int8"),
                     log=lambda *_: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_build_qat_dry_run_and_refusals(cli, tiny_models, tmp_path):
    out = tmp_path / "b"
    plan = json.loads(cli("build", "--target", "android-arm64", tiny_models["llama"], "-o", out, "--qat", "8da4w",
                          "--distill-steps", 4, "--dry-run", "--json", check=0).stdout)
    assert plan["resolved"]["backend"] == "executorch" and plan["resolved"]["precision"] == "8da4w"
    assert "quantization-aware for 8da4w" in {s["stage"]: s["action"] for s in plan["stages"]}["distill"]
    p = cli("build", "--target", "android-arm64", tiny_models["llama"], "-o", out, "--qat", "8da4w", check=2)
    assert "add --distill-steps N" in p.stderr
    p = cli("build", "--target", "android-arm64", tiny_models["llama"], "-o", out, "--qat", "8da4w", "-p", "fp32",
            "--distill-steps", 4, check=2)
    assert "--qat 8da4w trains for 8da4w, but --precision asks for fp32" in p.stderr
    p = cli("build", "--target", "x86-cpu", "-b", "onnxruntime", tiny_models["llama"], "-o", out, "--qat", "8da4w",
            "--distill-steps", 4, check=2)
    assert "backend onnxruntime cannot lower the QAT scheme '8da4w'" in p.stderr
    # x86-cpu builds GGUF by default and runs ONNX Runtime too: --qat int4 picks the backend that lowers it
    plan = json.loads(cli("build", "--target", "x86-cpu", tiny_models["qwen2"], "-o", out, "--qat", "int4",
                          "--distill-steps", 4, "--dry-run", "--json", check=0).stdout)
    assert plan["resolved"]["backend"] == "onnxruntime" and plan["resolved"]["precision"] == "int4"
    p = cli("build", "--target", "x86-cpu", "-b", "gguf", tiny_models["qwen2"], "-o", out, "--qat", "int4",
            "--distill-steps", 4, check=2)  # an explicit backend is kept, and refused when it cannot lower it
    assert "backend gguf cannot lower the QAT scheme 'int4'; int4 is built by onnxruntime" in p.stderr
    p = cli("build", "--target", "x86-cpu", "-b", "gguf", tiny_models["llama"], "-o", out, "--qat", "q4_k_m",
            "--distill-steps", 4, check=2)  # gguf builds q4_k_m, but edgekit has no QAT recipe for it
    assert "q4_k_m has no quantization-aware training recipe" in p.stderr
    assert not out.exists()


@pytest.mark.slow
def test_build_qat_distills_then_exports_the_scheme(cli, tiny_models, tmp_path):
    m = json.loads(cli("build", "--target", "android-arm64", tiny_models["llama"], "-o", tmp_path / "b", "--qat",
                       "8da4w", "--distill-steps", 4, "--context", 128, "--no-bench", "--json", check=0).stdout)
    st = m["stages"]
    assert st["distill"]["status"] == "done" and st["distill"]["result"]["qat"]["scheme"] == "8da4w"
    ex = st["export"]["result"]
    assert ex["precision"] == "8da4w" and ex["gate"]["passed"]


@pytest.mark.slow  # 84 s: three distill and two export processes, like the GPTQ-start resume test above
def test_learned_scales_train_resume_and_export(models, tmp_path, cli):
    """--qat-init learned (LSQ): the scales start at max's rule and train with the weights; a SIGKILL mid-run, then
    the same command, ends with the uninterrupted run's weights and scales; export rounds on those learned scales."""
    import signal

    import torch
    from safetensors.torch import load_file

    from edgekit import qat
    from edgekit.models import load_torch_model

    common = ["distill", "--teacher", models["teacher"], "--student", models["student"], "--steps", 8,
              "--block-size", 64, "--batch-size", 8, "--micro-batch-size", 4, "--lr", 3e-3, "--checkpoint-every", 2,
              "--qat", "8da4w", "--qat-init", "learned"]
    cli(*common, "-o", tmp_path / "a", check=0)
    p = cli(*common, "-o", tmp_path / "b", EDGEKIT_FAULT_KILL_AT_STEP="5")
    assert p.returncode == -signal.SIGKILL and (tmp_path / "b.ckpt" / "step-0000004" / qat.SCALES_FILE).is_file()
    p = cli(*common, "-o", tmp_path / "b", check=0)
    assert "step 4/8" in p.stderr, p.stderr[-2000:]
    for f in ("model.safetensors", qat.SCALES_FILE):
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, f
    plan = qat.read(tmp_path / "a")
    assert plan.init == "learned"
    learned = qat.load_scales(tmp_path / "a", plan)
    model, _ = load_torch_model(tmp_path / "a")
    names = [n for n, _ in qat.target_linears(model, qat.recipe(plan))]
    assert sorted(learned) == sorted(names)
    moved = []
    for n in names:  # trained: not what max's rule gives for the trained weights
        s_max = qat.weight_grid(model.get_submodule(n).weight, plan, n)[1]
        assert learned[n].shape == s_max.shape
        moved.append(((learned[n] - s_max).abs() / s_max).mean().item())
        if qat.bits(plan, n) == 4:  # stored as XNNPACK stores 4-bit group scales
            assert torch.equal(learned[n], learned[n].to(torch.bfloat16).float())
    assert min(moved) > 0.01, moved
    # no -p: a QAT folder exports the scheme it trained for
    out = json.loads(cli("export", tmp_path / "a", "-b", "executorch", "-o", tmp_path / "pte", "--json",
                         "--context", 128, "--accept-gate-failure", check=0).stdout)
    assert out["precision"] == "8da4w" and out["gate"]["mean_kl"] < 0.35
    (tmp_path / "a" / qat.SCALES_FILE).unlink()
    p = cli("export", tmp_path / "a", "-b", "executorch", "-o", tmp_path / "pte2", check=2)
    assert f"{qat.SCALES_FILE} is missing" in p.stderr and "learned scales" in p.stderr


def test_learned_scales_refuse_several_processes():
    from edgekit.errors import EdgekitError

    _cfg(qat_init="learned").validate(1)
    with pytest.raises(EdgekitError, match="runs in one process, not 2"):
        _cfg(qat_init="learned").validate(2)
    _cfg(qat_init="max").validate(2)


def test_learned_scales_are_parameters_that_get_gradients(models):
    """In process (the slow test above runs the whole CLI): a learned plan's scales start at max's rule, are
    Parameters the loss reaches, stay positive when clamped and round to bf16 where the runtime stores bf16."""
    import torch

    from edgekit import qat
    from edgekit.models import load_torch_model

    model, _ = load_torch_model(models["student"])
    plan = qat.resolve("8da4w", init="learned")
    before = {n: qat.weight_grid(m.weight, plan, n)[1] for n, m in qat.target_linears(model, qat.recipe(plan))}
    assert qat.prepare(model, plan) == len(before)
    scales = qat.learned_scales(model)
    assert len(scales) == len(before) and all(isinstance(p, torch.nn.Parameter) for p in scales)
    assert all(torch.equal(a, b) for a, b in zip(qat.fixed_scales(model).values(), before.values()))
    model(input_ids=torch.arange(1, 17)[None]).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)
    with torch.no_grad():
        scales[0].fill_(-1.0)
        scales[1].mul_(1.0 + 1e-3)  # off bf16's grid
    qat.clamp_learned_scales(model)
    qat.round_learned_scales(model, plan)
    assert scales[0].min() > 0
    four = [n for n in before if qat.bits(plan, n) == 4]
    fixed = qat.fixed_scales(model)
    assert four and all(torch.equal(fixed[n], fixed[n].to(torch.bfloat16).float()) for n in four)
