"""llama.cpp's multimodal projector file (`mmproj`, GGUF arch `clip`) for a VLM's vision tower + projector, and the
runner that encodes images with it through llama.cpp's own mtmd library (libmtmd, shipped in llama-cpp-python).

What llama.cpp expects was read from its clip loader and llava graph (tools/mtmd): `clip.has_vision_encoder`,
`clip.has_llava_projector`, `clip.projector_type` ("mlp" for LLaVA's linear -> GELU -> linear), the vision geometry
under `clip.vision.*`, the image processor's mean/std, `clip.use_gelu` (else quick-GELU) and
`clip.vision.feature_layer` (non-negative indices into the hidden-state list; llama.cpp runs the encoder only up to
the deepest, and always drops the class token, i.e. transformers' "default" select strategy). Vision tensor names
come from gguf-py's own HF -> GGUF map for MODEL_ARCH.MMPROJ; the projector's are the family's (mm.0 / mm.2 for
LLaVA). A family without llama.cpp support (`mmproj_projector_type` None) is refused in one line.

Idefics3 / SmolVLM (projector type "idefics3", llama.cpp's SigLIP graph): every layer, the post-layernorm, a pixel
shuffle by `clip.vision.projector.scale_factor`, then `mm.model.fc`. llama.cpp adds position embedding rows in patch
order, transformers buckets them (Idefics3Family.full_image_positions, never 0..n-1), so the rows are written already
gathered. mtmd always slices an idefics3 image (>= 1 slice, then the global image, each image_size square) up to
`clip.vision.preproc_image_size` on its longest side: the processor's size when it splits, else image_size (one 1x1
slice + the global image; transformers' unsplit prompt has the global image only). Its template also looks up a
"\n\n" token (absent: token -1, refused before decoding).

llama.cpp preprocesses images itself (resize to image_size, then mean/std), so the gate feeds it images already at
the tower's resolution: no resize on either side, and the embeddings are compared with PyTorch's on the same pixels
(the whole image: an idefics3 prompt's global image, mtmd's last image chunk).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

ENTRY = "mmproj.gguf"
PRECISIONS = {"fp32": "f32", "fp16": "f16"}


def non_negative_layers(feature_layer, n_layers: int) -> list[int]:
    """transformers' vision_feature_layer (an index into hidden_states, which holds n_layers + 1 entries: the
    embeddings, then each layer's output) as llama.cpp's non-negative list."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    return [f if f >= 0 else n_layers + 1 + f for f in layers]


def check_supported(fam, mcfg: dict) -> None:
    if fam.mmproj_projector_type is None:
        raise EdgekitError(f"edgekit has no llama.cpp multimodal projector (mmproj) support for {fam.name} "
                           f"({fam.model_type}): no mmproj layout is registered for the family",
                           "export the vision tower with --vision-backend onnxruntime (or executorch); -b gguf still "
                           "exports the language model")
    if mcfg.get("vision_feature_select_strategy", "default") != "default":
        raise EdgekitError("llama.cpp's LLaVA graph always drops the class token; this model keeps it "
                           "(vision_feature_select_strategy 'full')",
                           "export the vision tower with --vision-backend onnxruntime")


def _llava_layout(mcfg: dict, preproc: dict) -> dict:
    import gguf

    feature = non_negative_layers(mcfg.get("vision_feature_layer", -2), mcfg["vision_config"]["num_hidden_layers"])
    # layers past the deepest feature layer are never run: not written; the graph reads a hidden state before the
    # post-layernorm
    return {"layers": max(feature), "post_norm": False,
            "kv": {gguf.Keys.Clip.HAS_LLAVA_PROJECTOR: True, "clip.vision.feature_layer": feature},
            "info": {"feature_layer": feature}}


