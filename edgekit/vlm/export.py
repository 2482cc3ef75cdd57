"""Export a VLM as two gated parts in one folder:

- vision/: the vision tower + projector as ONNX (pixel_values -> image embeddings, the vectors that replace the
  <image> tokens), run by ONNX Runtime and gated against PyTorch on held-out images (cosine similarity per image
  token and max |delta|), with the image processor's config beside it;
- language/: the language model saved as a plain causal-LM folder (the decoder family's own layout) and exported
  by edgekit's decoder exporters (ONNX Runtime, GGUF, ExecuTorch), gated by their own fidelity gate. On ONNX
  Runtime and ExecuTorch the graph also takes image_embeds (rows for the image-token positions), and is gated a
  second time on image+text prompts fed the vision artifact's embeddings (image_prompt_gate); llama.cpp runs whole
  image prompts through mtmd (llamacpp_prompt_check).

vlm.json records both parts, the image token id, how many positions one image takes and the ids of its image
prompt.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, GateFailed

MANIFEST = "vlm.json"
VISION_ONNX = "vision_encoder.onnx"
# per vision precision: fp32 runtimes against fp32 PyTorch are the same arithmetic up to kernel order; fp16 weights
VISION_GATES = {"fp32": {"min_cosine": 0.9999, "max_abs_delta": 1e-3},
                "fp16": {"min_cosine": 0.999, "max_abs_delta": 0.05}}
VISION_GATE = VISION_GATES["fp32"]


@dataclass(frozen=True)
class VlmExportConfig:
    language_backend: str = "onnxruntime"
    language_precision: str | None = None
    context_length: int | None = None
    gate_images: int = 4  # held-out images the vision gate compares on
    accept_gate_failure: bool = False
    vision_backend: str = "onnxruntime"  # a backend whose ExporterSpec declares vision_precisions
    vision_precision: str | None = None  # None: the vision backend's most faithful
    target: Any = None  # edgekit.target.Target (tensorrt: the engine's TensorRT and SM)

    def vision(self) -> tuple[str, str]:
        """(vision backend, its precision), refused in one line when the backend has no vision exporter."""
        from edgekit.exporters import get
        from edgekit.precision import get_precision

        spec = get(self.vision_backend)
        if not spec.vision_precisions:
            have = ", ".join(n for n, s in _registry().items() if s.vision_precisions)
            raise EdgekitError(f"backend {spec.name} has no vision-tower exporter", f"pass --vision-backend with one "
                               f"of {have}")
        p = spec.vision_precisions[0] if self.vision_precision is None else get_precision(self.vision_precision).name
        if p not in spec.vision_precisions:
            raise EdgekitError(f"the {spec.name} vision tower is built in {', '.join(spec.vision_precisions)}, not {p}",
                               f"pass --vision-precision {spec.vision_precisions[0]}")
        if spec.name == "gguf" and self.language_backend != "gguf":
            raise EdgekitError("llama.cpp's mmproj runs beside a GGUF language model",
                               "pass -b gguf with --vision-backend gguf")
        return spec.name, p


def _registry():
    from edgekit.exporters import REGISTRY

    return REGISTRY


def gate_inputs(model_dir: Path, mcfg: dict, n: int, seed: int = 12345, fam=None):
    """VisionInputs of n held-out generated images drawn at the tower's own resolution (so no runtime resizes them:
    llama.cpp preprocesses by itself), preprocessed by the model's image processor."""
    import tempfile

    import numpy as np
    from transformers import AutoImageProcessor

    from edgekit.exporters.vision import VisionInputs
    from edgekit.vlm.data import generate_pairs, load_image, load_pairs

    proc = AutoImageProcessor.from_pretrained(model_dir)
    size = int((mcfg.get("vision_config") or mcfg).get("image_size", 224))  # a VLM's tower, or an image tower alone
    with tempfile.TemporaryDirectory() as d:
        pairs = load_pairs(generate_pairs(Path(d), n, size=size, seed=seed))  # not the calibration seed
        ims = [load_image(p.image) for p in pairs]
        pix = fam.pixel_batch(proc, ims) if fam is not None else proc(images=ims, return_tensors="np")["pixel_values"]
        return VisionInputs(np.asarray(pix, dtype=np.float32),
                            np.stack([np.asarray(im, dtype=np.uint8) for im in ims]))


