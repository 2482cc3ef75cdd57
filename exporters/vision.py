"""Vision-tower exporters: a VLM's vision tower + projector (pixel_values -> image embeddings, the vectors that replace
the <image> tokens) for each backend that declares one (ExporterSpec.vision in exporters/__init__.py).

Each backend here is two functions: `export(job) -> meta` writes the files into job.out, and `open(out, meta) -> run`
loads them in the backend's real runtime (`run(inputs) -> [outputs]`), which is what the gate
(edgekit/vlm/export.py) compares with PyTorch and the benchmark (edgekit/vlm/bench.py) times:
- onnxruntime: ONNX with a dynamic batch, run by ONNX Runtime;
- executorch: a .pte lowered to XNNPACK (batch 1, static image size), run by ExecuTorch's Python runtime;
- tensorrt: the same ONNX made fp16-safe plus trt.json (the target's TensorRT, an optimization profile over the batch,
  the trtexec build command); the engine is built on the device, so the host gate runs the ONNX in ONNX Runtime;
- gguf: llama.cpp's mmproj file (exporters/mmproj.py), run by llama.cpp's mtmd, which preprocesses images itself
  and so is fed the raw images at the tower's resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

ONNX_FILE = "vision_encoder.onnx"
PTE_FILE = "vision_encoder.pte"
VISION_OPSET = 17
TRT_MAX_BATCH = 4  # images per engine call: LLaVA-style prompts carry one or a few


@dataclass(frozen=True)
class VisionInputs:
    pixel_values: np.ndarray  # (B, C, H, W), preprocessed by the model's own image processor
    images: np.ndarray  # (B, H, W, 3) uint8 at the tower's resolution: the same pixels, before preprocessing


@dataclass(frozen=True)
class VisionJob:
    model: Any  # the loaded transformers VLM (fp32, eval)
    fam: Any  # its edgekit.arch VlmFamily
    mcfg: dict  # config.json
    model_dir: Path
    out: Path
    precision: str
    inputs: VisionInputs
    target: Any = None  # edgekit.target.Target (tensorrt)
    language_gguf: Path | None = None  # gguf: the language model file mtmd needs for its context


def output_names(fam) -> tuple[str, ...]:
    """What the exported graph returns: a VLM's image embeddings, or an image tower's token features + pooled
    embedding (VisionEncoderFamily.outputs)."""
    return tuple(getattr(fam, "outputs", ("image_embeds",)))


def encoder_module(model, fam):
    """torch.nn.Module: pixel_values -> a tuple of output_names(fam) through the family's module access."""
    import torch

    class _Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = fam.image_features(self.model, pixel_values)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return _Enc().eval()


# -- ONNX Runtime --------------------------------------------------------------------------------------------------

def _to_onnx(job: VisionJob, path: Path) -> None:
    import torch

    pix = torch.as_tensor(job.inputs.pixel_values[:2])  # batch 2: the legacy tracer keeps the batch dynamic
    names = output_names(job.fam)
    torch.onnx.export(encoder_module(job.model, job.fam), (pix,), str(path), input_names=["pixel_values"],
                      output_names=list(names), dynamic_axes={n: {0: "batch"} for n in ("pixel_values", *names)},
                      opset_version=VISION_OPSET, dynamo=False)


def onnxruntime_export(job: VisionJob) -> dict:
    _to_onnx(job, job.out / ONNX_FILE)
    return {"file": ONNX_FILE, "runtime": "onnxruntime"}


def onnxruntime_open(out: Path, meta: dict, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(Path(out) / meta["file"]), opts, providers=["CPUExecutionProvider"])
    return lambda inputs: sess.run(None, {"pixel_values": np.ascontiguousarray(inputs.pixel_values,
                                                                               dtype=np.float32)})


# -- TensorRT (engine built on the device) -------------------------------------------------------------------------

def tensorrt_export(job: VisionJob) -> dict:
    import onnx

    from edgekit.exporters.tensorrt import (TIMING_CACHE, build_command, make_fp16_safe, max_opset, stamp,
                                            workspace_mb)

    t = job.target
    if t is None or not t.runtime.tensorrt or not t.accelerator.compute_capability:
        raise EdgekitError("a TensorRT export needs a target with runtime.tensorrt and accelerator.compute_capability "
                           "(the engine is tied to both)", "pass --target jetson-orin-nano-8gb (or your board)")
    if VISION_OPSET > max_opset(t.runtime.tensorrt):
        raise EdgekitError(f"{t.name}'s TensorRT {t.runtime.tensorrt} parses ONNX opset <= "
                           f"{max_opset(t.runtime.tensorrt)}; the vision ONNX is opset {VISION_OPSET}",
                           "use a board on JetPack 5 or newer, or --vision-backend onnxruntime")
    _to_onnx(job, job.out / ONNX_FILE)
    graph = onnx.load(str(job.out / ONNX_FILE))
    fixed = make_fp16_safe(graph)
    onnx.save(graph, str(job.out / ONNX_FILE))
    rest = tuple(job.inputs.pixel_values.shape[1:])  # (C, H, W); Idefics3 batches (images, C, H, W) per prompt
    shape = lambda b: {"pixel_values": (b, *rest)}  # noqa: E731
    plan = {**stamp(t), "precision": job.precision, "inputs": ["pixel_values"],
            "profile": {"min": shape(1), "opt": shape(1), "max": shape(TRT_MAX_BATCH)},
            "workspace_mb": workspace_mb(t.memory.usable_bytes), "engine": "vision.engine",
            "timing_cache": TIMING_CACHE, "fp16_safe": fixed, "opset": VISION_OPSET}
    plan["build_command"] = ["trtexec", *build_command(plan, onnx=ONNX_FILE, engine="vision.engine")]
    (job.out / "trt.json").write_text(json.dumps(plan, indent=2) + "\n")
    return {"file": ONNX_FILE, "runtime": "onnxruntime (the engine's source ONNX; the engine runs on the device)",
            "trt_plan": "trt.json", "build_command": plan["build_command"]}


