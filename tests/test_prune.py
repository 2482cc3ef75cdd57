"""Structured pruning on tiny random GQA Llama / Qwen2 / Mistral (4 heads, 2 KV groups): shapes, round trips,
GQA correctness, planted-neuron survival, alignment, budget, and bad inputs."""

import json
import shutil
from pathlib import Path

import pytest

ARCHS = ("llama", "qwen2", "mistral")


def _load_dense(path):
    from edgekit.models import load_torch_model

    return load_torch_model(path)


def _ids(tok, n=48):
    import torch

    from edgekit.data import heldout_text

    return torch.tensor([tok(heldout_text()[:2000])["input_ids"][:n]])


@pytest.fixture(scope="module")
def pruned_uniform(tiny_models, tmp_path_factory):
    from edgekit.prune import Budget, PruneConfig, prune_model

    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for arch in ARCHS:
        cfg = PruneConfig(Budget(ratio=0.3), criterion="activation", num_samples=8, hidden_keep=0.75)
        out[arch] = (root / arch, prune_model(tiny_models[arch], root / arch, cfg, log=lambda s: None))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_roundtrips_through_from_pretrained(arch, pruned_uniform, tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.arch import geometry

    folder, report = pruned_uniform[arch]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == arch and "edgekit_layer_widths" not in cfg
    assert report["uniform"] and cfg["hidden_size"] == 48  # hidden_keep 0.75 of 64
    svg = (folder / "edgekit-prune.svg").read_text()
    assert svg.startswith("<svg") and "MLP width" in svg and "predicted loss" not in svg
    assert "hidden width 64 -&gt; 48" in svg and "KV groups, pruned" in svg
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # no custom code
    n = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert n == report["params_after"] == geometry(cfg).params()
    L0 = report["layers"][0]
    a = model.model.layers[0].self_attn
    assert a.q_proj.weight.shape == (L0["heads"][1] * 16, 48)
    assert a.k_proj.weight.shape == (L0["kv_heads"][1] * 16, 48)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (48, L0["intermediate"][1])
    if arch == "qwen2":
        assert a.q_proj.bias.shape == (L0["heads"][1] * 16,)
    _, tok = _load_dense(tiny_models[arch])
    ids = _ids(tok)
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"]) and torch.isfinite(logits).all()
    # the budget is met to within one alignment unit of MLP neurons (8 neurons x 3 matrices x hidden x layers)
    unit = 8 * 3 * 48 * len(report["layers"])
    assert abs(report["params_before"] - report["params_after"] - 0.3 * report["params_before"]) <= unit


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_non_uniform_folder_loads_and_runs(arch, tiny_models, tmp_path):
    import torch

    from edgekit.export import model_summary
    from edgekit.models import load_torch_model
    from edgekit.prune import Budget, PruneConfig, prune_model

    # 4 layers, one protected: the global ranking gives layers different widths
    src = tmp_path / "src"
    from edgekit.testing import make_tiny_model

    make_tiny_model(arch, src, seed=3, num_hidden_layers=4)
    cfg = PruneConfig(Budget(ratio=0.35), criterion="taylor", non_uniform=True, num_samples=8, hidden_keep=1.0,
                      protected_layers=(0,))
    report = prune_model(src, tmp_path / "out", cfg, log=lambda s: None)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    widths = conf.get("edgekit_layer_widths")
    assert widths and len(widths) == 4 and not report["uniform"]
    assert widths[0] == {"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}  # protected
    assert conf["intermediate_size"] == max(w["intermediate_size"] for w in widths)
    assert conf["num_attention_heads"] == max(w["num_attention_heads"] for w in widths)
    assert model_summary(conf)["layer_widths"] == widths
    model, tok = load_torch_model(tmp_path / "out")
    for layer, w in zip(model.model.layers, widths):
        assert layer.mlp.gate_proj.out_features == w["intermediate_size"] >= 8
        assert layer.self_attn.q_proj.out_features == 16 * w["num_attention_heads"]
        assert layer.self_attn.k_proj.out_features == 16 * w["num_key_value_heads"] >= 16
    ids = _ids(tok)
    assert torch.isfinite(model(ids).logits).all()
    assert abs(report["removed_fraction"] - 0.35) < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_a_kv_group_removes_exactly_its_query_heads(arch, tiny_models, tmp_path):
    """Silence KV group 1 (o_proj columns of its query heads 2, 3 set to zero): activation importance must pick that
    group, the pruned model keeps query heads 0, 1 with KV head 0, and its logits equal the dense model's."""
    import torch

    from edgekit.prune import allocate
    from edgekit.prune.apply import build_model, pruned_config, pruned_state
    from edgekit.arch import geometry, get_family
    from edgekit.prune.calib import calibration_sequences
    from edgekit.prune.criteria import activation

    model, tok = _load_dense(tiny_models[arch])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:64] = 0
    ad = get_family(arch)
    seqs = calibration_sequences(tok, None, 64, 4)
    scores = activation(model, ad, iter([torch.stack(seqs)]))
    base = geometry(model.config.to_dict())
    plan = allocate.uniform_plan(scores, base, D=64, k=1, g=2, inter=128)
    for lp in plan.layers:
        assert lp.kv == [0] and lp.heads == [0, 1]
    pruned = build_model(pruned_config(model, plan), pruned_state(model, ad, plan))
    a0, p0 = model.model.layers[0].self_attn, pruned.model.layers[0].self_attn
    assert torch.equal(p0.q_proj.weight, a0.q_proj.weight[:32]) and torch.equal(p0.k_proj.weight, a0.k_proj.weight[:16])
    assert p0.num_key_value_groups == 2 and pruned.config.num_key_value_heads == 1
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("criterion", ("activation", "taylor"))
def test_planted_dominant_neuron_survives(criterion, tiny_models, tmp_path):
    import torch

    from edgekit.models import load_torch_model
    from edgekit.prune import Budget, PruneConfig, prune_model

    src = tmp_path / "planted"
    shutil.copytree(tiny_models["llama"], src)
    model, _ = load_torch_model(src)
    j = 77
    with torch.no_grad():  # a neuron whose activation and output dominate layer 0's MLP
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[j] *= 12
        mlp.up_proj.weight[j] *= 12
        mlp.down_proj.weight[:, j] *= 12
    model.save_pretrained(src)
    planted = mlp.down_proj.weight[:, j].clone()
    # no refit: the kept column must come out exactly as it went in
    cfg = PruneConfig(Budget(ratio=0.4), criterion=criterion, num_samples=8, hidden_keep=1.0, reconstruct=False)
    prune_model(src, tmp_path / "out", cfg, log=lambda s: None)
    pruned, _ = load_torch_model(tmp_path / "out")
    down = pruned.model.layers[0].mlp.down_proj.weight
    assert down.shape[1] < 128  # the MLP was pruned...
    assert any(torch.equal(down[:, c], planted) for c in range(down.shape[1]))  # ...and the planted neuron kept


@pytest.mark.parametrize("arch,hidden", [("llama", 64), ("qwen2", 48)])
def test_reconstruction_brings_the_cut_model_back_towards_the_dense_one(arch, hidden, tiny_models):
    """Half the MLP and half the heads cut (and a quarter of the hidden channels for qwen2): the least-squares refit
    of o_proj/down_proj on calibration windows must cut the KL to the dense model on *other* windows, and touch
    nothing but those two projections."""
    import torch

    from edgekit.prune import allocate
    from edgekit.prune.apply import build_model, norm_scales, pruned_config, pruned_state
    from edgekit.arch import geometry, get_family
    from edgekit.prune.calib import batches, calibration_sequences
    from edgekit.prune.criteria import activation
    from edgekit.prune.reconstruct import reconstruct

    model, tok = _load_dense(tiny_models[arch])
    ad = get_family(arch)
    seqs = calibration_sequences(tok, None, 64, 24)
    calib, held = seqs[:16], torch.stack(seqs[16:])
    scores = activation(model, ad, batches(calib, 4))
    plan = allocate.uniform_plan(scores, geometry(model.config.to_dict()), D=hidden, k=2, g=1, inter=64)
    if hidden < 64:
        plan.norm_scales = norm_scales(model, ad, calib, {hidden: plan.hidden})[hidden]
    pruned = build_model(pruned_config(model, plan), pruned_state(model, ad, plan))
    before_w = {k: v.clone() for k, v in pruned.state_dict().items()}

    def kl():
        with torch.no_grad():
            p = torch.log_softmax(model(held).logits, -1)
            q = torch.log_softmax(pruned(held).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    cut = kl()
    info = reconstruct(model, pruned, ad, plan.hidden, batches(calib, 4))
    refit = kl()
    assert refit < 0.8 * cut, (cut, refit)
    assert info["tokens"] == 16 * 64 and info["target"].startswith("dense layer" if hidden == 64 else "dense stream")
    changed = {k for k, v in pruned.state_dict().items() if not torch.equal(v, before_w[k])}
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in changed), changed


def test_refit_error_cost_is_the_refitted_projections_error():
    """The closed-form cost of a width equals half the Fisher-weighted squared error the refitted projection actually
    makes on the same inputs (reconstruct._refit fits it)."""
    import torch

    from edgekit.prune.reconstruct import _refit
    from edgekit.prune.sensitivity import refit_error_cost

    torch.manual_seed(0)
    X = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs, so the kept columns can stand in
    lin = torch.nn.Linear(32, 12, bias=False)
    W = lin.weight.detach().clone()
    keep = list(range(0, 32, 3))
    F = torch.rand(12, dtype=torch.float64) + 0.5
    predicted = refit_error_cost(W.double(), (X.double().T @ X.double()) / len(X), keep, F, damp=0.1)
    cut = torch.nn.Linear(len(keep), 12, bias=False)
    cut.weight.data.copy_(W[:, keep])
    _refit(cut, [X[:, keep]], [X @ W.T], damp=0.1)
    err = (X @ W.T - X[:, keep] @ cut.weight.detach().T).double().pow(2).mean(0)
    assert predicted == pytest.approx(0.5 * float((F * err).sum()), rel=1e-4)
    as_cut = refit_error_cost(W.double(), (X.double().T @ X.double()) / len(X), keep, F, 0.1, refit=False)
    assert as_cut > 1.5 * predicted  # the refit is what makes the kept columns stand in


def test_non_uniform_cuts_where_the_predicted_loss_is_lowest(tiny_models, tmp_path):
    """A layer whose MLP writes nothing costs nothing to narrow: the non-uniform allocation takes it to the minimum
    width before touching the others. Raw activation scores cannot see that across layers; the layer costs can."""
    import torch

    from edgekit.models import load_torch_model
    from edgekit.prune import Budget, PruneConfig, prune_model
    from edgekit.testing import make_tiny_model

    src = make_tiny_model("llama", tmp_path / "src", seed=5, num_hidden_layers=4)
    model, tok = load_torch_model(src)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-4)
    model.save_pretrained(src, safe_serialization=True)
    rep = prune_model(src, tmp_path / "out", PruneConfig(Budget(ratio=0.2), non_uniform=True, hidden_keep=1.0,
                                                         num_samples=8, seq_len=64), log=lambda s: None)
    inter = [r["intermediate"][1] for r in rep["layers"]]
    assert inter[2] == 8 and min(inter[:2] + inter[3:]) > 8, inter
    assert rep["layer_costs_seconds"] > 0 and abs(rep["removed_fraction"] - 0.2) < 0.05
    assert "predicted loss increase" in (tmp_path / "out" / "edgekit-prune.svg").read_text()
    mlp = [p["mlp"] for p in rep["predicted_loss_increase"]]
    assert len(mlp) == 4 and mlp[2] < 0.01 * max(mlp), mlp  # the silent MLP costs ~nothing even at width 8