def compare_embeddings(ref, got) -> dict:
    import numpy as np

    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return {"min_cosine": -1.0, "mean_cosine": -1.0, "max_abs_delta": float("inf"), "shape": list(ref.shape),
                "runtime_shape": list(got.shape)}
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-30)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_delta": float(np.abs(ref - got).max()), "shape": list(ref.shape)}


def export_vision(model, fam, mcfg: dict, model_dir: Path, out: Path, backend: str = "onnxruntime",
                  precision: str = "fp32", images: int = 4, target=None, language_gguf: Path | None = None,
                  log=print) -> dict:
    """Write vision/ (the backend's files + image processor config + reference) into out and run it in the backend's
    runtime on held-out images; returns its meta with the gate result (image embeddings vs PyTorch)."""
    import numpy as np
    import torch

    from edgekit.exporters.vision import BACKENDS, VisionJob, encoder_module, output_names

    out.mkdir(parents=True, exist_ok=True)
    inputs = gate_inputs(model_dir, mcfg, max(images, 2), fam=fam)
    with torch.no_grad():
        refs = [r.numpy() for r in encoder_module(model, fam)(torch.as_tensor(inputs.pixel_values))]
    export, run = BACKENDS[backend]
    t0 = time.perf_counter()
    meta = export(VisionJob(model, fam, mcfg, Path(model_dir), out, precision, inputs, target, language_gguf))
    export_s = round(time.perf_counter() - t0, 2)
    got = run(out, meta, inputs)
    th = VISION_GATES[precision]
    names = output_names(fam)
    per = {n: compare_embeddings(r, g) for n, r, g in zip(names, refs, got)}
    for c in per.values():
        c["passed"] = c["min_cosine"] >= th["min_cosine"] and c["max_abs_delta"] <= th["max_abs_delta"]
    ref = refs[0]
    gate = dict(per[names[0]])  # the first output's figures; every output must pass
    gate["passed"] = len(got) == len(names) and all(c["passed"] for c in per.values())
    if len(names) > 1:
        gate["outputs"] = per
    gate["thresholds"] = dict(th)
    gate["runtime"] = meta["runtime"]
    if backend == "gguf" and not gate["passed"]:
        from edgekit.exporters.mmproj import llamacpp_graph_reference

        sim = llamacpp_graph_reference(model, fam, torch.as_tensor(inputs.pixel_values))
        if sim is not None:  # the file is right if llama.cpp computes exactly its own (class-token-last) graph
            gate["vs_llamacpp_graph"] = compare_embeddings(sim, got[0])
    np.savez(out / "reference.npz", pixel_values=inputs.pixel_values, images=inputs.images, **dict(zip(names, refs)))
    shutil.copy2(Path(model_dir) / "preprocessor_config.json", out / "preprocessor_config.json")
    log(f"export: {'vision tower + projector' if names == ('image_embeds',) else 'image tower'} -> {backend} "
        f"{precision}: min cosine {gate['min_cosine']:.7f}, "
        f"max |delta| {gate['max_abs_delta']:.2e} over {gate['shape'][0]} images x {gate['shape'][1]} tokens")
    return {**meta, "backend": backend, "precision": precision, "export_seconds": export_s, "gate": gate,
            "input": {"pixel_values": list(inputs.pixel_values.shape[1:])}, "output": {"image_embeds": list(ref.shape[1:])}}


