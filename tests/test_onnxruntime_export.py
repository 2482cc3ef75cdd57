"""The ONNX Runtime path for real: export with a KV cache, gate against PyTorch, reload torch-free."""

import json

import numpy as np
import pytest

from edgekit.export import ExportConfig, export_model
from edgekit.runtime import open_artifact
from edgekit.runtime.base import greedy, sequence_logits

ARCHS = ("llama", "qwen2")  # fp32 of every family: tests/test_families.py


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    return {(a, p): export_model(tiny_models[a], root / f"{a}-{p}", ExportConfig(precision=p)) and root / f"{a}-{p}"
            for a in ARCHS for p in ("fp32", "int8")}


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_gate_passes_with_identical_greedy(artifacts, tiny_models, arch):
    meta = json.loads((artifacts[(arch, "fp32")] / "artifact.json").read_text())
    g = meta["gate"]
    assert g["passed"] and g["greedy_match"] and g["top1_agreement"] == 1.0
    assert g["max_abs_logit_delta"] < 1e-4
    cfg = json.loads((tiny_models[arch] / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA exercised
    assert meta["model"]["num_kv_heads"] == 2 and meta["model"]["arch"] == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_gate_and_size(artifacts, arch):
    meta = json.loads((artifacts[(arch, "int8")] / "artifact.json").read_text())
    assert meta["gate"]["passed"] and meta["gate"]["top1_agreement"] >= 0.85
    f32 = (artifacts[(arch, "fp32")] / "model.onnx").stat().st_size
    i8 = (artifacts[(arch, "int8")] / "model.onnx").stat().st_size
    assert i8 < 0.6 * f32  # the fp32 embedding table (a Gather) stays; every projection is int8
    import onnx

    ops = [n.op_type for n in onnx.load(str(artifacts[(arch, "int8")] / "model.onnx")).graph.node]
    assert meta["graph"] == "lean" and "MatMul" not in ops  # every projection is quantized
    assert ops.count("MatMulNBits") == 2 * 5 + 1  # fused qkv, o, gate, up, down per layer, and the LM head


def test_kv_cache_decode_equals_full_prefill(artifacts):
    """Token-by-token decoding through the cache gives the same logits as one prefill of the whole sequence."""
    r = open_artifact(artifacts[("llama", "fp32")])
    ids = np.arange(1, 25, dtype=np.int64)
    full = sequence_logits(r, ids)
    stepped = sequence_logits(r, ids, chunk=1)
    chunked = sequence_logits(r, ids, chunk=7)
    assert full.shape == (24, 512)
    np.testing.assert_allclose(stepped, full, atol=1e-4)
    np.testing.assert_allclose(chunked, full, atol=1e-4)
    assert len(greedy(r, ids[:5], 10)) == 10


def test_gate_fails_on_a_wrong_artifact(artifacts, tiny_models, tmp_path):
    """The gate can fail: the Qwen2 reference against the Llama artifact."""
    from edgekit.models import load_torch_model
    from edgekit.verify import THRESHOLDS, compare, make_reference

    model, tok = load_torch_model(tiny_models["qwen2"])
    res = compare(make_reference(model, tok), open_artifact(artifacts[("llama", "fp32")]), THRESHOLDS["fp32"])
    assert not res["passed"] and any("top-1" in f for f in res["failures"])


def test_corrupt_artifact_detected(artifacts, tmp_path, cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifacts[("llama", "fp32")], bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    p = cli("verify", bad)
    assert p.returncode == 2
    assert "does not match its sha256" in p.stderr and p.stderr.count("\n") == 1
    ok = cli("verify", artifacts[("llama", "fp32")], "--json", check=0)
    assert json.loads(ok.stdout)["passed"] is True


def test_export_cli_rejects_unknown_precision(cli, tiny_models, tmp_path):
    p = cli("export", tiny_models["llama"], "--backend", "onnxruntime", "--precision", "q4_k_m", "-o", tmp_path / "x")
    assert p.returncode == 2 and "cannot produce precision 'q4_k_m'" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.smollm2
def test_smollm2_fp32_export_gate(smollm2, tmp_path):
    meta = export_model(smollm2, tmp_path / "smol", ExportConfig(precision="fp32"))
    g = meta["gate"]
    assert g["passed"] and g["greedy_match"] and g["top1_agreement"] == 1.0 and g["max_abs_logit_delta"] < 1e-3
    assert meta["model"]["num_layers"] == 30 and meta["model"]["num_kv_heads"] == 3


def _synthetic_model():
    """y = (x @ w + b) * c, with an If whose branch holds its own initializer: tensors as raw_data (numpy), as typed
    fields, in a Constant node and in a subgraph. Returns the model and its tensors' bytes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32), "w")  # raw_data, 65536 bytes
    b = helper.make_tensor("b", TensorProto.FLOAT, [64], rng.standard_normal(64).tolist())  # float_data, 256
    shift = helper.make_tensor("shift", TensorProto.INT64, [2], [-1, 1])  # int64_data, <= 10 bytes each
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full(64, 0.5, np.float16)))  # 128
    branch = helper.make_graph([helper.make_node("Identity", ["k"], ["o"])], "branch", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [64])],
                               [numpy_helper.from_array(np.ones(64, np.float32), "k")])  # 256 in each branch
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["xwb"]), c,
             helper.make_node("Cast", ["c"], ["c32"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xwb", "c32"], ["y0"]),
             helper.make_node("ReduceSum", ["shift"], ["s"], keepdims=0),
             helper.make_node("Equal", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["one"], then_branch=branch, else_branch=branch),
             helper.make_node("Mul", ["y0", "one"], ["y"])]
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")  # 8
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [w, b, shift, zero])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return m, 65536 + 256 + 2 * 10 + 128 + 2 * 256 + 8


def test_size_helper_never_serializes_and_decides_on_both_sides(monkeypatch, tmp_path):
    """The >2 GB decision comes from the tensors' sizes alone: past 2 GB, ByteSize() and SerializeToString() raise
    (protobuf's EncodeError), so the helper must not touch them; one byte either side of the limit flips it."""
    import onnx
    import onnxruntime as ort

    from edgekit.exporters import onnxruntime as ox

    m, want = _synthetic_model()
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    expect = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    calls = []
    for cls in (onnx.ModelProto, onnx.GraphProto, onnx.NodeProto, onnx.TensorProto, onnx.AttributeProto):
        for meth in ("ByteSize", "SerializeToString", "SerializePartialToString"):
            monkeypatch.setattr(cls, meth, lambda self, _n=f"{cls.__name__}.{meth}": calls.append(_n) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the trap is live
        m.graph.initializer[0].ByteSize()
    calls.clear()
    assert ox.tensor_bytes(m) == want
    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", ox.MARGIN + want)
    assert not ox.needs_external_data(m)  # exactly at the limit: one file
    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", ox.MARGIN + want - 1)
    assert ox.needs_external_data(m)
    assert calls == []
    monkeypatch.undo()  # onnx.save serializes: the protobuf methods are back

    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", ox.MARGIN + want)
    one = tmp_path / "one"
    one.mkdir()
    assert ox.save_onnx(m, one / "model.onnx") == ["model.onnx"] and [p.name for p in one.iterdir()] == ["model.onnx"]
    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", ox.MARGIN + want - 1)
    two = tmp_path / "two"
    two.mkdir()
    assert ox.save_onnx(m, two / "model.onnx") == ["model.onnx", ox.EXTERNAL_DATA]
    graph = onnx.load(str(two / "model.onnx"), load_external_data=False)
    external = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {"w"}  # onnx keeps tensors under 1 KB inline
    assert (two / ox.EXTERNAL_DATA).stat().st_size == 65536
    for folder in (one, two):  # onnxruntime reads the data file beside the graph
        got = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(got[0], expect)


@pytest.mark.slow
def test_real_graph_over_2gb_saves_as_external_data_and_runs(tmp_path):
    """A real 2.25 GiB graph (nine 256 MiB initializers): protobuf can't size it, the helper still decides (in well
    under a second), and the saved pair runs in onnxruntime. About 30 s and 3 GB of memory at peak."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgekit.exporters import onnxruntime as ox

    n, count = 64 << 20, 9  # float32: 256 MiB each
    nodes, acc = [], "x"
    for i in range(count):
        nodes += [helper.make_node("ReduceMax", [f"w{i}"], [f"m{i}"], keepdims=0),
                  helper.make_node("Add", [acc, f"m{i}"], [f"a{i}"])]
        acc = f"a{i}"
    nodes.append(helper.make_node("Identity", [acc], ["y"]))
    m = helper.make_model(helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
                          opset_imports=[helper.make_opsetid("", 17)])
    for i in range(count):  # written in place: make_graph and numpy_helper.from_array would copy each tensor twice
        t = m.graph.initializer.add()
        t.name, t.data_type, t.raw_data = f"w{i}", TensorProto.FLOAT, np.full(n, i + 1, np.float32).tobytes()
        t.dims.append(n)
    # m.ByteSize() here raises protobuf's EncodeError (the user's traceback), after ~8 s and 3.3 GB more memory.
    assert ox.tensor_bytes(m) == count * n * 4 > ox.PROTOBUF_LIMIT and ox.needs_external_data(m)
    assert ox.save_onnx(m, tmp_path / "model.onnx") == ["model.onnx", ox.EXTERNAL_DATA]
    del m
    assert (tmp_path / ox.EXTERNAL_DATA).stat().st_size == count * n * 4
    assert (tmp_path / "model.onnx").stat().st_size < 1 << 20
    x = np.array([0.5, -1.0], np.float32)
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], x + sum(range(1, count + 1)))


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_export_past_the_protobuf_limit_writes_external_data(tiny_models, tmp_path, monkeypatch, precision):
    """With the limit pretended tiny, the weights go to model.onnx.data beside model.onnx: hashed in artifact.json,
    read by onnxruntime (the gate passes), and the artifact reloads torch-free with its hashes checked."""
    import onnx

    from edgekit.exporters import onnxruntime as ox

    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", ox.MARGIN + 1024)
    out = tmp_path / "art"
    meta = export_model(tiny_models["qwen2"], out, ExportConfig(precision=precision), log=lambda m: None)
    g = meta["gate"]
    assert g["passed"] and g["top1_agreement"] >= (1.0 if precision == "fp32" else 0.85), g
    assert meta["external_data"] == "model.onnx.data"
    from edgekit.export import COMPANIONS

    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(meta["files"]) <= {
        "model.onnx", "model.onnx.data", *COMPANIONS}
    assert json.loads((out / "artifact.json").read_text())["files"] == meta["files"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    places = {e.value for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
              for e in t.external_data if e.key == "location"}
    assert places == {"model.onnx.data"}
    assert not [t.name for t in graph.graph.initializer if len(t.raw_data) >= 1024]  # onnx keeps < 1 KB inline
    assert (out / "model.onnx.data").stat().st_mode == (out / "model.onnx").stat().st_mode
    r = open_artifact(out)  # verify_files, then onnxruntime from the folder
    assert len(greedy(r, np.arange(1, 6, dtype=np.int64), 4)) == 4


def test_optimum_opens_the_artifact_and_generates(artifacts, tiny_models):
    """Peer tools open the artifact folder as they open a Hugging Face export: optimum's ORTModelForCausalLM loads it
    (config.json and generation_config.json travel with it) and greedy generate() matches PyTorch."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art = artifacts[("llama", "fp32")]
    tok = AutoTokenizer.from_pretrained(art)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    ort = ORTModelForCausalLM.from_pretrained(art)
    got = ort.generate(ids, max_new_tokens=8, do_sample=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).generate(
        ids, max_new_tokens=8, do_sample=False)
    assert got.tolist() == ref.tolist()


def test_lean_graph_runs_about_ten_kernels_per_layer(artifacts):
    """The default graph is onnxruntime-genai's: GroupQueryAttention and fused norms, no shape or mask subgraphs
    (optimum's graph runs ~105 kernels per layer, which is why pruned models did not speed up with their weights)."""
    import collections

    import onnx

    meta = json.loads((artifacts[("llama", "fp32")] / "artifact.json").read_text())
    assert meta["graph"] == "lean" and "graph_fallback" not in meta
    nodes = onnx.load(str(artifacts[("llama", "fp32")] / "model.onnx"), load_external_data=False).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    layers = meta["model"]["num_layers"]
    assert ops["GroupQueryAttention"] == layers and ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert (len(nodes) - 12) / layers <= 15  # ~12 nodes of embedding, mask-to-lengths and head


def test_graph_choice_and_refusals():
    from edgekit.errors import EdgekitError
    from edgekit.exporters.onnxruntime import choose_graph

    base = dict(model_type="phi3", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    assert choose_graph({**base, "partial_rotary_factor": 1.0}) == ("lean", None)
    graph, why = choose_graph({**base, "partial_rotary_factor": 0.75})
    assert graph == "optimum" and "partial rotary (48 of 64" in why
    with pytest.raises(EdgekitError, match="partial rotary"):
        choose_graph({**base, "partial_rotary_factor": 0.75}, "lean")
    graph, why = choose_graph(dict(model_type="llama", hidden_size=48, num_attention_heads=4))  # head_dim 12
    assert graph == "optimum" and "multiple of 8 (this model's: 6)" in why
    assert choose_graph({**base, "partial_rotary_factor": 1.0}, "optimum") == ("optimum", "asked for")
    with pytest.raises(EdgekitError, match="unknown ONNX graph"):
        choose_graph(base, "fast")


@pytest.mark.slow  # ~5-8 s: a tiny model each; the default run gates every family through the lean graph already
@pytest.mark.parametrize("arch,overrides", [("mistral", dict(sliding_window=16)),
                                            ("phi3", dict(partial_rotary_factor=1.0))])
def test_lean_graph_gates_window_and_full_rotary_phi3(tmp_path, arch, overrides):
    """Mistral with a window shorter than the gate's 64 tokens (every layer windowed, as transformers 4.57 does) and
    a fully rotary Phi-3 (Phi-3-mini) go through the lean graph and pass the fp32 gate."""
    import onnx

    from edgekit.testing import make_tiny_model

    src = make_tiny_model(arch, tmp_path / "src", quirks=True, **overrides)
    meta = export_model(src, tmp_path / "art", ExportConfig(precision="fp32"), log=lambda m: None)
    assert meta["graph"] == "lean" and meta["gate"]["passed"] and meta["gate"]["greedy_match"], meta["gate"]
    windows = {a.i for n in onnx.load(str(tmp_path / "art" / "model.onnx")).graph.node
               if n.op_type == "GroupQueryAttention" for a in n.attribute if a.name == "local_window_size"}
    assert windows == ({16} if arch == "mistral" else {-1})


@pytest.mark.slow  # tests/test_families.py's Phi-4-mini (partial rotary) runs the fallback in the default run
def test_optimum_graph_still_exports_and_gates(tiny_models, tmp_path):
    """optimum's graph stays the fallback (and TensorRT's source): forced, it exports, gates and runs."""
    meta = export_model(tiny_models["qwen2"], tmp_path / "art", ExportConfig(precision="fp32", onnx_graph="optimum"),
                        log=lambda m: None)
    assert meta["graph"] == "optimum" and meta["graph_fallback"] == "asked for"
    assert meta["gate"]["passed"] and meta["gate"]["greedy_match"]


def _nbits_graph(specs, K=64, N=48, G=32, seed=0):
    """A graph of MatMulNBits nodes sharing input A: specs = [(name, bits, zero points or None)]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for name, bits, zp in specs:
        inits += [numpy_helper.from_array(rng.integers(0, 255, (N, K // G, G * bits // 8), dtype=np.uint8), f"B{name}"),
                  numpy_helper.from_array((rng.random(N * K // G) * 0.01).astype(np.float32), f"S{name}")]
        ins = ["A", f"B{name}", f"S{name}"]
        if zp is not None:
            inits.append(numpy_helper.from_array(zp, f"Z{name}"))
            ins.append(f"Z{name}")
        nodes.append(helper.make_node("MatMulNBits", ins, [name], domain="com.microsoft", K=K, N=N, bits=bits,
                                      block_size=G, name=name))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, N]) for n, _, _ in specs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString()).run(None, {"A": x})


def test_matmulnbits_get_int8_compute_per_width():
    """ONNX Runtime's default accuracy_level runs 8-bit MatMulNBits on a slow generic path (SmolLM2's head: 265 ms
    per decode step against 3.3 ms): the exporter sets level 4 on the width it is asked for only, and the result
    stays close."""
    from edgekit.exporters.onnxruntime import INT8_COMPUTE, int8_compute

    model = _nbits_graph([("q8", 8, None), ("q4", 4, None)])
    x = np.random.default_rng(1).random((1, 64)).astype(np.float32)
    before = _run(model, x)
    assert int8_compute(model) == 1
    levels = {n.name: {a.name: a.i for a in n.attribute}.get("accuracy_level") for n in model.graph.node}
    assert levels == {"q8": INT8_COMPUTE, "q4": None}
    after = _run(model, x)
    assert np.abs(after[0] - before[0]).max() < 0.02 * np.abs(before[0]).max() and np.array_equal(after[1], before[1])
    assert int8_compute(model, bits=4) == 1
    assert np.abs(_run(model, x)[1] - before[1]).max() < 0.02 * np.abs(before[1]).max()


@pytest.mark.parametrize("K", [64, 96])  # an even and an odd number of blocks per row (the last byte half empty)
def test_integer_zero_points_pack_to_uint8_and_compute_the_same(K):
    """MatMulNBits runs float zero points 20-50x slower than uint8 ones: pack_zero_points stores HQQ's (integer)
    zero points as packed uint8, and ONNX Runtime computes exactly what it did with the float ones."""
    from onnx import numpy_helper

    from edgekit.exporters.onnxruntime import pack_zero_points

    N, G = 48, 32
    zp = np.random.default_rng(2).integers(0, 16, N * (K // G)).astype(np.float32)
    model = _nbits_graph([("q4", 4, zp)], K=K)
    x = np.random.default_rng(3).standard_normal((1, K)).astype(np.float32)
    before = _run(model, x)[0]
    assert pack_zero_points(model) == 1 and pack_zero_points(model) == 0  # once; uint8 ones are left alone
    packed = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "Zq4"))
    assert packed.dtype == np.uint8 and packed.size == N * -(-(K // G) // 2)
    np.testing.assert_allclose(_run(model, x)[0], before, rtol=1e-5, atol=1e-6)
    kept = _nbits_graph([("q4", 4, zp + 0.5)], K=K)  # a matrix that kept HQQ's float zero points stays as it is
    assert pack_zero_points(kept) == 0
    assert numpy_helper.to_array(next(t for t in kept.graph.initializer if t.name == "Zq4")).dtype == np.float32