def test_alignment_is_honoured(tiny_models, tmp_path):
    from edgekit.prune import Budget, PruneConfig, prune_model

    for nu in (False, True):
        rep = prune_model(tiny_models["mistral"], tmp_path / f"a{nu}",
                          PruneConfig(Budget(ratio=0.3), align=32, num_samples=8, non_uniform=nu),
                          log=lambda s: None)
        assert rep["hidden_size"]["after"] % 32 == 0
        for r in rep["layers"]:
            i, h = r["intermediate"][1], r["heads"][1]
            assert i % 32 == 0 or i == 128
            assert (h * 16) % 32 == 0 or h == 4
        assert abs(rep["removed_fraction"] - 0.3) < 0.05


def test_budget_by_params_and_bytes(tiny_models):
    from edgekit.errors import EdgekitError
    from edgekit.prune import Budget

    assert Budget(params=80_000).removed(100_000) == 20_000
    assert Budget(bytes=200_000, bytes_per_param=4).removed(100_000) == 50_000
    for b in (Budget(ratio=0.0), Budget(ratio=1.0), Budget(params=200_000), Budget(), Budget(ratio=0.2, params=5)):
        with pytest.raises(EdgekitError):
            b.removed(100_000)


def test_cli_prune_and_bad_inputs(cli, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny_models["qwen2"]
    p = cli("prune", m, "--ratio", "0.25", "--criterion", "magnitude", "--samples", "8", "-o", tmp_path / "o",
            "--json", check=0)
    rep = json.loads(p.stdout)
    assert 0.2 < rep["removed_fraction"] < 0.3
    AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    # the refit ran on the calibration windows (8 x 256 tokens) and is reported; --no-reconstruct skips it
    assert rep["reconstruction"]["tokens"] == 8 * 256 and rep["config"]["reconstruct"] is True
    assert rep["cut_search_loss"] > 0 and rep["pruned_search_loss"] > 0
    p = cli("prune", m, "--ratio", "0.25", "--criterion", "magnitude", "--samples", "8", "--no-reconstruct",
            "-o", tmp_path / "o2", "--json", check=0)
    rep2 = json.loads(p.stdout)
    assert "reconstruction" not in rep2 and rep2["config"]["reconstruct"] is False
    for ratio in ("1.5", "0", "-0.2"):
        p = cli("prune", m, "--ratio", ratio, "-o", tmp_path / "bad", check=2)
        assert "--ratio" in p.stderr and "between 0 and 1" in p.stderr and not (tmp_path / "bad").exists()
    p = cli("prune", m, "--ratio", "0.995", "-o", tmp_path / "bad", check=2)
    assert "left with nothing" in p.stderr
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    p = cli("prune", gpt2, "--ratio", "0.3", "-o", tmp_path / "bad", check=2)
    assert "unsupported model family 'gpt2'" in p.stderr


def test_unsupported_arch_in_prune_api(tmp_path):
    from edgekit.errors import EdgekitError
    from edgekit.prune import Budget, PruneConfig, prune_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))  # mixture of experts
    with pytest.raises(EdgekitError, match="unsupported model family 'mixtral'.*Phi-3"):
        prune_model(tmp_path, tmp_path / "o", PruneConfig(Budget(ratio=0.3)))