def vision_gate_error(vision: dict) -> GateFailed:
    g = vision["gate"]
    sim = g.get("vs_llamacpp_graph")
    if sim and sim["min_cosine"] >= 0.9999:
        import llama_cpp

        return GateFailed(f"llama.cpp's mtmd (llama-cpp-python {llama_cpp.__version__}) computes LLaVA's CLIP tower "
                          f"with the class token moved last (llama.cpp issue #25814): its image embeddings differ from "
                          f"PyTorch (min cosine {g['min_cosine']:.4f}) although the mmproj reproduces that graph "
                          f"exactly (min cosine {sim['min_cosine']:.6f})" + (
                              f", and whole image prompts run by llama.cpp match PyTorch on that graph to max |delta "
                              f"logit| {p['max_abs_logit_delta_vs_llamacpp_graph']:.1e}"
                              if (p := vision.get("llamacpp_image_prompt")) and
                              p.get("max_abs_logit_delta_vs_llamacpp_graph") is not None else ""),
                          "use --vision-backend onnxruntime or executorch, or a llama.cpp with the fix (PR #25844); "
                          "--accept-gate-failure keeps the mmproj")
    if vision["backend"] == "gguf":
        from edgekit.exporters.mmproj import f16_runtime_failure

        if why := f16_runtime_failure(vision):
            return GateFailed(*why)
    return GateFailed(f"the vision tower's {vision['backend']} embeddings differ from PyTorch (min cosine "
                      f"{g['min_cosine']:.6f}, max |delta| {g['max_abs_delta']:.2e})",
                      "report it with the model; --accept-gate-failure keeps the artifact")


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
# an fp16 vision artifact (llama.cpp's mmproj) carries its own gated rounding into the logits; wiring errors are far
# larger
RECOMPOSED_MAX_DELTAS = {"fp32": RECOMPOSED_MAX_DELTA, "fp16": 2e-2}


def recompose_check(model, fam, model_dir: Path, mcfg: dict, lm_dir: Path, embed, precision: str = "fp32") -> dict:
    """Image+text prompts through the parts as a device runs them (the exported vision tower's embeddings, from
    `embed(VisionInputs)`, put in place of the <image> tokens, then the saved language-model folder) against the whole
    PyTorch VLM: proves the split loses nothing (the language artifact is then gated against that folder by its own
    exporter)."""
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.exporters.vision import VisionInputs
    from edgekit.vlm.data import encode, generate_pairs, load_image, load_pairs

    size = int(mcfg["vision_config"].get("image_size", 224))
    with tempfile.TemporaryDirectory() as d:
        pairs = load_pairs(generate_pairs(Path(d), 2, size=size, seed=54321))
        _, _, items = encode(model_dir, pairs, fam, mcfg)
        images = [np.asarray(load_image(p.image), dtype=np.uint8) for p in pairs]
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for b, im in zip(items, images):
            whole = model(input_ids=b.input_ids, pixel_values=b.pixel_values, use_cache=False).logits
            img = torch.as_tensor(embed(VisionInputs(b.pixel_values.numpy(), im[None])))
            emb = lm.get_input_embeddings()(b.input_ids)
            mask = b.input_ids[0] == fam.image_token_id(mcfg)
            emb[0, mask] = img[0]
            split = lm(inputs_embeds=emb, use_cache=False).logits
            worst = max(worst, float((whole - split).abs().max()))
    th = RECOMPOSED_MAX_DELTAS[precision]
    return {"max_abs_logit_delta": worst, "prompts": len(items), "passed": worst <= th, "threshold": th}


IMAGE_GATE_PROMPTS = 2
IMAGE_GATE_DECODE = 4  # the prompt's last positions go through the KV cache one token at a time
IMAGE_GATE_NEW = 8  # greedy tokens generated after the prompt