def _idefics3_layout(mcfg: dict, preproc: dict) -> dict:
    import gguf

    edge = (preproc.get("size") if preproc.get("do_image_splitting", True) else preproc.get("max_image_size")) or {}
    longest = int(edge.get("longest_edge", mcfg["vision_config"].get("image_size", 384)))
    return {"layers": mcfg["vision_config"]["num_hidden_layers"], "post_norm": True,
            "kv": {gguf.Keys.ClipVision.Projector.SCALE_FACTOR: int(mcfg.get("scale_factor", 2)),
                   gguf.Keys.ClipVision.PREPROC_IMAGE_SIZE: longest},
            "info": {"scale_factor": int(mcfg.get("scale_factor", 2)), "preproc_image_size": longest}}


# the family's mmproj_projector_type -> its part of the file (layers run, post-norm read, its own keys)
LAYOUTS = {"mlp": _llava_layout, "idefics3": _idefics3_layout}


def write_mmproj(model, fam, mcfg: dict, preproc: dict, path: Path, precision: str) -> dict:
    """Write the vision tower + projector of a loaded VLM as an mmproj GGUF; returns what was written."""
    import gguf

    check_supported(fam, mcfg)
    dtype = PRECISIONS[precision]
    v = mcfg["vision_config"]
    n_layers = v["num_hidden_layers"]
    lay = LAYOUTS[fam.mmproj_projector_type](mcfg, preproc)
    keep = lay["layers"]
    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_name(Path(mcfg.get("_name_or_path") or "vlm").name or "vlm")
    w.add_file_type(0 if dtype == "f32" else 1)
    w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    w.add_clip_projector_type(fam.mmproj_projector_type)
    for k, val in lay["kv"].items():
        if isinstance(val, bool):
            w.add_bool(k, val)
        elif isinstance(val, int):
            w.add_uint32(k, val)
        else:
            w.add_array(k, val)
    w.add_vision_image_size(v.get("image_size", 224))
    w.add_vision_patch_size(v.get("patch_size", 32))
    w.add_vision_embedding_length(v["hidden_size"])
    w.add_vision_feed_forward_length(v["intermediate_size"])
    w.add_vision_projection_dim(int(mcfg["text_config"]["hidden_size"]))
    w.add_vision_head_count(v["num_attention_heads"])
    w.add_vision_attention_layernorm_eps(float(v.get("layer_norm_eps", 1e-5)))
    w.add_vision_block_count(keep)
    w.add_vision_image_mean([float(x) for x in preproc["image_mean"]])
    w.add_vision_image_std([float(x) for x in preproc["image_std"]])
    act = v.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh"):  # ggml's gelu is the tanh approximation
        raise EdgekitError(f"the vision tower's activation {act!r} has no llama.cpp CLIP equivalent",
                           "export the vision tower with --vision-backend onnxruntime")
    w.add_vision_use_gelu(act != "quick_gelu")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_layers)
    written = {}
    for name, t in fam.mmproj_tensors(model):
        if name.startswith("vision:"):
            hf = name[len("vision:"):]
            layer = hf.split("encoder.layers.")[1].split(".")[0] if "encoder.layers." in hf else None
            if layer is not None and int(layer) >= keep:
                continue
            if "post_layernorm" in hf and not lay["post_norm"]:
                continue
            gname = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise EdgekitError(f"no llama.cpp name for vision tensor {hf}", "report it as an edgekit bug")
        else:
            gname = name[len("projector:"):]
        a = t.detach().float().numpy()
        # norms, biases, class token stay f32; so do position rows (the SigLIP graph adds them as they are, and
        # ggml's CPU add has no f32 + f16)
        half = dtype == "f16" and a.ndim >= 2 and gname.endswith(".weight") and "position_embd" not in gname
        a = a.astype(np.float16 if half else np.float32)
        w.add_tensor(gname, a)
        written[gname] = list(a.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": len(written), "vision_layers": keep, **lay["info"],
            "projector_type": fam.mmproj_projector_type, "type": dtype}