def test_build_prune_stage_feeds_export(cli, tiny_models, tmp_path):
    """`edgekit build --prune-ratio` prunes with the target's width alignment and exports the pruned model."""
    out = tmp_path / "b"
    p = cli("build", "--target", "x86-cpu", "-b", "onnxruntime", tiny_models["llama"], "--prune-ratio", "0.3", "--no-bench",
            "-o", out,
            "--json", check=0)
    man = json.loads(p.stdout)
    pr = man["stages"]["prune"]
    assert pr["status"] == "done" and abs(pr["result"]["removed_fraction"] - 0.3) < 0.05
    art = json.loads((out / "04-export" / "artifact" / "artifact.json").read_text())
    pruned = json.loads((out / "01-prune" / "model" / "config.json").read_text())
    assert art["model"]["intermediate_size"] == pruned["intermediate_size"] < 128
    assert art["model"]["hidden_size"] == pruned["hidden_size"] and art["gate"]["passed"]


def test_calibration_from_user_jsonl_and_txt(tiny_models, tmp_path):
    from edgekit.errors import EdgekitError
    from edgekit.models import load_torch_model
    from edgekit.prune.calib import calibration_sequences

    _, tok = load_torch_model(tiny_models["llama"])
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"The function number {i} returns a list "
                                                             "of values from the module." * 3}) for i in range(40)))
    seqs = calibration_sequences(tok, tmp_path / "a.jsonl", 32, 6)
    assert len(seqs) == 6 and all(s.shape == (32,) for s in seqs)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(EdgekitError, match="shorter than one sequence"):
        calibration_sequences(tok, tmp_path / "short.txt", 256, 4)


