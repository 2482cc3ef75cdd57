"""Quantization-aware training (QAT) by distillation: the student trains through the exporter's own quantization grid.

`edgekit distill --qat 8da4w` (ExecuTorch) or `--qat int4` (ONNX Runtime MatMulNBits) swaps the student's linears
for torchao's FakeQuantizedLinear (torchao.quantization.qat, the same module torchao's QATConfig prepare step
installs; int4's asymmetric grid with integer zero points uses edgekit's own weight quantizer in it) for the last
part of training; the forward pass then
sees the weights (and activations) exactly as the runtime will, while the gradient passes straight through the
rounding to the float weights. After training the swap is undone (torchao's `to_linear`, the weights stay the trained
float numbers) and the folder records the scheme in qat.json. Export reads it and quantizes those weights with the
same grid and scale rule by round-to-nearest: calibrated rounding (GPTQ, importance matrices) would move them off
the grid QAT trained for.

A recipe says what the fake quantization is; each QAT-able precision names its recipe in the precision registry
(edgekit/precision.py `fake_quant`). Which linears a recipe covers is read through the model family (edgekit/arch);
which of them stay at 8 bits is the exporter's list (its module's name suffixes). Importing this module imports no
torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.exporters.executorch_mix import EIGHT_BIT as XNNPACK_EIGHT_BIT
from edgekit.exporters.onnxruntime import GROUP_SIZES as ORT_GROUPS
from edgekit.exporters.onnxruntime import QAT_EIGHT_BIT as ORT_EIGHT_BIT

QAT_FILE = "qat.json"
SCALES_FILE = "qat_scales.safetensors"  # the fixed scales a GPTQ-initialised QAT trained on (export rounds with them)
DEFAULT_GROUP = 32
INITS = ("gptq", "learned", "max")
LEARNED_LR = 0.01  # a learned scale tensor's peak learning rate, as a fraction of its median scale (Adam: ~1%/step)
# AWQ's rule, one exponent for all layers (`equalize`). SmolLM2 pruned 30%, int4asym-mix round-to-nearest on the fp32
# student: 1.073x its perplexity without; gate/up alone at alpha 0.25 1.048x (0.5: 1.051x); gate/up and o 1.045x.
# Not for 8da4w: its QAT at 16k tokens went 1.064x -> 1.072x with it (symmetric groups, int8 per-token activations)
EQUALIZE_ALPHA = 0.25


@dataclass(frozen=True)
class Recipe:
    name: str
    weight_bits: int
    act_int8_per_token: bool  # dynamic asymmetric int8 activations per token (XNNPACK's qd8)
    scale_dtype: str  # the dtype group scales are rounded to, as the runtime stores them
    lm_head: bool  # the output head is fake-quantized too
    description: str
    # the linears (last part of the module name) the exporter keeps at 8 bits, and so training quantizes at 8 bits
    eight_bit: tuple[str, ...] = ()
    # False: asymmetric groups with an integer zero point (`asym_grid`, edgekit's own fake quantizer: torchao's
    # per-group asymmetric path derives float-domain zero points and then casts them to int, which is not this grid)
    symmetric: bool = True
    groups: tuple[int, ...] | None = None  # the group sizes the runtime's kernels take (None: any even size)
    # activation-aware scales folded into gate/up before training (`equalize`): their exponent, 0 = none
    equalize: float = 0.0


RECIPES = {r.name: r for r in (
    # torchao's symmetric rule: scale = max|w| / 7.5 per group, q = clamp(round(w / scale), -8, 7); XNNPACK stores
    # the scales in bf16, so they are rounded to bf16 before rounding the weights (exporters/executorch.py does too)
    # every linear at 4 bits: what QAT folders written before the mix trained for (their export stays all-4-bit)
    Recipe("int8dyn-int4sym", 4, True, "bfloat16", True,
           "int8 dynamic per-token activations x int4 symmetric per-group weights (torchao 8da4w, bf16 scales)"),
    # the exporter's mix: the head, down, k and v at int8 per output channel (fp32 scales, XNNPACK qc8w), the rest
    # 4-bit as above. Training all of them at 4 bits costs what the mix avoids: SmolLM2 pruned 30%, 16k tokens,
    # fake-quant perplexity rose from 1.11x to 1.47x the fp32 student (bench/qat_recovery.py)
    Recipe("int8dyn-int4sym-mix", 4, True, "bfloat16", True,
           "int8 dynamic per-token activations x int4 symmetric per-group weights, the head, down, k and v "
           "projections int8 per channel (torchao 8da4w as edgekit exports it)", eight_bit=XNNPACK_EIGHT_BIT),
    # ONNX Runtime MatMulNBits' fast path: uint4 codes, an fp32 scale and a uint8 zero point per group (float zero
    # points run a 50x slower kernel, exporters/onnxruntime.py); down and q/k/v (fused into one MatMul in the lean
    # graph) on the same rule at 8 bits, as 8da4w keeps down, k and v. SmolLM2 pruned 30%, round-to-nearest on the
    # fp32 student: every linear 4-bit 1.262x its perplexity, this mix 1.073x (QAT at 16k tokens: 1.060x,
    # bench/qat_recovery.py --scheme int4). The head keeps the exporter's 8-bit round-to-nearest, untrained
    Recipe("int4asym-mix", 4, False, "float32", False,
           "int4 asymmetric per-group weights with integer zero points, down and q/k/v at 8 bits on the same rule, "
           "float activations, the LM head int8 (ONNX Runtime MatMulNBits as edgekit exports a QAT model)",
           eight_bit=ORT_EIGHT_BIT, symmetric=False, groups=ORT_GROUPS, equalize=EQUALIZE_ALPHA),
)}


@dataclass(frozen=True)
class QATPlan:
    scheme: str  # canonical precision name
    backend: str
    group_size: int
    recipe: str
    start_fraction: float = 0.0  # fake quantization from this fraction of the steps on (0 = the whole run)
    # "max": torchao's own rule, scales re-derived from max |w| at every step; "gptq": at the switch GPTQ rounds the
    # weights onto the grid on the calibration text and the scales stay fixed from then on, so QAT starts from what
    # post-training quantization would ship. Measured worse (SmolLM2 pruned 30%, 16k tokens, bench/qat_recovery.py:
    # 1.39x the fp32 student from step 0 against max's 1.064x; 1.098x against 1.093x from half way), so opt-in;
    # "learned": max's scales at the switch, then trained with the weights (LSQ: the scales are Parameters and the
    # straight-through gradient reaches them; torchao's range learning), saved like GPTQ's for export
    init: str = "max"
    equalize: float = 0.0  # the recipe's `equalize` exponent, applied before the first step (0 = none)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(scheme: str, backend: str | None = None, group_size: int | None = None,
            start_fraction: float = 0.0, init: str = "max", equalize: float | None = None) -> QATPlan:
    """The QAT request as a plan, refused in one line when the backend lacks the scheme or the scheme has no recipe
    (torch-free: runs before any model loads)."""
    from edgekit.exporters import REGISTRY, get
    from edgekit.precision import backends_for, get_precision, qat_schemes

    p = get_precision(scheme)
    able = [b for b in backends_for(p.name)]
    if backend is not None:
        spec = get(backend)
        if p.name not in spec.precisions:
            mine = [s for s in qat_schemes() if s in spec.precisions]
            where = f"; {p.name} is built by {', '.join(able)}" if able else ""
            raise EdgekitError(f"backend {spec.name} cannot lower the QAT scheme {p.name!r}{where}",
                               f"pass --qat {' or --qat '.join(mine)}" if mine else
                               f"QAT-able schemes: {', '.join(f'{s} ({backends_for(s)[0]})' for s in qat_schemes())}")
    if not p.fake_quant:
        raise EdgekitError(f"precision {p.name} has no quantization-aware training recipe in edgekit",
                           f"pass {' or '.join(f'--qat {q} (-b {backends_for(q)[0]})' for q in qat_schemes())}, "
                           f"or distill without --qat and export -p {p.name} afterwards")
    if backend is None:
        backend = able[0]
    elif backend not in REGISTRY:
        get(backend)
    g = DEFAULT_GROUP if group_size is None else int(group_size)
    if g < 2 or g % 2:
        raise EdgekitError(f"QAT group size must be an even number >= 2, got {g}", f"e.g. --group-size {DEFAULT_GROUP}")
    groups = RECIPES[p.fake_quant].groups
    if groups and g not in groups:
        raise EdgekitError(f"{backend} {p.name} takes group sizes {', '.join(map(str, groups))}, not {g}",
                           f"pass --group-size {groups[0]}")
    if not 0 <= start_fraction < 1:
        raise EdgekitError(f"--qat-start must be in [0, 1), got {start_fraction}",
                           "0 = fake quantization for the whole run, 0.5 = the second half")
    if init not in INITS:
        raise EdgekitError(f"unknown QAT start {init!r}", f"pass --qat-init {' or --qat-init '.join(INITS)}")
    if init != "max" and not RECIPES[p.fake_quant].symmetric:
        raise EdgekitError(f"--qat-init {init} is for symmetric grids (8da4w); {p.name} QAT trains on max's rule",
                           "drop --qat-init (or pass --qat-init max)")
    eq = RECIPES[p.fake_quant].equalize if equalize is None else float(equalize)
    if not 0 <= eq <= 1:
        raise EdgekitError(f"--qat-equalize must be in [0, 1], got {eq}",
                           f"0 = no equalization, {EQUALIZE_ALPHA} = the measured default")
    return QATPlan(p.name, backend, g, p.fake_quant, float(start_fraction), init, eq)


def recipe(plan: QATPlan) -> Recipe:
    return RECIPES[plan.recipe]


def target_linears(model, rec: Recipe) -> list[tuple[str, object]]:
    """(name, module) of every linear the recipe fake-quantizes, found through the model's family: the attention and
    MLP projections of each layer (fused ones once) and, when the recipe quantizes it, the output head."""
    from edgekit.arch import get_family

    fam = get_family(model.config.model_type)
    mods = []
    for layer in fam.layers(model):
        mods += [p.module for p in fam.qkv(layer)] + [fam.o(layer)] + [p.module for p in fam.gate_up(layer)]
        mods.append(fam.down(layer))
    if rec.lm_head:
        mods.append(model.get_output_embeddings())
    names = {id(m): n for n, m in model.named_modules()}
    out, seen = [], set()
    for m in mods:
        if id(m) not in seen:
            seen.add(id(m))
            out.append((names[id(m)], m))
    return out


def check_widths(model, plan: QATPlan) -> None:
    """Every fake-quantized linear's input width must be a multiple of the group size (one line naming them)."""
    bad = [(n, m.in_features) for n, m in target_linears(model, recipe(plan))
           if m.in_features % plan.group_size and (bits(plan, n) == 4 or not recipe(plan).symmetric)]
    # (a symmetric 8-bit linear has one scale per row, which takes any width)
    if bad:
        widths = sorted({w for _, w in bad})
        shown = ", ".join(f"{n} (in {w})" for n, w in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        ok = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        raise EdgekitError(f"QAT group size {plan.group_size} does not divide the input width of {len(bad)} linear(s): "
                           f"{shown}", f"pass --group-size {ok[0]}" if ok else
                           f"pass a --group-size that divides {', '.join(map(str, widths))}")


def bits(plan: QATPlan, name: str) -> int:
    """The weight bits the plan's recipe trains (and the exporter lowers) this linear at."""
    rec = recipe(plan)
    return 8 if name.rpartition(".")[2] in rec.eight_bit else rec.weight_bits


def fake_quant_configs(plan: QATPlan, name: str = "", fixed: bool = False, learned: bool = False):
    """(activation, weight) torchao IntxFakeQuantizeConfig of the plan's recipe for the linear called `name`;
    `fixed`: the weight scales are set once (GPTQ's) instead of re-derived from the weight at every step;
    `learned`: set once, then trained (torchao's range learning)."""
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    rec = recipe(plan)
    assert rec.symmetric, "asymmetric recipes use edgekit's own quantizer (weight_quantizer), not a torchao config"
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if rec.act_int8_per_token else None
    if bits(plan, name) == 8:  # one fp32 scale per output row, as the exporter hands qc8w its scales
        return act, IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True,
                                           is_dynamic=not (fixed or learned), range_learning=learned)
    weight = IntxFakeQuantizeConfig(getattr(torch, f"int{rec.weight_bits}"), group_size=plan.group_size,
                                    is_symmetric=True, scale_precision=getattr(torch, rec.scale_dtype),
                                    is_dynamic=not (fixed or learned), range_learning=learned)
    return act, weight