def image_prompt_gate(model, fam, mcfg: dict, model_dir: Path, lang_dir: Path, precision: str, embed,
                      threads: int | None = None) -> dict:
    """The language artifact's gate on image+text prompts, run as a device runs them (ONNX Runtime or ExecuTorch:
    the runner the artifact opens with): the vision artifact's embeddings (`embed(VisionInputs)`) fed to the language
    graph's image_embeds input at the image-token positions of the family's image prompt + a caption (prefill, then
    the last IMAGE_GATE_DECODE tokens decoded through the cache), every position's logits and a greedy continuation
    against the whole PyTorch VLM on the same pixels and ids, judged by the language precision's thresholds
    (edgekit.verify)."""
    import tempfile
    from dataclasses import asdict
    from importlib.metadata import version

    import numpy as np
    import torch

    from edgekit.exporters.vision import VisionInputs
    from edgekit.runtime import open_artifact, read_artifact
    from edgekit.verify import judge, mean_kl, thresholds_for
    from edgekit.vlm.data import encode, generate_pairs, load_image, load_pairs

    lm, backend = open_artifact(lang_dir, threads=threads), read_artifact(lang_dir)["backend"]
    size = int(mcfg["vision_config"].get("image_size", 224))
    with tempfile.TemporaryDirectory() as d:
        pairs = load_pairs(generate_pairs(Path(d), IMAGE_GATE_PROMPTS, size=size, seed=24680))  # unlike the other gates
        _, _, items = encode(model_dir, pairs, fam, mcfg)
        images = [np.asarray(load_image(p.image), dtype=np.uint8) for p in pairs]
    n_image = int((items[0].labels[0] == -100).sum())  # the image prompt: image tokens + the family's wrapping
    if n_image + IMAGE_GATE_DECODE + 1 + IMAGE_GATE_NEW > lm.max_context:
        raise EdgekitError(f"the language artifact's context ({lm.max_context}) cannot hold one image prompt "
                           f"({n_image} positions) and a caption", f"pass --context "
                           f"{n_image + IMAGE_GATE_DECODE + 1 + IMAGE_GATE_NEW} or more")
    image_id = fam.image_token_id(mcfg)

    def pick(logits) -> int:  # greedy, never <image>: a generated one would have no image features behind it
        return int(np.where(np.arange(len(logits)) == image_id, -np.inf, logits).argmax())

    ref, got, ref_new, got_new = [], [], [], []
    with torch.no_grad():
        for b, im in zip(items, images):
            ids = b.input_ids[0, :lm.max_context - IMAGE_GATE_NEW]
            rows = np.asarray(embed(VisionInputs(b.pixel_values.numpy(), im[None])), dtype=np.float32)
            seq = ids.numpy()
            cut = len(seq) - IMAGE_GATE_DECODE
            lm.reset()
            out = [lm.forward(seq[:cut], image_embeds=rows)] + [lm.forward(seq[i:i + 1]) for i in range(cut, len(seq))]
            got.append(np.concatenate(out))
            ref.append(model(input_ids=ids[None], pixel_values=b.pixel_values, use_cache=False).logits[0].numpy())
            nxt, new = pick(got[-1][-1]), []
            for _ in range(IMAGE_GATE_NEW):  # the runner's cache continues the image prompt
                new.append(nxt)
                nxt = pick(lm.forward(np.array([nxt]))[-1])
            got_new.append(new)
            s = ids[None]
            for _ in range(IMAGE_GATE_NEW):  # full recompute each step, as the text gate's reference does
                t = pick(model(input_ids=s, pixel_values=b.pixel_values, use_cache=False).logits[0, -1].numpy())
                s = torch.cat([s, torch.tensor([[t]])], dim=1)
            ref_new.append(s[0, len(ids):].tolist())
    del lm

    def scores(r, g) -> dict:
        return {"top1_agreement": float((r.argmax(-1) == g.argmax(-1)).mean()), "mean_kl": mean_kl(r, g),
                "max_abs_logit_delta": float(np.abs(r - g).max())}

    res = {"prompts": len(items), "positions": int(sum(len(r) for r in ref)),
           "image_tokens": fam.image_tokens(mcfg), **scores(np.concatenate(ref), np.concatenate(got)),
           "last_position": scores(np.stack([r[-1] for r in ref]), np.stack([g[-1] for g in got])),
           "greedy_match": ref_new == got_new}
    first = [next(i for i, (a, b) in enumerate(zip(x, y)) if a != b) for x, y in zip(ref_new, got_new) if x != y]
    res["greedy_first_divergence"] = min(first) if first else None
    th = thresholds_for(precision)
    failures = judge(res, th)
    res.update(thresholds=asdict(th), failures=failures, passed=not failures,
               runtime=f"{backend} {version(backend)}")  # both backends are named as their distributions
    return res


