"""ExecuTorch's VLM language .pte (exporters/executorch.py StaticCacheVLM): forward also takes image_embeds and
image_mask (1, T, ...) whose rows replace the <image> positions' embeddings, gated by `edgekit vlm export -b
executorch` on image+text prompts (the vision artifact's embeddings at the image-token positions of the family's
image prompt) against the whole PyTorch VLM, and used by `edgekit vlm bench` for the TTFT of a real image prompt.
Every number comes from ExecuTorch's own runtime (XNNPACK); lowering one tiny language model costs ~30 s on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("executorch")

from edgekit.arch import VLM_FAMILIES  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from vlm_helpers import export_cache, quiet  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model folder, config, PyTorch VLM, export folder, vlm.json), each exported once (~35 s)."""
    return export_cache(tmp_path_factory.mktemp("etimg"), language_backend="executorch", context_length=96)


def _method(pte):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(pte).load_method("forward")


def _logits(method, ids, rows, at):
    """One prefill from position 0 fed by hand (no edgekit runner): `rows` at positions `at`, mask 1 there."""
    import torch

    t, h = len(ids), rows.shape[-1]
    embeds, mask = torch.zeros((1, t, h)), torch.zeros((1, t, 1))
    embeds[0, at], mask[0, at] = torch.as_tensor(rows.reshape(-1, h)), 1.0
    return method.execute([torch.tensor([ids]), torch.arange(t), embeds, mask])[0][0].numpy().copy()


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_vlm_export_gates_the_et_language_pte_on_image_prompts(exported, family):
    import onnxruntime as ort
    import torch

    path, cfg, model, art, m = exported(family)
    fam = VLM_FAMILIES[family]
    g = m["language"]["image_gate"]
    # the gate's own figures: ORT fp32 vision -> ExecuTorch fp32 language against PyTorch on 2 image+caption prompts
    assert g["passed"] and not g["failures"] and g["prompts"] == 2 and g["image_tokens"] == 16
    assert g["top1_agreement"] == 1.0 and g["mean_kl"] < 1e-9 and g["max_abs_logit_delta"] < 1e-4
    assert g["last_position"]["top1_agreement"] == 1.0 and g["last_position"]["max_abs_logit_delta"] < 1e-4
    assert g["greedy_match"] and g["runtime"].startswith("executorch ") and g["vision_backend"] == "onnxruntime"
    assert m["language"]["backend"] == "executorch" and m["language"]["gate"]["passed"]  # text gate: zero mask
    lang = json.loads((art / "language" / "artifact.json").read_text())
    assert lang["image_embeds"] == {"input": "image_embeds", "image_token_id": fam.image_token_id(cfg),
                                    "inputs": ["input_ids", "input_pos", "image_embeds", "image_mask"]}
    method = _method(art / "language" / "model.pte")
    hidden = cfg["text_config"]["hidden_size"]
    io = method.metadata
    assert io.num_inputs() == 4 and int(io.input_tensor_meta(2).sizes()[-1]) == hidden
    # recomputed here by hand: ORT vision on the shipped reference pixels -> the .pte, vs PyTorch
    ref = np.load(art / "vision" / "reference.npz")
    vision = ort.InferenceSession(str(art / "vision" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    rows = vision.run(None, {"pixel_values": ref["pixel_values"][:1]})[0]
    ids = m["image_prompt"] + [5, 17, 42, 99, 7, 300]
    at = np.flatnonzero(np.array(ids) == fam.image_token_id(cfg))
    got = _logits(method, ids, rows, at)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), pixel_values=torch.as_tensor(ref["pixel_values"][:1]),
                     use_cache=False).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(-1) == want.argmax(-1)).all()
    # the image rows matter: zeros instead move the text positions' logits far past the gate's 1e-3
    assert np.abs(_logits(method, ids, np.zeros_like(rows), at) - want)[-6:].max() > 0.05
    # zero mask: image tokens keep the table's embedding, what the language model computes on the ids alone
    lm = fam.language_view(model)
    no_rows = _logits(method, ids, rows[:, :0], at[:0])
    with torch.no_grad():
        text = lm(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    assert np.abs(no_rows - text).max() < 1e-4


def test_image_prompt_gate_on_executorch_fails_on_wrong_image_embeddings(exported):
    """The gate is not vacuous on the .pte either: 0.9-scaled embeddings fail it at fp32, by its own figures."""
    from edgekit.exporters.vision import BACKENDS
    from edgekit.vlm.export import image_prompt_gate

    path, cfg, model, art, m = exported("llava")
    run = BACKENDS["onnxruntime"][1]
    g = image_prompt_gate(model, VLM_FAMILIES["llava"], cfg, path, art / "language", "fp32",
                          lambda inp: 0.9 * run(art / "vision", m["vision"], inp)[0])
    assert not g["passed"] and g["max_abs_logit_delta"] > 1e-2 and g["mean_kl"] > 1e-6
    assert any(f.startswith("max |delta logit|") for f in g["failures"]) and g["runtime"].startswith("executorch")


def test_et_runner_takes_image_rows_and_refuses_a_miscount_in_one_line(exported):
    from edgekit.runtime import open_artifact

    path, cfg, model, art, m = exported("llava")
    lm = open_artifact(art / "language")
    assert lm.takes_image_embeds and lm.hidden_size == cfg["text_config"]["hidden_size"]
    ids, h = np.array(m["image_prompt"] + [5, 6]), lm.hidden_size
    with pytest.raises(EdgekitError) as e:
        lm.forward(ids, image_embeds=np.zeros((1, 15, h), np.float32))  # 15 rows, 16 image tokens
    assert "15 image-embedding rows for 16 image tokens" in e.value.line() and "\n" not in e.value.line()
    rows = np.random.default_rng(0).standard_normal((16, h)).astype(np.float32)
    lm.reset()
    a = lm.forward(ids[:10], image_embeds=rows[:10])  # a prompt in chunks: rows split alike
    b = lm.forward(ids[10:], image_embeds=rows[10:])
    lm.reset()
    whole = lm.forward(ids, image_embeds=rows[None])
    assert np.abs(np.concatenate([a, b]) - whole).max() < 1e-4
    lm.max_chunk = 7  # the runner's own chunking splits rows and mask with the ids
    lm.reset()
    assert np.abs(lm.forward(ids, image_embeds=rows) - whole).max() < 1e-4


def test_plain_pte_is_unchanged_and_refuses_image_rows(declared_artifact):
    """A decoder exported without image_token_id keeps forward(input_ids, input_pos): nothing VLM about it."""
    from edgekit.runtime import open_artifact

    out, meta = declared_artifact("executorch", "fp32")
    assert "image_embeds" not in meta and _method(out / "model.pte").metadata.num_inputs() == 2
    lm = open_artifact(out)
    assert not lm.takes_image_embeds
    with pytest.raises(EdgekitError) as e:
        lm.forward(np.array([1, 2]), image_embeds=np.zeros((1, 1, 64), np.float32))
    assert "takes token ids only" in e.value.line() and "\n" not in e.value.line()


def test_vlm_bench_ttft_on_et_prefills_the_real_image_prompt(exported):
    from edgekit.vlm.bench import bench_vlm

    path, cfg, model, art, m = exported("idefics3")
    r = bench_vlm(art, runs=2, prompt_tokens=8, new_tokens=4, threads=1, log=quiet)
    assert r["language"]["backend"] == "executorch" and r["decode_tokens_per_s"] > 0
    assert r["ttft_prefill"].startswith("27 positions (19 image + 8 text)")  # <fake><global-img> 16 x <image> <fake>
    assert "image_embeds input" in r["ttft_prefill"] and 0 < r["image_encode_ms"]["p50"] <= r["ttft_ms"]["p50"]
