"""The planner against hand-computed numbers and its choices on real targets."""

import json

import pytest

from edgekit.errors import EdgekitError
from edgekit.plan import MAX_PRUNE_RATIO, PlanRequest, count_params, make_plan, memory
from edgekit.target import get_target

SMOL = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "tie_word_embeddings": True, "max_position_embeddings": 8192}

BOARD = """
name = "tiny-board"
description = "a board with little RAM"
[memory]
ram_gb = 0.45
os_reserve_gb = 0.2
bandwidth_gbps = 4
[cpu]
arch = "aarch64"
cores = 2
[build]
backend = "gguf"
precisions = ["f16", "q8_0", "q4_k_m"]
precision = "f16"
[docker]
platform = "linux/arm64"
base_image = "debian:bookworm-slim"
"""


def test_param_count_is_exact(tiny_models):
    from transformers import AutoModelForCausalLM

    for path in tiny_models.values():
        cfg = json.loads((path / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(path)
        assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert count_params(SMOL) == 134_515_008  # SmolLM2-135M, hand-checked against the checkpoint


def test_memory_by_hand():
    req = PlanRequest(context=1000, prefill_chunk=10)
    m = memory(SMOL, "gguf", "q8_0", req)
    assert m["kv_cache_bytes"] == 30 * 3 * 64 * 1000 * 2 * 2  # layers x kv heads x head_dim x ctx x (K,V) x f16
    norms = (2 * 30 + 1) * 576  # llama.cpp keeps vectors in f32; every matrix (tied head included) is Q8_0
    assert m["weights_bytes"] == (134_515_008 - norms) * 34 // 32 + norms * 4
    # llama.cpp: one chunk's attention scores + MLP/residual activations, and one row of logits
    assert m["activations_bytes"] == 4 * 10 * (9 * 1000 + 3 * 1536 + 4 * 576) + 4 * 49152
    assert m["total_bytes"] == sum(m[k] for k in ("weights_bytes", "kv_cache_bytes", "activations_bytes",
                                                   "runtime_overhead_bytes"))
    ort = memory(SMOL, "onnxruntime", "fp32", req)
    assert ort["kv_cache_bytes"] == 2 * 2 * m["kv_cache_bytes"]  # fp32 cache, past and present both alive
    emb = 49152 * 576
    assert ort["weights_bytes"] == 134_515_008 * 4 + emb * 4  # + the transposed copy of the tied LM head
    assert ort["activations_bytes"] == 4 * 10 * (49152 + 3 * 9 * 1000 + 3 * 1536 + 4 * 576) + 4 * 49152
    ort8 = memory(SMOL, "onnxruntime", "int8", req)
    assert ort8["weights_bytes"] == int((134_515_008 - emb) * (1 + 4 / 32) + emb * 8)  # embedding stays fp32
    half = memory(SMOL, "gguf", "q8_0", req, prune_ratio=0.5)
    assert half["weights_bytes"] == int(m["weights_bytes"] * 0.5)
    et = memory(SMOL, "executorch", "fp32", req)
    # the .pte holds the tied table twice (embedding and head), and XNNPACK briefly holds the head twice at load
    assert et["weights_bytes"] == 134_515_008 * 4 + emb * 4 + emb * 4
    assert et["activations_bytes"] == 4 * 10 * (49152 + 6 * 9 * 1000 + 3 * 1536 + 4 * 576) + 4 * 49152


def test_quantization_alone_when_it_fits():
    p = make_plan(SMOL, get_target("x86-cpu"), PlanRequest(context=2048))
    assert (p.precision, p.prune_ratio) == ("q8_0", 0.0) and "fits without pruning" in p.reason
    jet = make_plan(SMOL, get_target("jetson-orin"), PlanRequest(context=2048))
    assert jet.precision == "fp16" and jet.prune_ratio == 0.0  # the target's preferred precision, not fp32


def test_pruning_when_quantization_cannot_fit(tmp_path):
    (tmp_path / "b.toml").write_text(BOARD)
    t = get_target(str(tmp_path / "b.toml"))
    p = make_plan(SMOL, t, PlanRequest(context=2048))
    assert p.precision == "q4_k_m" and 0 < p.prune_ratio <= MAX_PRUNE_RATIO
    assert [c["fits_memory"] for c in p.candidates[:3]] == [False, False, False]
    assert p.chosen["total_bytes"] <= p.budget_bytes
    # The least pruning that fits: one point less does not.
    less = memory(SMOL, "gguf", "q4_k_m", PlanRequest(context=2048), p.prune_ratio - 0.01)
    assert less["total_bytes"] > p.budget_bytes


def test_decode_goal_moves_the_choice():
    x86 = get_target("x86-cpu")
    base = make_plan(SMOL, x86, PlanRequest(context=2048), backend="onnxruntime")
    fast = make_plan(SMOL, x86, PlanRequest(context=2048, min_decode_tps=50), backend="onnxruntime")
    assert base.precision == "fp32" and fast.precision == "int8"
    assert fast.chosen["decode_tps_estimate"] >= 50 > base.chosen["decode_tps_estimate"]
    rpi = get_target("raspberry-pi-5")
    assert make_plan(SMOL, rpi, PlanRequest(context=2048)).prune_ratio == 0
    assert make_plan(SMOL, rpi, PlanRequest(context=2048, min_decode_tps=100)).prune_ratio > 0


def test_impossible_goals_say_what_would_work(tmp_path):
    with pytest.raises(EdgekitError, match=r"cannot decode 500 tokens/s .* would be reachable"):
        make_plan(SMOL, get_target("raspberry-pi-5"), PlanRequest(context=2048, min_decode_tps=500))
    (tmp_path / "b.toml").write_text(BOARD.replace("ram_gb = 0.45", "ram_gb = 0.35"))
    with pytest.raises(EdgekitError, match=r"cannot hold this model .* a context of \d+ tokens would fit"):
        make_plan(SMOL, get_target(str(tmp_path / "b.toml")), PlanRequest(context=8192))
    with pytest.raises(EdgekitError, match="exceeds the model's 8192 positions"):
        make_plan(SMOL, get_target("x86-cpu"), PlanRequest(context=10000))


def test_plan_cli_and_build_use_it(cli, tiny_models, tmp_path):
    (tmp_path / "b.toml").write_text(BOARD.replace("ram_gb = 0.45", "ram_gb = 0.24").replace(
        "os_reserve_gb = 0.2", "os_reserve_gb = 0.05"))
    p = json.loads(cli("plan", "--target", "x86-cpu", tiny_models["llama"], "--json", check=0).stdout)
    assert p["precision"] == "q8_0" and p["params"] > 0
    text = cli("plan", "--target", "jetson-orin", check=0).stdout
    assert "choice: fp16: fp16 fits without pruning" in text
    (tmp_path / "small.toml").write_text(BOARD)
    dry = json.loads(cli("build", "--target", tmp_path / "small.toml", "--dry-run", "--json", "-o", tmp_path / "o",
                         check=0).stdout)
    assert dry["stages"][0]["action"].startswith("tiny-board: gguf q4_k_m + prune")
    assert dry["stages"][1]["action"].startswith("remove ") and not (tmp_path / "o").exists()
    bad = cli("plan", "--target", "raspberry-pi-5", "--min-decode-tps", "500")
    assert bad.returncode == 2 and "cannot decode 500 tokens/s" in bad.stderr


@pytest.mark.parametrize("args,flag", [(["--min-decode-tps", "nan"], "--min-decode-tps"),
                                       (["--context", "0"], "--context"), (["--headroom", "inf"], "--headroom")])
def test_plan_refuses_nan_and_out_of_range_numbers(cli, args, flag):
    p = cli("plan", "-t", "x86-cpu", *args, check=2)
    assert p.stderr.startswith(f"edgekit: error: {flag} ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("args,flag", [(["--seconds", "nan"], "--seconds"), (["--threads", "-1"], "--threads"),
                                       (["--prompt-tokens", "0"], "--prompt-tokens")])
def test_bench_refuses_nan_and_out_of_range_numbers(cli, tmp_path, args, flag):
    p = cli("bench", tmp_path, *args, check=2)
    assert p.stderr.startswith(f"edgekit: error: {flag} ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("argv", [
    ["build", "--target", "x86-cpu", "--bench-seconds", "nan"], ["build", "--target", "x86-cpu", "--min-decode-tps", "inf"],
    ["build", "--target", "x86-cpu", "--prune-ratio", "nan"], ["prune", "m", "--ratio", "nan", "-o", "o"],
    ["prune", "m", "--ratio", "0.3", "--hidden-keep", "nan", "-o", "o"],
    ["prune", "m", "--ratio", "0.3", "--bytes-per-param", "inf", "-o", "o"],
    ["distill", "--teacher", "t", "--student", "s", "--steps", "2", "--lr", "nan", "-o", "o"],
    ["distill", "--teacher", "t", "--student", "s", "--steps", "2", "--grad-clip=-inf", "-o", "o"]])
def test_every_command_refuses_nan_in_one_line(cli, argv):
    """Checked before any model is read (the model paths here do not exist)."""
    p = cli(*argv, check=2)
    flag = next(a for a, v in zip(argv, argv[1:]) if v in ("nan", "inf")) if "--grad-clip=-inf" not in argv \
        else "--grad-clip"
    assert p.stderr.startswith(f"edgekit: error: {flag} ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