class MtmdEncoder:
    """Encodes RGB images into image embeddings with llama.cpp's mtmd (the mmproj + a llama model for its context)."""

    def __init__(self, mmproj: Path, lm_gguf: Path, threads: int = 2):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        from edgekit.exporters.gguf import captured_stderr, llama_log

        self.mtmd = mtmd
        self._quiet = captured_stderr  # clip/mtmd log every load and encode on fd 2
        with captured_stderr(), llama_log():
            self.llm = llama_cpp.Llama(str(lm_gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                       logits_all=True, verbose=False,
                                       type_k=0, type_v=0)
            p = mtmd.mtmd_context_params_default()
            p.use_gpu, p.n_threads, p.print_timings, p.warmup = False, threads, False, False
            self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, p)
        if not self.ctx:
            raise EdgekitError(f"llama.cpp's mtmd cannot load {mmproj}", "re-export it; report it with the model")
        self.marker = mtmd.mtmd_default_marker()

    def close(self):
        if getattr(self, "ctx", None):
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None

    def _chunks(self, image: np.ndarray, text: str):
        mtmd = self.mtmd
        h, wd = image.shape[:2]
        buf = np.ascontiguousarray(image, dtype=np.uint8)
        bmp = mtmd.mtmd_bitmap_init(wd, h, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        t = mtmd.mtmd_input_text()
        raw = text.encode()
        t.text, t.text_len, t.add_special, t.parse_special = raw, len(raw), False, True
        chunks = mtmd.mtmd_input_chunks_init()
        arr = (mtmd.mtmd_bitmap_p_ctypes * 1)(bmp)
        rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(t), arr, 1)
        mtmd.mtmd_bitmap_free(bmp)
        if rc != 0:
            raise EdgekitError(f"llama.cpp's mtmd could not tokenize an image prompt (code {rc})",
                               "report it with the model")
        return chunks

    def encode(self, image: np.ndarray) -> np.ndarray:
        """(image_tokens, text hidden) for one HxWx3 uint8 image."""
        with self._quiet():
            return self._encode(image)

    def _encode(self, image: np.ndarray) -> np.ndarray:
        mtmd = self.mtmd
        chunks = self._chunks(image, self.marker.decode())
        try:
            # the whole image: LLaVA's only image chunk, an idefics3 prompt's global image (after its slices)
            c = [c for i in range(mtmd.mtmd_input_chunks_size(chunks))
                 if mtmd.mtmd_input_chunk_get_type(c := mtmd.mtmd_input_chunks_get(chunks, i)) == 1][-1:]
            if not c:
                raise EdgekitError("llama.cpp's mtmd produced no image chunk", "report it with the model")
            n = mtmd.mtmd_input_chunk_get_n_tokens(c[0])
            if mtmd.mtmd_encode_chunk(self.ctx, c[0]) != 0:
                raise EdgekitError("llama.cpp's mtmd failed to encode an image", "report it with the model")
            d = self.llm.n_embd()
            return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(n * d,)).reshape(n, d).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def layout(self, image: np.ndarray, text: str) -> list:
        """The prompt mtmd builds for [image][text]: token ids, with each image chunk as ("image", n_positions)."""
        mtmd = self.mtmd
        with self._quiet():
            chunks = self._chunks(image, self.marker.decode() + text)
        try:
            return _layout(mtmd, chunks)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)


def _layout(mtmd, chunks) -> list:
    out = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        c = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(c) == 0:
            out += _chunk_tokens(mtmd, c)
        else:
            out.append(("image", mtmd.mtmd_input_chunk_get_n_tokens(c)))
    if -1 in out:  # a piece the family's template looks up is not in the vocabulary; decoding it would crash
        raise EdgekitError("llama.cpp's mtmd put token -1 into the image prompt: the language model's vocabulary "
                           "lacks a token its image template looks up (idefics3: \"\\n\\n\")",
                           "use the model's own tokenizer (it has the token), or --vision-backend onnxruntime")
    return out