def llamacpp_prompt_check(model, fam, mcfg: dict, model_dir: Path, mmproj: Path, lm_gguf: Path,
                          threads: int = 1) -> dict:
    """Image+text prompts run whole by llama.cpp (mtmd encodes the image with the mmproj and decodes it into the
    language GGUF, then the caption): the last position's logits against the whole PyTorch VLM, and against
    PyTorch's language model fed the embeddings of llama.cpp's own graph (mmproj.llamacpp_graph_reference), which
    separates the files from that runtime's known difference (llama.cpp #25814)."""
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from edgekit.exporters.mmproj import MtmdEncoder, image_prompt_logits, llamacpp_graph_reference

    import gguf

    inputs = gate_inputs(model_dir, mcfg, 2, seed=54321, fam=fam)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as d:
        from edgekit.vlm.data import generate_pairs, load_pairs

        texts = [p.text for p in load_pairs(generate_pairs(Path(d), 2, size=inputs.images.shape[1], seed=54321))]
    # the reference feeds every image chunk mtmd makes the gate image itself: true unless mtmd resizes it into
    # slices (an idefics3 mmproj whose processor splits images, preproc_image_size > image_size)
    f = gguf.GGUFReader(str(mmproj)).fields.get(gguf.Keys.ClipVision.PREPROC_IMAGE_SIZE)
    if f is not None and int(f.contents()) > inputs.images.shape[1]:
        return {"skipped": f"llama.cpp resizes the {inputs.images.shape[1]}px gate image to {int(f.contents())}px "
                           "slices with its own resampler; no PyTorch reference has those pixels"}
    enc = MtmdEncoder(mmproj, lm_gguf, threads=threads)
    lm = fam.language_view(model)
    image_id = fam.image_token_id(mcfg)
    vs_vlm = vs_graph = 0.0
    agree = 0
    try:
        with torch.no_grad():
            for pix, img, text in zip(inputs.pixel_values, inputs.images, texts):
                ids = tok(text, add_special_tokens=False)["input_ids"][:24]
                got = image_prompt_logits(enc, img, ids)
                # the ids mtmd decoded (the family's image template: Idefics3's slice + global image wrapping)
                lay = enc.layout(img, enc.llm.detokenize(ids, special=True).decode("utf-8", "replace"))
                seq = torch.tensor([[t for x in lay for t in ([image_id] * x[1] if isinstance(x, tuple) else [x])]])
                k = sum(isinstance(x, tuple) for x in lay)
                p = torch.as_tensor(pix[None])
                p = torch.cat([p] * k, dim=1) if k > 1 else p  # (1, images, C, H, W): the same pixels each
                whole = model(input_ids=seq, pixel_values=p, use_cache=False).logits[0, -1].numpy()
                sim = llamacpp_graph_reference(model, fam, p)
                if sim is not None:
                    emb = lm.get_input_embeddings()(seq)
                    emb[0, seq[0] == image_id] = torch.as_tensor(sim[0])
                    graph = lm(inputs_embeds=emb, use_cache=False).logits[0, -1].numpy()
                    vs_graph = max(vs_graph, float(np.abs(got - graph).max()))
                vs_vlm = max(vs_vlm, float(np.abs(got - whole).max()))
                agree += int(got.argmax() == whole.argmax())
    finally:
        enc.close()
    return {"prompts": len(texts), "image_chunks": k, "positions": int(seq.shape[1]),
            "max_abs_logit_delta": vs_vlm, "top1_agreement": agree / len(texts),
            "max_abs_logit_delta_vs_llamacpp_graph": vs_graph if vs_graph else None}


