"""Export a VLM as two gated parts in one folder:

- vision/: the vision tower + projector as ONNX (pixel_values -> image embeddings, the vectors that replace the
  <image> tokens), run by ONNX Runtime and gated against PyTorch on held-out images (cosine similarity per image
  token and max |delta|), with the image processor's config beside it;
- language/: the language model saved as a plain causal-LM folder (the decoder family's own layout) and exported
  by edgekit's decoder exporters (ONNX Runtime, GGUF, ExecuTorch), gated by their own fidelity gate.

vlm.json records both parts, the image token id and how many positions one image takes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError, GateFailed

MANIFEST = "vlm.json"
VISION_ONNX = "vision_encoder.onnx"
# fp32 ONNX Runtime against fp32 PyTorch: the same arithmetic up to kernel order
VISION_GATE = {"min_cosine": 0.9999, "max_abs_delta": 1e-3}


@dataclass(frozen=True)
class VlmExportConfig:
    language_backend: str = "onnxruntime"
    language_precision: str | None = None
    context_length: int | None = None
    gate_images: int = 4  # held-out images the vision gate compares on
    accept_gate_failure: bool = False


class VisionEncoder:
    """torch.nn.Module factory: pixel_values -> image embeddings through the family's module access."""

    @staticmethod
    def build(model, fam):
        import torch

        class _Enc(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                return fam.image_features(self.model, pixel_values)

        return _Enc().eval()


def gate_images(model_dir: Path, n: int):
    """(pixel_values) of n held-out generated images, preprocessed by the model's own image processor."""
    import tempfile

    import torch
    from transformers import AutoImageProcessor

    from edgekit.vlm.data import generate_pairs, load_image, load_pairs

    proc = AutoImageProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as d:
        pairs = load_pairs(generate_pairs(Path(d), n, seed=12345))  # not the calibration seed
        ims = [load_image(p.image) for p in pairs]
        return torch.as_tensor(proc(images=ims, return_tensors="np")["pixel_values"])


def compare_embeddings(ref, got) -> dict:
    import numpy as np

    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-30)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_delta": float(np.abs(ref - got).max()), "shape": list(ref.shape)}


