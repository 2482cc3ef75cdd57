"""The planner's GGUF byte count (exporters/gguf_types.py) against the files llama.cpp's quantizer really writes.

Widths are chosen so that both sides of llama.cpp's rules occur: hidden 256 tiles K-quant super-blocks, intermediate
320 does not (ffn_down falls back), and 8 layers make use_more_bits pick layers 0, 3, 6 and 7.
"""

from __future__ import annotations

import json

import pytest

from edgekit.arch import FAMILIES, family_of, geometry
from edgekit.exporters import gguf_types

FAMS = sorted(FAMILIES)
SHAPE = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from edgekit.testing import make_tiny_model

    root, made = tmp_path_factory.mktemp("gguf-types"), {}

    def get(fam: str):
        if fam not in made:
            extra = {"layer_types": ["sliding_attention"] * 7 + ["full_attention"]} if fam == "gemma3_text" else {}
            made[fam] = make_tiny_model(fam, root / fam, quirks=True, **SHAPE, **extra)
        return made[fam]

    return get


def _written(model, out, precision):
    from gguf import GGUFReader

    from edgekit.export import ExportConfig, export_model

    export_model(model, out, ExportConfig(backend="gguf", precision=precision, context_length=128,
                                          accept_gate_failure=True), log=lambda *_: None)
    return [(t.name, t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(str(out / "model.gguf")).tensors]


# the default run keeps one split-projection and one fused family (each case is a real llama.cpp quantization of an
# 8-layer model); the rest run with -m slow (make test-all)
DEFAULT_CASES = {("llama", "q4_k_m"), ("phi3", "q4_k_m")}
CASES = [(f, "q4_k_m") for f in FAMS] + [("llama", p) for p in ("q5_k_m", "q4_0", "q8_0")]


@pytest.mark.parametrize("fam,precision", [c if c in DEFAULT_CASES else pytest.param(*c, marks=pytest.mark.slow)
                                           for c in CASES])
def test_predicted_types_and_bytes_are_what_llama_cpp_writes(models, tmp_path, fam, precision):
    model = models(fam)
    cfg = json.loads((model / "config.json").read_text())
    real = _written(model, tmp_path / "out", precision)
    fused = family_of(cfg).fused
    pred = gguf_types.tensor_types(geometry(cfg), precision, fused_qkv=fused, fused_gate_up=fused)
    matrices = {name: ty for name, ty, _ in real if name in {p["tensor"] for p in pred}}
    assert len(matrices) == len(pred), "a predicted matrix is missing from the file (or named differently)"
    assert {p["tensor"]: p["type"] for p in pred} == matrices
    if precision in ("q4_k_m", "q5_k_m"):  # both branches of the rules really occurred
        assert {"Q6_K"} < set(matrices.values()) and any(t in ("Q5_0", "Q5_1", "Q8_0") for t in matrices.values())
    rope = sum(b for name, _, b in real if name.startswith("rope_"))  # llama3 rope factors: not weights
    assert gguf_types.planned_weight_bytes(cfg, precision) == sum(b for _, _, b in real) - rope


def test_planner_counts_gguf_weights_by_tensor_type():
    """Qwen2.5-0.5B's 896-wide rows cannot take Q4_K: the planner counts the Q5_0 fallbacks and the Q8_0 head,
    not 4.5 bits per weight (which was 30% short of the file)."""
    from edgekit.plan import PlanRequest, memory
    from edgekit.precision import get_precision

    cfg = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
           "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
           "max_position_embeddings": 32768, "tie_word_embeddings": True}
    types = gguf_types.tensor_types(geometry(cfg), "q4_k_m")
    # Q4_K only where the row is 4864 wide (ffn_down) and use_more_bits does not ask for Q6_K: 12 of 169 matrices
    assert sum(t["type"] == "Q4_K" for t in types) == 12 and len(types) == 169
    assert {t["type"] for t in types if t["row_width"] == 896} == {"Q5_0", "Q8_0"}
    m = memory(cfg, "gguf", "q4_k_m", PlanRequest(context=1024))
    nominal = geometry(cfg).params() * get_precision("q4_k_m").bytes_per_weight
    assert m["weights_bytes"] == gguf_types.planned_weight_bytes(cfg, "q4_k_m") > 1.3 * nominal