# -- ExecuTorch (XNNPACK) ------------------------------------------------------------------------------------------

def executorch_export(job: VisionJob) -> dict:
    import warnings

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgekit.exporters.executorch import delegation_summary, spell_out_tanh_gelu
    from edgekit.fsutil import atomic_write_bytes

    if job.precision != "fp32":
        raise EdgekitError(f"the ExecuTorch vision tower is built in fp32 only, not {job.precision}",
                           "use --vision-precision fp32")
    enc = encoder_module(job.model, job.fam)
    spell_out_tanh_gelu(enc)
    example = (torch.as_tensor(job.inputs.pixel_values[:1]),)  # batch 1: one image per call on a phone
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(enc, example, strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        summary = delegation_summary(edge)
        prog = edge.to_executorch()
    atomic_write_bytes(job.out / PTE_FILE, prog.buffer)
    return {"file": PTE_FILE, "runtime": "executorch", "batch": 1, "size_bytes": (job.out / PTE_FILE).stat().st_size,
            **summary}


def executorch_open(out: Path, meta: dict, threads: int | None = None):
    import torch
    from executorch.runtime import Runtime

    if threads:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(int(threads))
    program = Runtime.get().load_program(Path(out) / meta["file"])
    method = program.load_method("forward")

    def run(inputs: VisionInputs) -> list[np.ndarray]:
        rows = []
        for p in inputs.pixel_values:  # outputs live in the method's planned memory, which the next call reuses
            outs = method.execute([torch.from_numpy(np.ascontiguousarray(p[None], dtype=np.float32))])
            rows.append([np.array(o.numpy(), copy=True) for o in outs])
        return [np.concatenate(col) for col in zip(*rows)]

    run.program = program  # keeps the program alive as long as the method
    return run


# -- GGUF: llama.cpp's mmproj --------------------------------------------------------------------------------------

def gguf_export(job: VisionJob) -> dict:
    from edgekit.exporters.mmproj import ENTRY, write_mmproj

    pre = json.loads((job.model_dir / "preprocessor_config.json").read_text())
    info = write_mmproj(job.model, job.fam, job.mcfg, pre, job.out / ENTRY, job.precision)
    if job.language_gguf is None:
        raise EdgekitError("llama.cpp's mtmd needs the language model's GGUF to run an mmproj",
                           "export with -b gguf (the language model) together with --vision-backend gguf")
    return {"file": ENTRY, "runtime": "llama.cpp mtmd", "language_gguf": str(job.language_gguf), **info}


def gguf_open(out: Path, meta: dict, threads: int | None = None):
    from edgekit.exporters.mmproj import MtmdEncoder

    lm = Path(meta["language_gguf"])
    # one thread unless asked: ggml's thread pool spins at its barriers, and on a loaded 2-core host a tiny tower
    # took 780 ms per image with 2 threads against 0.9 ms with 1
    enc = MtmdEncoder(Path(out) / meta["file"], lm if lm.is_absolute() else Path(out) / lm, threads=threads or 1)

    def run(inputs: VisionInputs) -> list[np.ndarray]:
        return [np.stack([enc.encode(im) for im in inputs.images])]

    run.encoder = enc
    return run


# backend -> (export(job) -> meta, open(out, meta, threads) -> run(VisionInputs) -> [outputs])
OPENERS = {"onnxruntime": onnxruntime_open, "tensorrt": onnxruntime_open, "executorch": executorch_open,
           "gguf": gguf_open}
EXPORTERS = {"onnxruntime": onnxruntime_export, "tensorrt": tensorrt_export, "executorch": executorch_export,
             "gguf": gguf_export}


def _runner(name):
    def run(out: Path, meta: dict, inputs: VisionInputs) -> list[np.ndarray]:
        """Open, run once, close: what a gate needs (a benchmark keeps what OPENERS returns)."""
        fn = OPENERS[name](out, meta)
        try:
            return fn(inputs)
        finally:
            enc = getattr(fn, "encoder", None)
            if enc is not None:
                enc.close()
    return run


BACKENDS = {n: (EXPORTERS[n], _runner(n)) for n in EXPORTERS}
