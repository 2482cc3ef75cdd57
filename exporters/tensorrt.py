"""TensorRT (Jetson): the host prepares an fp16-safe ONNX graph and the exact trtexec build command for the target;
the engine itself is built ON the device (edgekit/runtime/tensorrt.py), because a TensorRT engine is tied to the GPU's
SM and to the TensorRT version that built it, and TensorRT cannot run on the workstation.

The fidelity gate therefore runs through ONNX Runtime on the same ONNX graph the engine is built from (the registry entry's host_gate);
the engine-level check (engine logits vs the PyTorch reference) happens on the device, in device_tests.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from edgekit.errors import EdgekitError

PLAN_FILE = "trt.json"
ENGINE_FILE = "model.engine"
TIMING_CACHE = "timing.cache"
FP16_MAX = 65504.0
# Highest ONNX opset each TensorRT release's ONNX parser accepts (onnx-tensorrt support matrix).
MAX_OPSET = ((10, 0, 20), (8, 6, 17), (8, 5, 17), (8, 4, 15), (8, 2, 13), (8, 0, 13), (7, 0, 11))


def parse_version(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def max_opset(trt_version: str) -> int:
    v = parse_version(trt_version)[:2]
    return next((op for major, minor, op in MAX_OPSET if v >= (major, minor)), 9)


def make_fp16_safe(model) -> dict:
    """Clamp float32 constants beyond fp16's range (e.g. the attention mask's float32-min fill) to +-65504, in every
    initializer, Constant and ConstantOfShape, subgraphs included: in an fp16 engine they would overflow to inf and
    turn masked attention scores into NaN. The fp32 result is unchanged (exp(-65504) is 0 as well)."""
    import numpy as np
    from onnx import AttributeProto, TensorProto, numpy_helper

    counts = {"tensors": 0, "values": 0}

    def fix(t: TensorProto) -> TensorProto | None:
        if t.data_type != TensorProto.FLOAT:
            return None
        a = numpy_helper.to_array(t)
        big = np.isfinite(a) & (np.abs(a) > FP16_MAX)
        if not big.any():
            return None
        counts["tensors"] += 1
        counts["values"] += int(big.sum())
        new = numpy_helper.from_array(np.where(big, np.sign(a) * FP16_MAX, a).astype(np.float32), t.name)
        return new

    def walk(graph):
        for i, init in enumerate(graph.initializer):
            if (new := fix(init)) is not None:
                graph.initializer[i].CopyFrom(new)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR and (new := fix(attr.t)) is not None:
                    attr.t.CopyFrom(new)
                elif attr.type == AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    return counts


def shape_spec(d: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in d.items())


def input_shapes(inputs: list[str], model: dict, seq: int, past: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every graph input for `seq` new tokens after `past` cached ones (batch 1)."""
    kv, hd = model["num_kv_heads"], model["head_dim"]
    out = {}
    for name in inputs:
        if name.startswith("past_key_values."):
            out[name] = (1, kv, past, hd)
        elif name == "attention_mask":
            out[name] = (1, past + seq)
        else:  # input_ids, position_ids
            out[name] = (1, seq)
    return out