def test_output_folder_is_checked_before_any_work(tmp_path):
    """-o may not be, hold or sit inside an input, be a file, or replace a non-empty folder edgekit did not write
    (unless forced); an unwritable -o fails at once."""
    from edgekit.errors import EdgekitError
    from edgekit.fsutil import check_output

    src = tmp_path / "parent" / "model"
    src.mkdir(parents=True)
    (tmp_path / "afile").write_text("keep me")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    for out, msg in ((src, "overlaps the input"), (src.parent, "overlaps the input"), (src / "sub", "overlaps"),
                     (tmp_path / "afile", "is a file"), (mine, "not written by edgekit"),
                     (Path("/proc/edgekit-out"), "cannot write")):
        with pytest.raises(EdgekitError, match=msg):
            check_output(out, [src], "edgekit-prune.json")
    assert check_output(mine, [src], "edgekit-prune.json", force=True) == mine
    (mine / "edgekit-prune.json").write_text("{}")  # an earlier prune's folder: replaced without --force
    assert check_output(mine, [src], "edgekit-prune.json") == mine
    assert not (src / "sub").exists() and (mine / "thesis.tex").exists()


def test_cli_prune_export_distill_refuse_to_overwrite_and_write_ordinary_folders(cli, tiny_models, tmp_path):
    import os
    import stat

    src = tmp_path / "parent" / "model"
    shutil.copytree(tiny_models["llama"], src)
    (src / "dense_backup.pt").write_bytes(b"not a model file")  # unrelated files are not copied into the output
    config = (src / "config.json").read_text()
    args = ("prune", src, "--ratio", "0.25", "--samples", "4")
    p = cli(*args, "-o", src.parent, check=2)
    assert "overlaps the input" in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "overlaps the input" in cli("export", src, "-b", "onnxruntime", "-o", src / "art", check=2).stderr
    assert "overlaps the input" in cli("distill", "--teacher", src, "--student", src, "--steps", "1", "-o",
                                       src.parent, check=2).stderr
    assert "overlaps the input" in cli("build", "--target", "x86-cpu", src, "-o", src / "build", check=2).stderr
    assert (src / "config.json").read_text() == config
    out = tmp_path / "o"
    (tmp_path / ".o.tmp-killed").mkdir()  # what a SIGKILL inside atomic_dir leaves
    cli(*args, "-o", out, check=0)
    cli(*args, "-o", out, check=0)  # an earlier prune's folder is replaced without --force
    assert not (tmp_path / ".o.tmp-killed").exists()
    assert not (out / "dense_backup.pt").exists() and (out / "tokenizer.json").exists()
    if os.umask(0o022) == 0o022:
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert stat.S_IMODE((out / "edgekit-prune.json").stat().st_mode) == 0o644


