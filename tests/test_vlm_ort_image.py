"""ONNX Runtime's VLM language graph (exporters/onnxruntime.py splice_image_embeds): the lean decoder graph with an
image_embeds input, gated by `edgekit vlm export -b onnxruntime` on image+text prompts (the ORT vision artifact's
embeddings at the image-token positions of the family's image prompt) against the whole PyTorch VLM, and used by
`edgekit vlm bench` for the TTFT of a real image prompt. Every number comes from onnxruntime itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.arch import VLM_FAMILIES
from edgekit.errors import EdgekitError
from vlm_helpers import export_cache, quiet

VLMS = sorted(VLM_FAMILIES)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model folder, config, PyTorch VLM, export folder, vlm.json), each exported once (~10 s)."""
    return export_cache(tmp_path_factory.mktemp("ortimg"), context_length=96)


def _session(folder, name):
    import onnxruntime as ort

    return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])


def _logits(sess, ids, rows):
    """One prefill of the language graph from an empty cache, fed by hand (no edgekit runner)."""
    feeds = {"input_ids": np.asarray(ids, dtype=np.int64)[None], "attention_mask": np.ones((1, len(ids)), np.int64),
             "image_embeds": np.asarray(rows, dtype=np.float32)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, 16), np.float32)  # tiny Llama: head_dim 16
    return sess.run(["logits"], feeds)[0][0]


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_vlm_export_gates_the_ort_language_graph_on_image_prompts(exported, family):
    import torch
    from transformers import AutoTokenizer

    path, cfg, model, art, m = exported(family)
    fam = VLM_FAMILIES[family]
    g = m["language"]["image_gate"]
    # the gate's own figures: fp32 ORT (vision + language) against PyTorch on 2 image+caption prompts
    assert g["passed"] and not g["failures"] and g["prompts"] == 2 and g["image_tokens"] == 16
    assert g["top1_agreement"] == 1.0 and g["mean_kl"] < 1e-9 and g["max_abs_logit_delta"] < 1e-4
    assert g["last_position"]["top1_agreement"] == 1.0 and g["last_position"]["max_abs_logit_delta"] < 1e-4
    assert g["greedy_match"] and g["thresholds"]["max_abs"] == 1e-3 and g["runtime"].startswith("onnxruntime")
    assert m["language"]["gate"]["passed"]  # the text gate ran on the same (spliced) graph, fed no rows
    lang = json.loads((art / "language" / "artifact.json").read_text())
    assert lang["image_embeds"] == {"input": "image_embeds", "image_token_id": fam.image_token_id(cfg)}
    sess = _session(art / "language", "model.onnx")
    hidden = cfg["text_config"]["hidden_size"]
    assert [i.shape[2] for i in sess.get_inputs() if i.name == "image_embeds"] == [hidden]
    # recomputed here by hand: ORT vision on the shipped reference pixels -> ORT language graph, vs PyTorch
    ref = np.load(art / "vision" / "reference.npz")
    rows = _session(art / "vision", "vision_encoder.onnx").run(None, {"pixel_values": ref["pixel_values"][:1]})[0]
    assert m["image_prompt"] == fam.image_prompt(AutoTokenizer.from_pretrained(path), cfg)
    ids = m["image_prompt"] + [5, 17, 42, 99, 7, 300]
    got = _logits(sess, ids, rows)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), pixel_values=torch.as_tensor(ref["pixel_values"][:1]),
                     use_cache=False).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(-1) == want.argmax(-1)).all()
    # the image rows matter: zeros instead move the text positions' logits far past the gate's 1e-3
    assert np.abs(_logits(sess, ids, np.zeros_like(rows)) - want)[-6:].max() > 0.05
    # no rows: image tokens keep the table's embedding, exactly what the token-id graph computes
    lm = fam.language_view(model)
    table = lm.get_input_embeddings().weight[fam.image_token_id(cfg)].detach().numpy()
    no_rows = _logits(sess, ids, np.zeros((1, 0, hidden)))
    assert np.array_equal(no_rows, _logits(sess, ids, np.broadcast_to(table, rows.shape)))
    with torch.no_grad():
        text = lm(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    assert np.abs(no_rows - text).max() < 1e-4


def test_image_prompt_gate_fails_on_wrong_image_embeddings(exported):
    """The gate is not vacuous: the vision artifact's embeddings scaled by 0.9 fail it at fp32, by its own figures."""
    from edgekit.exporters.vision import BACKENDS
    from edgekit.vlm.export import image_prompt_gate

    path, cfg, model, art, m = exported("llava")
    run = BACKENDS["onnxruntime"][1]
    g = image_prompt_gate(model, VLM_FAMILIES["llava"], cfg, path, art / "language", "fp32",
                          lambda inp: 0.9 * run(art / "vision", m["vision"], inp)[0])
    assert not g["passed"] and g["max_abs_logit_delta"] > 1e-2 and g["mean_kl"] > 1e-6
    assert any(f.startswith("max |delta logit|") for f in g["failures"])


def test_ort_runner_takes_image_rows_and_refuses_a_miscount_in_one_line(exported):
    from edgekit.runtime import open_artifact

    path, cfg, model, art, m = exported("llava")
    lm = open_artifact(art / "language")
    ids, h = np.array(m["image_prompt"] + [5, 6]), cfg["text_config"]["hidden_size"]
    rows = np.zeros((1, 15, h), np.float32)
    with pytest.raises(EdgekitError) as e:
        lm.forward(ids, image_embeds=rows)  # 15 rows, 16 image tokens
    assert "15 image-embedding rows for 16 image tokens" in e.value.line() and "\n" not in e.value.line()
    lm.reset()
    a = lm.forward(ids[:10], image_embeds=np.ones((1, 10, h), np.float32))  # a prompt in chunks: rows split alike
    b = lm.forward(ids[10:], image_embeds=np.ones((1, 6, h), np.float32))
    lm.reset()
    whole = lm.forward(ids, image_embeds=np.ones((1, 16, h), np.float32))
    assert np.abs(np.concatenate([a, b]) - whole).max() < 1e-4


def test_vlm_bench_ttft_on_ort_prefills_the_real_image_prompt(exported):
    from edgekit.vlm.bench import bench_vlm

    path, cfg, model, art, m = exported("idefics3")
    r = bench_vlm(art, runs=2, prompt_tokens=8, new_tokens=4, threads=1, log=quiet)
    assert r["language"]["backend"] == "onnxruntime" and r["decode_tokens_per_s"] > 0
    assert r["ttft_prefill"].startswith("27 positions (19 image + 8 text)")  # <fake><global-img> 16 x <image> <fake>
    assert "image_embeds input" in r["ttft_prefill"] and 0 < r["image_encode_ms"]["p50"] <= r["ttft_ms"]["p50"]