def export_vision(model, fam, model_dir: Path, out: Path, images: int = 4, log=print) -> dict:
    """Write vision/ (ONNX + image processor config + reference) into out; returns its gate result."""
    import numpy as np
    import onnxruntime as ort
    import torch

    out.mkdir(parents=True, exist_ok=True)
    enc = VisionEncoder.build(model, fam)
    pix = gate_images(model_dir, max(images, 2))
    with torch.no_grad():
        ref = enc(pix).numpy()
    t0 = time.perf_counter()
    torch.onnx.export(enc, (pix[:2],), str(out / VISION_ONNX), input_names=["pixel_values"],
                      output_names=["image_embeds"], dynamic_axes={"pixel_values": {0: "batch"},
                                                                    "image_embeds": {0: "batch"}},
                      opset_version=17, dynamo=False)
    export_s = round(time.perf_counter() - t0, 2)
    sess = ort.InferenceSession(str(out / VISION_ONNX), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": pix.numpy()})[0]
    gate = compare_embeddings(ref, got)
    gate["passed"] = gate["min_cosine"] >= VISION_GATE["min_cosine"] and \
        gate["max_abs_delta"] <= VISION_GATE["max_abs_delta"]
    gate["thresholds"] = dict(VISION_GATE)
    np.savez(out / "reference.npz", pixel_values=pix.numpy(), image_embeds=ref)
    shutil.copy2(Path(model_dir) / "preprocessor_config.json", out / "preprocessor_config.json")
    log(f"export: vision tower + projector -> ONNX Runtime: min cosine {gate['min_cosine']:.7f}, "
        f"max |delta| {gate['max_abs_delta']:.2e} over {gate['shape'][0]} images x {gate['shape'][1]} tokens")
    return {"file": VISION_ONNX, "export_seconds": export_s, "gate": gate,
            "input": {"pixel_values": list(pix.shape[1:])}, "output": {"image_embeds": list(ref.shape[1:])}}


def save_language_model(model, fam, model_dir: Path, out: Path) -> Path:
    """The language model as a plain causal-LM Hugging Face folder (its decoder family's layout + the tokenizer)."""
    from edgekit.prune.apply import _COMPANIONS

    lm = fam.language_view(model)
    lm.save_pretrained(out, safe_serialization=True)
    for f in Path(model_dir).iterdir():
        if f.is_file() and any(f.match(p) for p in _COMPANIONS) and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


RECOMPOSED_MAX_DELTA = 1e-3


def recompose_check(model, fam, model_dir: Path, mcfg: dict, lm_dir: Path, onnx_path: Path) -> dict:
    """Image+text prompts through the parts as a device runs them (the ONNX vision encoder's embeddings put in
    place of the <image> tokens, then the saved language-model folder) against the whole PyTorch VLM: proves the
    split loses nothing (the language artifact is then gated against that folder by its own exporter)."""
    import tempfile

    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.vlm.data import encode, generate_pairs, load_pairs

    with tempfile.TemporaryDirectory() as d:
        pairs = load_pairs(generate_pairs(Path(d), 2, seed=54321))
        _, _, items = encode(model_dir, pairs, fam, mcfg)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for b in items:
            whole = model(input_ids=b.input_ids, pixel_values=b.pixel_values, use_cache=False).logits
            img = torch.as_tensor(sess.run(None, {"pixel_values": b.pixel_values.numpy()})[0])
            emb = lm.get_input_embeddings()(b.input_ids)
            mask = b.input_ids[0] == mcfg["image_token_index"]
            emb[0, mask] = img[0]
            split = lm(inputs_embeds=emb, use_cache=False).logits
            worst = max(worst, float((whole - split).abs().max()))
    return {"max_abs_logit_delta": worst, "prompts": len(items), "passed": worst <= RECOMPOSED_MAX_DELTA,
            "threshold": RECOMPOSED_MAX_DELTA}


def export_vlm(model_dir: Path, out: Path, cfg: VlmExportConfig = VlmExportConfig(), log=print) -> dict:
    """Both parts into out (atomically); returns vlm.json. A failed vision gate raises GateFailed unless
    accept_gate_failure (the language part's gate is the decoder exporter's own)."""
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText

    from edgekit.arch import vlm_family_of
    from edgekit.export import ExportConfig, export_model
    from edgekit.fsutil import atomic_dir, atomic_write_json

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EdgekitError(f"{model_dir} is not a model folder (no config.json)",
                           "pass a Hugging Face VLM folder (config.json + safetensors)")
    mcfg = json.loads((model_dir / "config.json").read_text())
    fam = vlm_family_of(mcfg)
    if not (model_dir / "preprocessor_config.json").is_file():
        raise EdgekitError(f"{model_dir} has no preprocessor_config.json (the image processor)",
                           "save the model's image processor next to it (processor.save_pretrained)")
    ExportConfig(backend=cfg.language_backend, precision=cfg.language_precision).resolved()  # refuse early
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with atomic_dir(Path(out)) as tmp:
        vision = export_vision(model, fam, model_dir, tmp / "vision", cfg.gate_images, log)
        if not vision["gate"]["passed"] and not cfg.accept_gate_failure:
            raise GateFailed(f"the vision tower's ONNX embeddings differ from PyTorch (min cosine "
                             f"{vision['gate']['min_cosine']:.6f}, max |delta| {vision['gate']['max_abs_delta']:.2e})",
                             "report it with the model; --accept-gate-failure keeps the artifact")
        with tempfile.TemporaryDirectory(prefix="edgekit-lm-") as d:
            lm_dir = save_language_model(model, fam, model_dir, Path(d) / "lm")
            recomposed = recompose_check(model, fam, model_dir, mcfg, lm_dir, tmp / "vision" / VISION_ONNX)
            log(f"export: ONNX image embeddings + the saved language model vs the whole PyTorch VLM on image+text "
                f"prompts: max |delta logit| {recomposed['max_abs_logit_delta']:.2e}")
            if not recomposed["passed"] and not cfg.accept_gate_failure:
                raise GateFailed(f"the split VLM (ONNX vision + saved language model) differs from the whole model "
                                 f"(max |delta logit| {recomposed['max_abs_logit_delta']:.2e})",
                                 "report it with the model; --accept-gate-failure keeps the artifact")
            log(f"export: language model ({fam.language_family(mcfg).name}) -> {cfg.language_backend}")
            lang = export_model(lm_dir, tmp / "language", ExportConfig(
                backend=cfg.language_backend, precision=cfg.language_precision, context_length=cfg.context_length,
                accept_gate_failure=cfg.accept_gate_failure), log=log)
        manifest = {"task": fam.task, "arch": fam.model_type, "source": str(model_dir),
                    "image_token_index": mcfg["image_token_index"], "image_tokens": fam.image_tokens(mcfg),
                    "parts": fam.geometry(mcfg).parts(),
                    "recomposed": recomposed,
                    "vision": {"backend": "onnxruntime", "precision": "fp32", "folder": "vision", **vision},
                    "language": {"backend": lang["backend"], "precision": lang["precision"], "folder": "language",
                                 "gate": lang.get("gate")}}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