def test_prune_bad_inputs_fail_before_any_work(cli, tiny_models, tmp_path):
    from edgekit.errors import EdgekitError
    from edgekit.prune import Budget, PruneConfig, prune_model

    m = tiny_models["llama"]
    bad = tmp_path / "bad"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 400)
    cases = (
        (dict(protected_layers=(0,)), "only apply to per-layer widths"),
        (dict(non_uniform=True, protected_layers=(7,)), "protected layer 7 does not exist"),
        (dict(non_uniform=True, protected_layers=(0, 1)), "every layer is protected"),
        (dict(calibration=tmp_path / "latin1.txt"), "is not UTF-8 text"),
        (dict(seq_len=1024), "longer than the model's context"),
    )
    for kw, msg in cases:
        with pytest.raises(EdgekitError, match=msg):
            prune_model(m, bad, PruneConfig(Budget(ratio=0.3), **kw), log=lambda s: None)
    with pytest.raises(EdgekitError, match="bytes per parameter must be a positive number"):
        prune_model(m, bad, PruneConfig(Budget(bytes=100_000, bytes_per_param=0.0)), log=lambda s: None)
    broken = tmp_path / "broken"
    shutil.copytree(m, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    p = cli("prune", broken, "--ratio", "0.3", "-o", bad, check=2)
    assert "cannot load the model" in p.stderr and "Traceback" not in p.stderr
    assert not bad.exists()


def test_size_budgets_are_never_exceeded_and_non_uniform_accepts_a_hidden_only_cut(tiny_models, tmp_path):
    from edgekit.prune import Budget, PruneConfig, prune_model

    for b in (Budget(params=100_000), Budget(bytes=400_000, bytes_per_param=4)):
        rep = prune_model(tiny_models["llama"], tmp_path / "b", PruneConfig(b, num_samples=4), log=lambda s: None)
        assert rep["params_after"] <= 100_000
    # the hidden cut alone (--hidden-keep 0.75) already removes 25%: non-uniform has nothing to share out
    rep = prune_model(tiny_models["llama"], tmp_path / "nu", PruneConfig(Budget(ratio=0.25), hidden_keep=0.75,
                      non_uniform=True, num_samples=4), log=lambda s: None)
    assert rep["hidden_size"]["after"] == 48 and "alone meets the budget" in rep["non_uniform_skipped"]


def test_a_refit_that_raises_the_held_out_loss_is_undone(tiny_models, tmp_path):
    """The refit is judged on the search sequences (held out from the fit): on this random tiny model with 8
    calibration sequences it overfits, so the plain cut is written; elsewhere it is kept. Never worse than the cut."""
    from edgekit.prune import Budget, PruneConfig, prune_model

    seen = {}
    for ns in (4, 8):
        rep = prune_model(tiny_models["llama"], tmp_path / str(ns), PruneConfig(Budget(ratio=0.3), num_samples=ns),
                          log=lambda s: None)
        assert rep["pruned_search_loss"] <= rep["cut_search_loss"]
        seen[ns] = rep["reconstruction"]["kept"]
        if not seen[ns]:
            assert rep["pruned_search_loss"] == rep["cut_search_loss"]  # the cut's weights, restored exactly
    assert seen == {4: True, 8: False}


# An embedding-heavy model (small LMs keep most weights in the embedding: Gemma 3 270M ~60%): 3 layers of hidden 96
# beside an 8192-entry untied vocabulary, so the embedding holds 92% of the parameters. The layers are too small to
# make up what a hidden step leaves (hidden 72 with the narrowest layers removes 29.5%; hidden 64 alone 33.3%).
EMBEDDING_HEAVY = dict(vocab_size=8192, hidden_size=96, num_hidden_layers=3, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def embedding_heavy(tmp_path_factory):
    from edgekit.testing import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("embedding_heavy") / "m", seed=7, **EMBEDDING_HEAVY)


def _prune_flags() -> set:
    import argparse

    from edgekit.commands.prune import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    return {o for a in sub.choices["prune"]._actions for o in a.option_strings}


@pytest.mark.parametrize("ratio", (0.3, 0.33, 0.4))
def test_embedding_heavy_model_prunes_at_ratios_only_the_hidden_width_can_meet(ratio, embedding_heavy, tmp_path):
    """No aligned intermediate size lands on these budgets at any hidden width: the search falls back to the closest
    uniform cut within the budget (the hidden cut alone) instead of failing, and says why."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.prune import Budget, PruneConfig, prune_model

    logs = []
    rep = prune_model(embedding_heavy, tmp_path / "o", PruneConfig(Budget(ratio=ratio), num_samples=4, seq_len=64),
                      log=logs.append)
    assert any("the embedding holds 92% of the parameters; only the hidden width can remove much of it" in s
               for s in logs), logs
    assert rep["uniform"] and rep["hidden_size"]["after"] == (56 if ratio == 0.4 else 64)
    assert abs(rep["removed_fraction"] - ratio) < 0.05 and rep["params_after"] <= rep["params_target"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == rep["params_after"]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_a_budget_no_uniform_cut_meets_names_the_limit_and_a_fix_that_works(embedding_heavy, tmp_path):
    import re

    from edgekit.errors import EdgekitError
    from edgekit.prune import Budget, PruneConfig, prune_model

    with pytest.raises(EdgekitError) as e:
        prune_model(embedding_heavy, tmp_path / "o", PruneConfig(Budget(ratio=0.95), num_samples=4, seq_len=64),
                    log=lambda s: None)
    line = e.value.line()
    assert "\n" not in line and "left with nothing" in line, line
    limit = float(re.search(r"a uniform cut removes at most (0\.\d+) of the parameters", line).group(1))
    assert f"--ratio {limit:g} or less" in e.value.fix and "smaller --align" in e.value.fix
    assert set(re.findall(r"--[a-z][a-z-]*", line)) <= _prune_flags(), line
    rep = prune_model(embedding_heavy, tmp_path / "o", PruneConfig(Budget(ratio=limit), num_samples=4, seq_len=64),
                      log=lambda s: None)  # the fix works: the most a uniform cut can remove
    assert rep["uniform"] and rep["hidden_size"]["after"] == 8 and abs(rep["removed_fraction"] - limit) < 0.05


def test_uniform_search_covers_every_aligned_hidden_width_with_few_evaluations():
    """search_uniform on parameter arithmetic alone (evaluate is a stand-in loss): the embedding-heavy geometry finds
    widths for every ratio the hidden width can reach, a normal geometry keeps the evaluation count small, and a
    --hidden-keep that cannot meet the ratio says which ratios it can."""
    import types

    import torch

    from edgekit.errors import EdgekitError
    from edgekit.prune import allocate
    from edgekit.arch import Geometry, LayerWidths

    def geo(V, D, hd, L, I, H, K, tied=False):
        return Geometry(V, D, hd, tied, False, False, False, (LayerWidths(I, H, K),) * L)

    def search(g, ratio, hidden_keep=None, at_most=False):
        w, L = g.layers[0], len(g.layers)
        torch.manual_seed(0)
        s = types.SimpleNamespace(hidden=torch.rand(g.hidden_size), heads=[torch.rand(w.num_attention_heads)] * L,
                                  kv=[torch.rand(w.num_key_value_heads)] * L, mlp=[torch.rand(w.intermediate_size)] * L)
        calls = []

        def evaluate(plan):  # hidden channels cost the most, then MLP neurons, then heads
            lp = plan.layers[0]
            calls.append(len(plan.hidden))
            return (2 * (1 - len(plan.hidden) / g.hidden_size) ** 2 + (1 - len(lp.mlp) / w.intermediate_size) ** 2
                    + 0.5 * (1 - len(lp.heads) / w.num_attention_heads) ** 2)

        total = g.params()
        keep = total - round(ratio * total)
        plan, tried = allocate.search_uniform(s, g, keep, 8, hidden_keep, evaluate, log=lambda m: None,
                                              at_most=at_most)
        after = plan.geometry(g).params()
        return 1 - after / total, len(plan.hidden), len(calls), after <= keep

    heavy = geo(8192, 96, 24, 3, 64, 4, 2)
    assert allocate.hidden_options(96, 8, None) == list(range(96, 0, -8))
    for ratio, hidden in ((0.3, 64), (0.33, 64), (0.4, 56), (0.5, 48), (0.7, 24)):
        for at_most in (False, True):
            removed, d, n, within = search(heavy, ratio, at_most=at_most)
            assert d == hidden and within and 0 <= removed - ratio < 0.06 and n <= 2, (ratio, removed, d, n)
    removed, d, n, _ = search(heavy, 0.35)  # hidden 64 plus narrower layers lands on it
    assert d == 64 and abs(removed - 0.35) < 0.005
    smol = geo(49152, 576, 64, 30, 1536, 9, 3, tied=True)  # SmolLM2-135M
    for ratio in (0.1, 0.25, 0.5, 0.7):
        removed, d, n, _ = search(smol, ratio)
        assert abs(removed - ratio) < 0.01 and d % 8 == 0 and n <= 25, (ratio, removed, d, n)
    with pytest.raises(EdgekitError, match=r"with --hidden-keep 0.66: at hidden width 64 of 96 a uniform cut removes "
                                           r"between 0.334 and 0.373 .* asks for 0.300") as e:
        search(heavy, 0.3, hidden_keep=0.66)
    assert "--ratio between 0.334 and 0.373, or drop --hidden-keep" in e.value.fix
    assert search(heavy, 0.334, hidden_keep=0.66)[1] == search(heavy, 0.373, hidden_keep=0.66)[1] == 64  # it works


def test_norm_scales_all_widths_in_one_pass_match_the_per_set_formula(tmp_path):
    """Nested kept sets (top-d by one score, as the search passes them) are computed together from one cumulative sum
    of x^2; they must match the per-set mean of rms(x_kept) / rms(x), as must a non-nested pair (computed per set),
    and 30 widths must cost about what one does."""
    import time

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from edgekit.arch import get_family
    from edgekit.models import load_torch_model
    from edgekit.prune.allocate import _top
    from edgekit.prune.apply import norm_scales
    from edgekit.testing import make_tiny_model

    model, _ = load_torch_model(make_tiny_model("llama", tmp_path / "m", seed=11, tokenizer=False))
    ad = get_family("llama")
    H = model.config.hidden_size
    torch.manual_seed(0)
    seqs = list(torch.randint(0, model.config.vocab_size, (12, 32)))

    def reference(sets):
        norms = ad.norms(model)
        sums = {k: [0.0] * len(norms) for k in sets}
        n = [0]

        def hook(j):
            def f(mod, inputs):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                full = x.pow(2).mean(1).sqrt().clamp_min(1e-12)
                for k, v in sets.items():
                    sums[k][j] += (x[:, torch.tensor(v)].pow(2).mean(1).sqrt() / full).sum().item()
                n[0] += x.shape[0] if j == 0 else 0
            return f

        hooks = [nm.register_forward_pre_hook(hook(j)) for j, nm in enumerate(norms)]
        with torch.inference_mode():
            for i in range(0, len(seqs), 4):
                model(input_ids=torch.stack(seqs[i:i + 4]), use_cache=False)
        for h in hooks:
            h.remove()
        return {k: [s / n[0] for s in v] for k, v in sums.items()}

    def close(got, want):
        assert list(got) == list(want)
        for k in want:
            assert len(got[k]) == len(ad.norms(model)) == 2 * model.config.num_hidden_layers + 1
            for a, b in zip(got[k], want[k]):
                assert abs(a - b) <= 1e-9 * abs(b), (k, a, b)

    scores = torch.rand(H)
    nested = {d: _top(scores, d) for d in (H, 56, 40, 33, 24, 8, 1)}  # includes the full width and a single channel
    close(norm_scales(model, ad, seqs, nested), reference(nested))
    assert all(abs(s - 1) < 1e-12 for s in norm_scales(model, ad, seqs, nested)[H])
    crossing = {16: list(range(16)), 24: list(range(8, 32))}  # not nested: falls back to one set at a time
    close(norm_scales(model, ad, seqs, crossing), reference(crossing))

    one, many = {32: _top(scores, 32)}, {d: _top(scores, d) for d in range(2, 62, 2)}

    class Ops(TorchDispatchMode):  # counts the torch ops run: deterministic, unlike a clock on a shared machine
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def ops(sets):
        with Ops() as c:
            norm_scales(model, ad, seqs, sets)
        return c.n

    assert ops(many) <= ops(one) * 1.05, (ops(one), ops(many))  # the per-set loop ran ~6x the ops here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no spinning thread pool competing with the other processes on the machine
    try:
        times = {1: [], 30: []}
        for _ in range(5):  # interleaved, best of 5: a busy spell slows both sides alike
            for n, sets in ((1, one), (30, many)):
                t = time.perf_counter()
                norm_scales(model, ad, seqs, sets)
                times[n].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    assert min(times[30]) < 3 * min(times[1]), times
