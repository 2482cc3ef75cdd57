"""The family meta-test: every registered model family, as a tiny random model with its real config quirks and a
tokenizer of its real kind, goes through every stage. A family added to edgekit/arch without working through any
stage fails here (the parametrization is the registry itself, not a list kept in sync by hand)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.arch import FAMILIES, get_family
from edgekit.testing import FAMILY_QUIRKS, make_tiny_model

FAMS = sorted(FAMILIES)
CONTEXT = 128


def quiet(*a, **k):
    pass


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_model(f, root / f, seed=i, quirks=True) for i, f in enumerate(FAMS)}


@pytest.fixture(scope="session")
def family_pruned(family_models, tmp_path_factory):
    """{family: (uniform folder, non-uniform folder)}, each pruned once per session (both reused below)."""
    from edgekit.prune import PruneConfig, prune_model
    from edgekit.prune.config import Budget

    root = tmp_path_factory.mktemp("families-pruned")
    out = {}
    for f, src in family_models.items():
        common = dict(budget=Budget(ratio=0.3), num_samples=4, search_samples=2, seq_len=64, align=32)
        u = root / f"{f}-u"
        prune_model(src, u, PruneConfig(**common), log=quiet)
        nu = root / f"{f}-nu"  # layer 0 kept dense, so the widths really differ per layer
        prune_model(src, nu, PruneConfig(budget=Budget(ratio=0.2), num_samples=4, search_samples=2, seq_len=64,
                                         align=8, non_uniform=True, protected_layers=(0,)), log=quiet)
        out[f] = (u, nu)
    return out


def test_every_family_has_quirks_and_a_tokenizer_kind():
    for name, fam in FAMILIES.items():
        assert name in FAMILY_QUIRKS, f"{name}: add its real config quirks to edgekit.testing.FAMILY_QUIRKS"
        assert fam.tokenizer in ("bpe-bytelevel", "bpe-nfc", "spm-bpe")


@pytest.mark.parametrize("family", FAMS)
def test_geometry_counts_every_parameter(family_models, family):
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.plan import count_params

    path = family_models[family]
    cfg = json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert cfg["model_type"] == family


@pytest.mark.parametrize("family", FAMS)
def test_prune_uniform_round_trips_through_from_pretrained(family_pruned, family_models, family):
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.plan import count_params

    u, _ = family_pruned[family]
    report = json.loads((u / "edgekit-prune.json").read_text())
    cfg = json.loads((u / "config.json").read_text())
    assert report["uniform"] and "edgekit_layer_widths" not in cfg
    assert 0.2 < report["removed_fraction"] < 0.4, report["removed_fraction"]
    model = AutoModelForCausalLM.from_pretrained(u, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"] == count_params(cfg)
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # the cut model still computes something close to the original on calibration text
    assert report["pruned_search_loss"] < 2 * report["dense_search_loss"] + 1


@pytest.mark.parametrize("family", FAMS)
def test_prune_non_uniform_reloads_in_edgekit(family_pruned, family):
    import torch

    from edgekit.models import load_torch_model
    from edgekit.plan import count_params

    _, nu = family_pruned[family]
    report = json.loads((nu / "edgekit-prune.json").read_text())
    cfg = json.loads((nu / "config.json").read_text())
    model, tok = load_torch_model(nu)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"] == count_params(cfg)
    with torch.no_grad():
        logits = model(torch.tensor([tok("The quick brown fox")["input_ids"]])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == cfg["vocab_size"]


def _export(src, out, backend, precision, **kw):
    from edgekit.export import ExportConfig, export_model

    meta = export_model(src, out, ExportConfig(backend=backend, precision=precision, context_length=CONTEXT, **kw),
                        log=quiet)
    _check_chat_template(src, out)
    return meta


def _check_chat_template(src, art):
    """The tokenizer and its chat template travel into every artifact (and into the GGUF's metadata)."""
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(src).chat_template
    assert AutoTokenizer.from_pretrained(art).chat_template == want
    if (art / "model.gguf").is_file() and want:
        from gguf import GGUFReader

        f = GGUFReader(str(art / "model.gguf")).fields["tokenizer.chat_template"]
        assert bytes(f.parts[f.data[0]]).decode() == want


@pytest.mark.parametrize("family", FAMS)
def test_gguf_f16_and_q8_0_gates_pass(family_pruned, family_models, tmp_path, family):
    """Dense f16 and pruned q8_0 through llama.cpp; tokenizer id-for-id; the chat template embedded."""
    meta = _export(family_models[family], tmp_path / "f16", "gguf", "f16")
    assert meta["gate"]["passed"], meta["gate"]["failures"]
    assert meta["tokenizer"]["identical"], meta["tokenizer"]
    assert meta["gguf_arch"] == get_family(family).gguf_arch
    from edgekit.runtime.bench import gate  # the same file read as a plain .gguf (`edgekit bench model.gguf`)
    from edgekit.runtime.files import describe_file

    d = describe_file(tmp_path / "f16" / "model.gguf")
    assert (d["backend"], d["precision"], d["model"]["architecture"]) == ("gguf", "fp16", meta["gguf_arch"])
    assert d["max_context"] >= meta["max_context"] and d["model"]["vocab_size"] == meta["model"]["vocab_size"]
    assert gate(tmp_path / "f16" / "model.gguf", tmp_path / "f16" / "reference.npz")["passed"]
    u, _ = family_pruned[family]
    cfg = json.loads((u / "config.json").read_text())
    fam = get_family(family)
    if fam.rotary_dim(cfg) != fam.head_dim(cfg) and cfg["num_attention_heads"] * fam.head_dim(cfg) != cfg[
            "hidden_size"]:
        # partial rotary (Phi-4-mini): llama.cpp's phi3 needs heads x head_dim == hidden, its llama rotates whole
        # heads: a head- or hidden-pruned model is refused with that reason, and the MLP-only cut exports
        from edgekit.errors import EdgekitError

        with pytest.raises(EdgekitError, match="rotates whole heads"):
            _export(u, tmp_path / "q8", "gguf", "q8_0")
        u = family_models[family]
    meta = _export(u, tmp_path / "q8", "gguf", "q8_0")
    assert meta["gate"]["passed"], meta["gate"]["failures"]


@pytest.mark.parametrize("family", FAMS)
def test_gguf_q4_k_m_runs_in_llama_cpp(family_models, tmp_path, family):
    """Random tiny weights lose too much at 4 bits to pass the gate; the file must still load, run and say what
    llama.cpp stored."""
    meta = _export(family_models[family], tmp_path / "q4", "gguf", "q4_k_m", accept_gate_failure=True)
    assert meta["gate"]["top1_agreement"] > 0.3, meta["gate"]
    assert meta["tensor_types"], meta


@pytest.mark.parametrize("family", FAMS)
def test_gguf_non_uniform_is_deci_or_padded(family_pruned, tmp_path, family):
    """Per-layer widths: llama.cpp's `deci` where the family fits its Llama layout; otherwise (q/k norms, four
    norms, partial rotary) the family's own architecture with every layer zero-padded to the widest, which the
    gate proves exact."""
    _, nu = family_pruned[family]
    fam = get_family(family)
    cfg = json.loads((nu / "config.json").read_text())
    widths = cfg["edgekit_layer_widths"]
    assert len({json.dumps(w) for w in widths}) > 1
    from edgekit.exporters.gguf import Q_IS_HIDDEN, padded_widths
    from edgekit.arch import LayerWidths

    pad = padded_widths([LayerWidths(**w) for w in widths])
    if fam.rotary_dim(cfg) != fam.head_dim(cfg) and pad.num_attention_heads * fam.head_dim(cfg) != cfg["hidden_size"]:
        assert fam.gguf_arch in Q_IS_HIDDEN  # Phi-4-mini with its hidden width cut: no llama.cpp arch holds it
        from edgekit.errors import EdgekitError

        with pytest.raises(EdgekitError, match="heads x head_dim == hidden"):
            _export(nu, tmp_path / "nu", "gguf", "f16")
        assert not (tmp_path / "nu").exists()
        return
    meta = _export(nu, tmp_path / "nu", "gguf", "f16")
    assert meta["gate"]["passed"], meta["gate"]
    assert meta["layer_widths"] == widths
    if fam.gguf_nonuniform and fam.rotary_dim(cfg) == fam.head_dim(cfg):
        assert meta["gguf_arch"] == "deci" and "padded_to" not in meta
    else:
        assert meta["gguf_arch"] == fam.gguf_arch
        pad = meta["padded_to"]
        assert pad["intermediate_size"] == max(w["intermediate_size"] for w in widths)
        assert pad["num_key_value_heads"] == max(w["num_key_value_heads"] for w in widths)


@pytest.mark.parametrize("family", FAMS)
def test_onnxruntime_fp32_gate_passes(family_pruned, tmp_path, family):
    u, _ = family_pruned[family]
    meta = _export(u, tmp_path / "ort", "onnxruntime", "fp32")
    assert meta["gate"]["passed"] and meta["gate"]["greedy_match"], meta["gate"]
    cfg = json.loads((u / "config.json").read_text())
    fam = get_family(family)
    # the lean GroupQueryAttention graph wherever the family's geometry allows it (Phi-4-mini's partial rotary
    # falls back to optimum's graph, said in artifact.json)
    partial = fam.rotary_dim(cfg) != fam.head_dim(cfg)
    assert meta["graph"] == ("optimum" if partial else "lean"), meta.get("graph_fallback")
    assert ("partial rotary" in meta["graph_fallback"]) if partial else "graph_fallback" not in meta


@pytest.mark.parametrize("family", FAMS)
def test_executorch_fp32_gate_passes(family_pruned, tmp_path, family):
    _, nu = family_pruned[family]  # per-layer widths: ExecuTorch serves every family's non-uniform model
    meta = _export(nu, tmp_path / "et", "executorch", "fp32")
    assert meta["gate"]["passed"], meta["gate"]["failures"]
    # fp32 matches PyTorch far inside the gate's bound. Gemma 3's GELU-tanh is the case this catches: XNNPACK's GELU
    # ignores `approximate` and computes the erf form (8.4e-4 on a tiny Gemma, a greedy flip at token 18 on the real
    # 270M), so the exporter writes the tanh formula out
    assert meta["gate"]["greedy_match"] and meta["gate"]["max_abs_logit_delta"] < 1e-4, meta["gate"]
    assert meta["max_context"] == CONTEXT


@pytest.mark.parametrize("family", FAMS)
def test_tensorrt_onnx_and_engine_command(family_models, tmp_path, family):
    from edgekit.target import get_target

    meta = _export(family_models[family], tmp_path / "trt", "tensorrt", "fp16", target=get_target("jetson-orin"))
    assert meta["gate"]["passed"], meta["gate"]["failures"]
    plan = json.loads((tmp_path / "trt" / "trt.json").read_text())
    cmd = " ".join(plan["build_command"])
    assert "--fp16" in cmd and "--minShapes=" in cmd and "--onnx=model.onnx" in cmd


@pytest.mark.parametrize("family", FAMS)
def test_plan_for_every_target(family_models, family):
    from edgekit.plan import PlanRequest, make_plan
    from edgekit.target import builtin_targets

    cfg = json.loads((family_models[family] / "config.json").read_text())
    for t in builtin_targets().values():
        p = make_plan(cfg, t, PlanRequest(context=min(256, cfg["max_position_embeddings"])))
        assert p.chosen["fits_memory"] and p.params == get_family(family).geometry(cfg).params()


@pytest.mark.parametrize("family", FAMS)
def test_distill_a_few_steps_lowers_the_loss(family_pruned, family_models, tmp_path, family):
    from edgekit.distill import DataConfig, DistillConfig, OptimConfig, distill

    u, _ = family_pruned[family]
    cfg = DistillConfig(steps=8, batch_size=2, micro_batch_size=2, log_every=1, checkpoint_every=0,
                        data=DataConfig(block_size=64, max_eval_blocks=4), optim=OptimConfig(lr=1e-3))
    rep = distill(family_models[family], u, tmp_path / "kd", cfg, progress=False)
    loss = [h[1] for h in rep["history"]]
    assert np.isfinite(loss[-1]) and min(loss[-3:]) < loss[0], loss
    assert rep["heldout_perplexity"]["after"] < rep["heldout_perplexity"]["before"]


def _matmul_nbits_weights(path):
    """{node name: (bits, dequantized W (N, K))} of every MatMulNBits in an ONNX file, decoded from the operator's
    documented layout (codes in blobs per block, low nibble first; a scale and a uint8 zero point per block, the
    middle code when there are none)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in n.attribute}
        bits, N, K, block = a["bits"], a["N"], a["K"], a["block_size"]
        blocks = K // block
        raw = inits[n.input[1]].reshape(N, blocks, -1)
        q = raw if bits == 8 else np.stack([raw & 15, raw >> 4], -1).reshape(N, blocks, block)
        if len(n.input) > 3 and n.input[3]:
            zp = inits[n.input[3]]
            z = zp.reshape(N, blocks) if bits == 8 else np.stack([zp & 15, zp >> 4], -1).reshape(N, -1)[:, :blocks]
        else:  # no zero points: the operator's default, the middle code
            z = np.full((N, blocks), 2 ** (bits - 1))
        s = inits[n.input[2]].reshape(N, blocks)
        w = (q.astype(np.float32) - z[..., None].astype(np.float32)) * s[..., None]
        out[n.name] = (bits, w.reshape(N, K))
    return out


@pytest.mark.parametrize("family", FAMS)
def test_qat_int4_trains_and_onnxruntime_ships_its_grid_exactly(family_pruned, family_models, tmp_path, family):
    """distill --qat int4 on the pruned student, then export: every MatMulNBits row but the head's is, bit for bit,
    a row of the fake-quantized weights training saw (4-bit, and 8-bit for down and q/k/v), fused projections
    included, and the artifact passes its gate against the fake-quantized model."""
    from edgekit import qat
    from edgekit.distill import DataConfig, DistillConfig, OptimConfig, distill
    from edgekit.models import load_torch_model

    u, _ = family_pruned[family]
    cfg = DistillConfig(steps=2, batch_size=2, micro_batch_size=2, checkpoint_every=0, qat="int4",
                        data=DataConfig(block_size=64, max_eval_blocks=2), optim=OptimConfig(lr=1e-3))
    rep = distill(family_models[family], u, tmp_path / "kd", cfg, progress=False, log=quiet)
    assert rep["qat"]["recipe"] == "int4asym-mix" and rep["qat"]["steps"] == 2
    meta = _export(tmp_path / "kd", tmp_path / "ort", "onnxruntime", None)
    assert meta["precision"] == "int4" and meta["gate"]["passed"], meta["gate"]
    assert meta["gate_reference"].startswith("fake-quantized") and "the QAT grid" in meta["quantization"]
    model, _ = load_torch_model(tmp_path / "kd")
    plan = qat.read(tmp_path / "kd")
    rows = {}
    for name, mod in qat.target_linears(model, qat.recipe(plan)):
        w, _ = qat.weight_grid(mod.weight, plan, name)
        rows.update({r.tobytes(): qat.bits(plan, name) for r in w.detach().numpy().astype(np.float32)})
    shipped = _matmul_nbits_weights(tmp_path / "ort" / "model.onnx")
    kinds, n_rows = set(), 0
    for node, (bits, w) in shipped.items():
        if "lm_head" in node:
            continue  # the head keeps the exporter's 8-bit round-to-nearest, untrained (the recipe says so)
        assert all(rows.get(r.tobytes()) == bits for r in w), (node, bits)
        kinds.add(bits)
        n_rows += len(w)
    assert kinds == {4, 8} and n_rows == sum(m.out_features for _, m in qat.target_linears(model, qat.recipe(plan)))


def test_bf16_sharded_checkpoint_prunes_and_exports(tmp_path):
    """The form real checkpoints ship in: bf16 safetensors split into shards with an index, untied head, a
    generation_config. Pruned output is a plain HF folder; GGUF and ONNX Runtime read every shard."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.models import resolve_model
    from edgekit.prune import PruneConfig, prune_model
    from edgekit.prune.config import Budget

    src = make_tiny_model("qwen2", tmp_path / "m", quirks=True, dtype="bfloat16", shard_size="40KB",
                          tie_word_embeddings=False)
    assert len(list(src.glob("*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()
    assert resolve_model(str(src)).arch == "qwen2"
    out = tmp_path / "p"
    report = prune_model(src, out, PruneConfig(budget=Budget(ratio=0.25), num_samples=4, search_samples=2,
                                               seq_len=64, align=32), log=quiet)
    assert (out / "generation_config.json").is_file() and not (out / "model.safetensors.index.json").exists() or \
        len(list(out.glob("*.safetensors"))) >= 1
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    for backend, precision in (("gguf", "f16"), ("onnxruntime", "fp32")):
        meta = _export(src, tmp_path / backend, backend, precision)
        assert meta["gate"]["passed"], (backend, meta["gate"])


def test_partial_rotary_per_layer_widths_pad_into_phi3_when_hidden_is_kept(family_models, tmp_path):
    """Phi-4-mini's partial rotary keeps it off `deci`; with the hidden width kept, per-layer widths pad into
    llama.cpp's own phi3 (heads x head_dim stays == hidden) and the gate proves the padding exact."""
    from edgekit.prune import PruneConfig, prune_model
    from edgekit.prune.config import Budget

    nu = tmp_path / "nu"
    prune_model(family_models["phi3"], nu, PruneConfig(budget=Budget(ratio=0.15), num_samples=4, search_samples=2,
                                                       seq_len=64, align=8, non_uniform=True, hidden_keep=1.0,
                                                       protected_layers=(0,)), log=quiet)
    meta = _export(nu, tmp_path / "g", "gguf", "f16")
    assert meta["gguf_arch"] == "phi3" and meta["padded_to"] and meta["gate"]["passed"], meta["gate"]