def image_prompt_logits(enc: "MtmdEncoder", image: np.ndarray, text_ids: list[int] | None = None,
                        text: str | None = None) -> np.ndarray:
    """llama.cpp's last-position logits for [image][text], the whole prompt evaluated by mtmd (the image encoded by
    the mmproj and decoded as embeddings, then the text) from an empty cache: the device's real path. Given
    `text_ids`, mtmd must tokenize their text back to exactly those ids, ending the prompt (a gate compares logits
    position for position)."""
    import llama_cpp

    mtmd = enc.mtmd
    lctx = enc.llm.ctx
    if text is None:
        text = enc.llm.detokenize(text_ids, special=True).decode("utf-8", "replace")
    with enc._quiet():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
        chunks = enc._chunks(image, enc.marker.decode() + text)
        try:
            lay = _layout(mtmd, chunks)
            last = max(i for i, t in enumerate(lay) if isinstance(t, tuple))
            got = lay[last + 1:]  # the text after the image (an idefics3 image also closes with a wrapping token)
            if text_ids is not None and got[len(got) - len(text_ids):] != list(text_ids):
                raise EdgekitError(f"llama.cpp's mtmd tokenized the prompt text as {got[:8]}..., not as the ids given",
                                   "report it with the model (the embedded tokenizer should round-trip)")
            n_past = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunks(enc.ctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
    if rc != 0:
        raise EdgekitError(f"llama.cpp's mtmd failed to evaluate an image prompt (code {rc})", "report it with the model")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(enc.llm.model))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,)).copy()


def f16_runtime_failure(vision: dict) -> tuple[str, str] | None:
    """(problem, fix) when an f32 idefics3 mmproj misses only the max |delta| bound, by what llama.cpp's CPU graph
    computes in f16 whatever the file's type: measured on the tiny model, its patch convolution alone (pixels and
    kernel rounded to f16 reproduce it to 1e-6 with the layers zeroed); the layers add as much again."""
    g = vision["gate"]
    th = g.get("thresholds") or {}
    if vision.get("projector_type") != "idefics3" or vision.get("type") != "f32" or \
            g["min_cosine"] < th.get("min_cosine", 1.0):
        return None
    import llama_cpp

    return (f"llama.cpp's mtmd (llama-cpp-python {llama_cpp.__version__}) runs parts of the idefics3 tower in f16 "
            f"even from an f32 mmproj (its patch convolution among them): max |delta| {g['max_abs_delta']:.2e} > "
            f"{th['max_abs_delta']:g} at min cosine {g['min_cosine']:.7f}",
            "use --vision-precision fp16, whose bounds this meets; --vision-backend onnxruntime for fp32 fidelity; or "
            "--accept-gate-failure to keep the mmproj")


def _chunk_tokens(mtmd, chunk) -> list[int]:
    n = ctypes.c_size_t(0)
    p = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [int(p[i]) for i in range(n.value)]


def llamacpp_graph_reference(model, fam, pixel_values):
    """What llama.cpp's LLaVA graph computes, in PyTorch: the class token appended after the patches, position
    embeddings taken in sequence order, and rows 1..n_patches gathered (llama.cpp issue #25814), i.e. patch 0 dropped
    and the class token kept. Lets the gate tell a wrong file from that runtime behaviour; None where it does not
    apply (no class token, several feature layers)."""
    import torch

    if fam.mmproj_projector_type != "mlp":
        return None
    cfg = model.config
    tower = fam.vision_tower(model).vision_model
    emb = tower.embeddings
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int) or getattr(emb, "class_embedding", None) is None:
        return None
    n = len(tower.encoder.layers)
    keep = non_negative_layers(layer, n)[0]
    with torch.no_grad():
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        h = torch.cat([patches, cls], 1) + emb.position_embedding.weight[None]
        h = tower.pre_layrnorm(h)
        for blk in tower.encoder.layers[:keep]:
            out = blk(h, None, None)
            h = out[0] if isinstance(out, tuple) else out
        return model.model.multi_modal_projector(h[:, 1:]).numpy()