def optimization_profile(inputs: list[str], model: dict, context: int) -> dict:
    """min: one token, empty cache; opt: one decode step at half the context (decode dominates generation time);
    max: a full-context prefill (per-dimension bounds: the cache can hold context-1 tokens)."""
    return {"min": input_shapes(inputs, model, 1, 0),
            "opt": input_shapes(inputs, model, 1, max(1, context // 2)),
            "max": {**input_shapes(inputs, model, context, context - 1),
                    **({"attention_mask": (1, context)} if "attention_mask" in inputs else {})}}


def workspace_mb(usable_bytes: int) -> int:
    """A quarter of the device's usable memory, 256 MB to 2 GB: the builder's scratch space for tactics."""
    return int(min(2048, max(256, usable_bytes // 4 >> 20)))


def build_command(plan: dict, onnx: str = "model.onnx", engine: str = ENGINE_FILE,
                  timing_cache: str = TIMING_CACHE) -> list[str]:
    """The trtexec argv (without the executable) that builds the engine on the device, for this TensorRT version."""
    v = parse_version(plan["tensorrt_version"])
    prof = plan["profile"]
    argv = [f"--onnx={onnx}", f"--saveEngine={engine}", f"--timingCacheFile={timing_cache}",
            f"--minShapes={shape_spec(prof['min'])}", f"--optShapes={shape_spec(prof['opt'])}",
            f"--maxShapes={shape_spec(prof['max'])}"]
    prec = plan["precision"]
    if prec == "fp16":
        argv.append("--fp16")
    elif prec == "int8":
        argv += ["--int8", "--fp16"]  # layers int8 can't take fall back to fp16, not fp32
    ws = plan["workspace_mb"]
    if v >= (10,):
        argv.append(f"--memPoolSize=workspace:{ws}M")
    elif v >= (8, 4):
        argv.append(f"--memPoolSize=workspace:{ws}")  # MiB in 8.4-8.6
    else:
        argv.append(f"--workspace={ws}")  # before --memPoolSize existed
    argv.append("--skipInference" if v >= (8, 6) else "--buildOnly")
    return argv


def bench_command(plan: dict, shapes: dict, warmup_ms: int, duration_s: float, iterations: int, times_file: str,
                  engine: str = ENGINE_FILE) -> list[str]:
    """trtexec argv that times the built engine at fixed shapes: warmup, then at least `iterations` queries and
    `duration_s` seconds (rounded up: whole seconds), every query's timing written to `times_file`."""
    return [f"--loadEngine={engine}", f"--shapes={shape_spec(shapes)}", f"--warmUp={int(warmup_ms)}",
            f"--duration={max(0, math.ceil(duration_s))}", f"--iterations={int(iterations)}",
            f"--exportTimes={times_file}"]


def stamp(target) -> dict:
    """What the engine will be tied to, from the target profile."""
    return {"target": target.name, "tensorrt_version": target.runtime.tensorrt, "gpu_sm": target.accelerator.compute_capability,
            "jetpack": target.runtime.jetpack, "l4t": target.runtime.l4t, "cuda": target.runtime.cuda}


def export(model_dir: Path, out: Path, cfg) -> dict:
    import onnx

    from edgekit.exporters.onnxruntime import EXTERNAL_DATA, OPSET, save_onnx, to_onnx
    from edgekit.export import model_summary

    target = getattr(cfg, "target", None)
    if target is None or not target.runtime.tensorrt or not target.accelerator.compute_capability:
        raise EdgekitError("a TensorRT export needs a target with runtime.tensorrt and accelerator.compute_capability "
                           "(the engine is tied to both)", "pass --target jetson-orin-nano-8gb (or your board)")
    limit = max_opset(target.runtime.tensorrt)
    if OPSET > limit:
        raise EdgekitError(f"{target.name}'s TensorRT {target.runtime.tensorrt} parses ONNX opset <= {limit}; "
                           f"edgekit's ONNX export is opset {OPSET}",
                           "use a board on JetPack 5 or newer, or --backend onnxruntime on this one")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    model = model_summary(config)
    context = min(cfg.context_length, model["max_position_embeddings"])
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        src = to_onnx(model_dir, Path(tmp))
        graph = onnx.load(str(src))  # external weights, if any, are read in
        fixed = make_fp16_safe(graph)
        inputs = [i.name for i in graph.graph.input]
        written = save_onnx(graph, out / "model.onnx")  # past protobuf's 2 GB: weights in model.onnx.data beside it
    plan = {**stamp(target), "precision": cfg.precision, "context_length": context, "inputs": inputs,
            "profile": optimization_profile(inputs, model, context),
            "workspace_mb": workspace_mb(target.memory.usable_bytes), "engine": ENGINE_FILE,
            "timing_cache": TIMING_CACHE, "fp16_safe": fixed, "opset": OPSET}
    plan["build_command"] = ["trtexec", *build_command(plan)]
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    return {"entry": "model.onnx", "opset": OPSET, "tensorrt": {k: plan[k] for k in (
                "target", "tensorrt_version", "gpu_sm", "jetpack", "l4t", "context_length", "workspace_mb")},
            "gate_runtime": "onnxruntime (fp32 ONNX, the engine's source); the engine is checked on the device"} | (
        {"external_data": EXTERNAL_DATA} if EXTERNAL_DATA in written else {})