def export_vlm(model_dir: Path, out: Path, cfg: VlmExportConfig = VlmExportConfig(), log=print) -> dict:
    """Both parts into out (atomically); returns vlm.json. A failed vision gate raises GateFailed unless
    accept_gate_failure (the language part's gate is the decoder exporter's own). The language model is exported
    first: llama.cpp's mmproj runs beside its GGUF."""
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from edgekit.arch import vlm_family_of
    from edgekit.export import ExportConfig, export_model
    from edgekit.exporters import get as get_backend
    from edgekit.exporters.vision import BACKENDS
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
    lang_cfg = ExportConfig(backend=cfg.language_backend, precision=cfg.language_precision,
                            context_length=cfg.context_length, accept_gate_failure=cfg.accept_gate_failure,
                            target=cfg.target,
                            # where the backend's artifact takes image_embeds (image_prompt_gate)
                            image_token_id=fam.image_token_id(mcfg)
                            if get_backend(cfg.language_backend).image_embeds else None)
    lang_cfg.resolved()  # refuse early
    vision_backend, vision_precision = cfg.vision()
    if vision_backend == "gguf":
        from edgekit.exporters.mmproj import check_supported

        check_supported(fam, mcfg)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with atomic_dir(Path(out)) as tmp:
        with tempfile.TemporaryDirectory(prefix="edgekit-lm-") as d:
            lm_dir = save_language_model(model, fam, model_dir, Path(d) / "lm")
            log(f"export: language model ({fam.language_family(mcfg).name}) -> {cfg.language_backend}")
            lang = export_model(lm_dir, tmp / "language", lang_cfg, log=log)
            gguf_lm = tmp / "language" / lang["entry"] if vision_backend == "gguf" else None
            vision = export_vision(model, fam, mcfg, model_dir, tmp / "vision", vision_backend, vision_precision,
                                   cfg.gate_images, cfg.target, gguf_lm, log)
            if gguf_lm is not None:  # recorded relative: the folder moves into place
                vision["language_gguf"] = str(Path("..") / "language" / lang["entry"])
            if gguf_lm is not None:  # the whole image prompt through llama.cpp, as the device runs it
                vision["llamacpp_image_prompt"] = llamacpp_prompt_check(model, fam, mcfg, model_dir,
                                                                        tmp / "vision" / vision["file"], gguf_lm)
            if not vision["gate"]["passed"] and not cfg.accept_gate_failure:
                raise vision_gate_error(vision)
            run = BACKENDS[vision_backend][1]
            meta = {**vision, "language_gguf": str(gguf_lm)} if gguf_lm is not None else vision
            recomposed = recompose_check(model, fam, model_dir, mcfg, lm_dir,
                                         lambda inp: run(tmp / "vision", meta, inp)[0], vision_precision)
            log(f"export: {vision_backend} image embeddings + the saved language model vs the whole PyTorch VLM on "
                f"image+text prompts: max |delta logit| {recomposed['max_abs_logit_delta']:.2e}")
            if not recomposed["passed"] and not cfg.accept_gate_failure:
                raise GateFailed(f"the split VLM ({vision_backend} vision + saved language model) differs from the "
                                 f"whole model (max |delta logit| {recomposed['max_abs_logit_delta']:.2e})",
                                 "report it with the model; --accept-gate-failure keeps the artifact")
            image_gate = None
            if lang.get("image_embeds"):  # the language artifact itself on image+text prompts (ORT, ExecuTorch)
                image_gate = image_prompt_gate(model, fam, mcfg, model_dir, tmp / "language", lang["precision"],
                                               lambda inp: run(tmp / "vision", meta, inp)[0])
                image_gate["vision_backend"] = vision_backend
                image_gate["overridden"] = bool(cfg.accept_gate_failure and not image_gate["passed"])
                log(f"export: {vision_backend} image embeddings -> {lang['backend']} {lang['precision']} language "
                    f"graph on image+text prompts vs PyTorch: mean KL {image_gate['mean_kl']:.2e}, top-1 "
                    f"{image_gate['top1_agreement']:.3f}, max |delta logit| {image_gate['max_abs_logit_delta']:.2e}")
                if not image_gate["passed"] and not cfg.accept_gate_failure:
                    raise GateFailed(f"the {lang['backend']} {lang['precision']} language graph fed {vision_backend} "
                                     f"image embeddings differs from PyTorch on image+text prompts: "
                                     f"{'; '.join(image_gate['failures'])}",
                                     "try a more faithful --precision, or --accept-gate-failure to keep the artifact")
        manifest = {"task": fam.task, "arch": fam.model_type, "source": str(model_dir),
                    "image_token_index": fam.image_token_id(mcfg), "image_tokens": fam.image_tokens(mcfg),
                    # the ids one image takes in a prompt (image tokens + the family's wrapping), for hosts
                    "image_prompt": fam.image_prompt(AutoTokenizer.from_pretrained(model_dir), mcfg),
                    "parts": fam.geometry(mcfg).parts(),
                    "recomposed": recomposed,
                    "vision": {"folder": "vision", **vision},
                    "language": {"backend": lang["backend"], "precision": lang["precision"], "folder": "language",
                                 "gate": lang.get("gate"),
                                 **({"image_gate": image_gate} if image_gate is not None else {})}}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