def asym_grid(weight, group: int, bits: int = 4):
    """(codes in [0, 2^bits - 1], fp32 scales, integer-valued zero points), scales and zero points (rows, in / group),
    of `weight` (rows, in) in groups of `group` along its input: scale = (max - min) / (2^bits - 1) over the group
    with 0 kept inside the range (so the integer zero point round(-min / scale) always lies on the grid), code =
    clamp(round(w / scale) + zero). Dequantized: (code - zero) * scale, as MatMulNBits computes it. One function
    for the fake quantizer and the exporter, so what trains is what ships."""
    import torch

    top = 2**bits - 1
    g = weight.detach().float().reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / top).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, top)
    codes = torch.clamp(torch.round(g / scale) + zero, 0, top)
    rows = weight.shape[0]
    return codes.reshape(weight.shape), scale.reshape(rows, -1), zero.reshape(rows, -1)


def asym_dequant(codes, scale, zero, group: int):
    return ((codes.reshape(-1, group) - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(codes.shape)


def weight_quantizer(group: int, bits: int = 4):
    """A weight fake quantizer on `asym_grid`: max's rule re-derived at every step, the gradient straight through
    the rounding (nothing is clipped: the range covers every weight). Stands in FakeQuantizedLinear's
    weight_fake_quantizer slot."""
    import torch

    class AsymGroupFakeQuantizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.group, self.bits, self.scale, self.zero_point = group, bits, None, None

        def forward(self, w):
            with torch.no_grad():
                codes, self.scale, self.zero_point = asym_grid(w, self.group, self.bits)
                dq = asym_dequant(codes, self.scale, self.zero_point, self.group).to(w.dtype)
            return w + (dq - w).detach()

        def extra_repr(self) -> str:
            return f"uint{self.bits} asymmetric, group {self.group}, integer zero points"

    return AsymGroupFakeQuantizer()


def equalize(model, plan: QATPlan, calibration: list) -> int:
    """Fold activation-aware scales into the linears' inputs (AWQ's rule with one exponent): a channel c of the
    input x gets s_c = mean|x_c|^alpha (measured on `calibration`, batches of token ids; normalized to a geometric
    mean of 1 between its extremes), its weight column is multiplied by s_c and whatever produces x is divided by
    it, so the model computes the same function while channels that carry large activations get a finer grid.
    Two places per layer, found through the family: gate/up, whose input is the MLP-input norm's output (its gain
    divided; Gemma's norms scale by 1 + w; a fused gate_up once); o_proj, whose input is attention's mix of v (v's
    rows and bias divided; one scale per kv head and dimension, shared by the query heads of a GQA group, from
    their mean). In place, before training. Returns how many layers."""
    import torch

    from edgekit.arch import get_family
    from edgekit.arch.base import MLP_IN

    fam = get_family(model.config.model_type)
    alpha, hd = plan.equalize, fam.head_dim(model.config.to_dict())
    layers = fam.layers(model)
    at = fam.norm_roles.index(MLP_IN)
    sums, hooks = {}, []

    def hook(key):
        def add(_, args):
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + x.sum(0)
        return add

    for i, layer in enumerate(layers):
        hooks.append(fam.gate_up(layer)[0].module.register_forward_pre_hook(hook((i, "mlp"))))
        hooks.append(fam.o(layer).register_forward_pre_hook(hook((i, "o"))))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            for ids in calibration:
                model(input_ids=(ids if ids.dim() == 2 else ids[None]).to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)

    def scales(m):
        s = m.clamp(min=1e-6) ** alpha
        return s / (s.max() * s.min()).sqrt()

    with torch.no_grad():
        for i, layer in enumerate(layers):
            s = scales(sums[(i, "mlp")])
            for m in {id(p.module): p.module for p in fam.gate_up(layer)}.values():
                m.weight.mul_(s.to(m.weight.dtype))
            norm, off = fam.layer_norms(layer)[at], fam.norm_offset
            norm.weight.copy_(((off + norm.weight.float()) / s - off).to(norm.weight.dtype))
            o, v = fam.o(layer), fam.qkv(layer)[2]
            kv, heads = (v.stop - v.start) // hd, o.in_features // hd
            s = scales(sums[(i, "o")].reshape(kv, heads // kv, hd).mean(1))  # (kv heads, head_dim)
            v.module.weight[v.rows] /= s.reshape(-1, 1).to(v.module.weight.dtype)
            if v.module.bias is not None:
                v.module.bias[v.rows] /= s.reshape(-1).to(v.module.bias.dtype)
            o.weight.mul_(s[:, None, :].expand(kv, heads // kv, hd).reshape(-1).to(o.weight.dtype))
    return len(layers)


def calibrate(model, plan: QATPlan, calibration: list) -> dict:
    """The GPTQ start: round the recipe's linears onto its grid by GPTQ on `calibration` (batches of token ids), in
    place (the same Parameters), as the 8da4w exporter does after training without QAT; returns name -> scales."""
    import torch

    from edgekit.exporters.executorch import gptq_grid

    names = [n for n, _ in target_linears(model, recipe(plan))]
    was = model.training
    model.eval()
    with torch.no_grad():
        scales = gptq_grid(model, {n for n in names if bits(plan, n) == 8}, plan.group_size, calibration,
                           in_place=True)
    model.train(was)
    return {n: s for n, s in scales.items() if n in names}


def prepare(model, plan: QATPlan, scales: dict | None = None) -> int:
    """Swap the recipe's linears for torchao FakeQuantizedLinear in place (the Parameters are the same objects, so
    an optimizer built before keeps its state and a tied head stays tied); with `scales` (name -> tensor, from
    `calibrate` or `load_scales`) each weight quantizer keeps those scales fixed. A `learned` plan's scales start at
    `scales` or at max's rule and become Parameters (`learned_scales`: add them to the optimizer). Returns how many."""
    import torch
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    check_widths(model, plan)
    learn = plan.init == "learned"
    rec = recipe(plan)
    n = 0
    for name, mod in target_linears(model, rec):
        if isinstance(mod, FakeQuantizedLinear):
            continue
        if not rec.symmetric:  # edgekit's own quantizer in FakeQuantizedLinear's slot (no torchao config for it)
            fq = FakeQuantizedLinear.from_linear(mod)
            fq.weight_fake_quantizer = weight_quantizer(plan.group_size, bits(plan, name))
            model.set_submodule(name, fq)
            n += 1
            continue
        start = scales.get(name) if scales is not None else None
        if learn and start is None:
            start = weight_grid(mod.weight, plan, name)[1]  # max's scales, rounded as the runtime stores them
        fq = FakeQuantizedLinear.from_linear(mod, *fake_quant_configs(plan, name, start is not None, learn))
        if start is not None:
            wq = fq.weight_fake_quantizer
            start = start.detach().to(mod.weight.device, torch.float32).clone()
            wq.scale = torch.nn.Parameter(start) if learn else start
            wq.zero_point = torch.zeros_like(start, dtype=torch.int32)
        model.set_submodule(name, fq)
        n += 1
    return n


def learned_scales(model) -> list:
    """The trainable scale Parameters of a `learned` plan's fake-quantized linears, in module order."""
    import torch
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return [m.weight_fake_quantizer.scale for m in model.modules() if isinstance(m, FakeQuantizedLinear)
            and isinstance(getattr(m.weight_fake_quantizer, "scale", None), torch.nn.Parameter)]


def clamp_learned_scales(model, floor: float = 1e-8) -> None:
    import torch

    with torch.no_grad():
        for p in learned_scales(model):
            p.clamp_(min=floor)


def round_learned_scales(model, plan: QATPlan) -> None:
    """Round every learned scale as the runtime stores it (bf16 for 4-bit groups), in place: training's last forward
    passes and the export then use one grid."""
    import torch

    dtype = getattr(torch, recipe(plan).scale_dtype)
    with torch.no_grad():
        for name, m in model.named_modules():
            wq = getattr(m, "weight_fake_quantizer", None)
            if wq is not None and isinstance(wq.scale, torch.nn.Parameter) and bits(plan, name) == 4:
                wq.scale.copy_(wq.scale.to(dtype).float())


def fixed_scales(model) -> dict:
    """name -> the fixed weight scales of every fake-quantized linear that has them (what `prepare` was given)."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return {n: m.weight_fake_quantizer.scale.detach().clone() for n, m in model.named_modules()
            if isinstance(m, FakeQuantizedLinear) and isinstance(m.weight_fake_quantizer, IntxFakeQuantizer)
            and not m.weight_fake_quantizer.config.is_dynamic}


def save_scales(folder: Path, scales: dict) -> None:
    from safetensors.torch import save

    from edgekit.fsutil import atomic_write_bytes

    atomic_write_bytes(Path(folder) / SCALES_FILE, save({n: s.contiguous().float() for n, s in scales.items()}))


def load_scales(folder: Path, plan: QATPlan | None = None) -> dict | None:
    """The fixed scales a folder's QAT trained on, or None (a `max` start re-derives them from the weights); with
    the folder's `plan`, a GPTQ start whose scales are missing is refused (its grid cannot be re-derived)."""
    f = Path(folder) / SCALES_FILE
    if not f.is_file():
        if plan is not None and plan.init in ("gptq", "learned"):
            raise EdgekitError(f"{f.name} is missing from {folder}: its QAT trained on {plan.init} scales, which "
                               "only that file holds", "restore it from the distill output, or export with -p fp32")
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except Exception as e:  # noqa: BLE001 safetensors raises its own error types for a truncated or foreign file
        raise EdgekitError(f"{f} is not a scales file edgekit wrote ({e})",
                           "restore it from the distill output; export cannot round on the trained grid without it"
                           ) from e


def convert(model) -> int:
    """Undo `prepare`: plain nn.Linear with the trained float weights (the exporter quantizes them); how many."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    fq = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]
    for n, m in fq:
        model.set_submodule(n, m.to_linear())
    return len(fq)


def weight_grid(weight, plan: QATPlan, name: str = "", scale=None):
    """(fake-quantized weight, fp32 group scales) exactly as training's weight fake quantizer computes them for the
    linear called `name` (with its fixed `scale` when training had one): the exporter hands both to torchao (custom
    scales), which re-derives the very integers QAT trained through."""
    import torch
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    rec = recipe(plan)
    if not rec.symmetric:
        codes, scale, zero = asym_grid(weight, plan.group_size, bits(plan, name))
        return asym_dequant(codes, scale, zero, plan.group_size).to(weight.dtype), scale
    fq = FakeQuantizerBase.from_config(fake_quant_configs(plan, name, scale is not None)[1])
    if scale is not None:
        fq.scale, fq.zero_point = scale.to(weight.device), torch.zeros_like(scale, dtype=torch.int32)
    with torch.no_grad():
        w = fq(weight.detach())
    return w, fq.scale.float()


def export_settings(plan: QATPlan, backend: str, precision: str | None, group_size: int | None) -> dict:
    """ExportConfig fields for exporting a QAT-trained folder: its scheme, group and plain rounding on its own
    backend; a float precision exports as asked (the QAT is unused then); another quantized format is refused."""
    from edgekit.precision import get_precision

    asked = get_precision(precision) if precision is not None else None
    if (asked is not None and not asked.quantized) or (asked is None and backend != plan.backend):
        return {}  # a float artifact (another backend's default is its most faithful precision)
    if backend != plan.backend or (asked is not None and asked.name != plan.scheme):
        what = f"{backend} {asked.name}" if asked is not None else backend
        raise EdgekitError(f"this model was quantization-aware trained for {plan.backend} {plan.scheme} "
                           f"({QAT_FILE}); exporting it as {what} would quantize it on a grid it was not trained for",
                           f"export with -b {plan.backend} -p {plan.scheme}, or -p fp32")
    if group_size is not None and group_size != plan.group_size:
        raise EdgekitError(f"this model was quantization-aware trained with group size {plan.group_size}, not "
                           f"{group_size}", f"drop --group-size or pass --group-size {plan.group_size}")
    return {"precision": plan.scheme, "group_size": plan.group_size, "calibrate": False, "qat": plan}


def write(folder: Path, plan: QATPlan, extra: dict | None = None) -> None:
    from edgekit.fsutil import atomic_write_json

    atomic_write_json(Path(folder) / QAT_FILE, {**plan.to_dict(), **(extra or {})})


def read(folder: Path) -> QATPlan | None:
    """The QAT plan a distilled folder was trained for, or None."""
    f = Path(folder) / QAT_FILE
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
        return QATPlan(d["scheme"], d["backend"], int(d["group_size"]), d["recipe"], float(d.get("start_fraction", 0)),
                       d.get("init", "max"), float(d.get("equalize", 0.0)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise EdgekitError(f"{f} is not a QAT record edgekit wrote ({e})",
                           "restore it from the distill output, or delete it to export as a plain model") from e


__all__ = ["DEFAULT_GROUP", "EQUALIZE_ALPHA", "INITS", "LEARNED_LR", "QATPlan", "QAT_FILE", "RECIPES", "Recipe",
           "SCALES_FILE", "asym_dequant", "asym_grid", "bits", "calibrate", "check_widths", "clamp_learned_scales",
           "convert", "equalize", "export_settings", "fixed_scales", "learned_scales", "load_scales", "prepare",
           "read", "resolve", "round_learned_scales", "save_scales", "target_linears", "weight_grid",
           "weight_quantizer", "write"]
