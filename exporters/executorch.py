"""ExecuTorch: a .pte lowered to XNNPACK with prefill and decode over a static KV cache; optional 8da4w weights.

The Hugging Face model runs unchanged inside a thin wrapper that owns the cache: one K and one V buffer per layer,
`max_context` long, mutated in place (ExecuTorch keeps mutable buffers inside the loaded method between calls).
`forward(input_ids (1, T), input_pos (T,)) -> logits (1, T, vocab)` has a dynamic T up to one prefill chunk
(MAX_CHUNK), so one method serves prefill and single-token decode; the runner splits longer prompts. ExecuTorch
plans (and the Python runtime allocates) activations for T's upper bound, so bounding T by the context instead cost
SmolLM2 about 1 GB at 2048 tokens of context. The causal mask is built from `input_pos` over the whole cache, so
positions not yet written never take part in attention (they need no zeroing on reset).

A VLM's language model (cfg.image_token_id set) takes two more inputs, `image_embeds (1, T, hidden)` and
`image_mask (1, T, 1)`: where the mask is 1 the position's embedding is that row (the image features, as
transformers' masked_scatter places them), elsewhere the table's. Rows travel per position, sharing T's dynamic dim,
because a (k, hidden) input spliced in the graph needs nonzero/masked_scatter, whose data-dependent shapes neither
torch.export's static planning nor XNNPACK take; a text call feeds a zero mask and computes the plain graph's logits.

8da4w = int8 dynamic activations, int4 weights in groups of GROUP_SIZE input channels (torchao), with the head,
down_proj, k_proj and v_proj at int8 per channel (exporters/executorch_mix.py says why). torchao and
ExecuTorch's own recipe quietly leave a linear in fp32 when its input width is not a multiple of the group size;
here that is an error that names the linears and the fix, and every linear is checked to be quantized afterwards.

This module imports torch at the top: the registry imports it only when the executorch backend is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.errors import EdgekitError
from edgekit.exporters.executorch_mix import keeps_8_bits  # torch-free: the planner counts the same mix

ENTRY = "model.pte"
GROUP_SIZE = 32  # 8da4w weight group (input channels per scale); XNNPACK's kernels take multiples of 32
MAX_CONTEXT = 2048  # a static cache costs memory and per-step attention over its whole length: cap it
MAX_CHUNK = 512  # tokens per call: activations are planned for this many, not for the whole context
EXAMPLE_TOKENS = 2  # export traces with T=2 so that neither 0 nor 1 gets specialized into the graph


@dataclass(frozen=True)
class LayerCache:
    kv_heads: int
    head_dim: int


class _BufferCache:
    """Duck-types transformers' Cache for the attention layers: writes the new K/V at `cache_position` into the
    wrapper's buffers and hands back the whole buffer (the mask hides what is not written yet)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.is_compileable = True

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        pos = cache_kwargs["cache_position"]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, pos, key_states)
        v.index_copy_(2, pos, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only used when cache_position is missing
        raise NotImplementedError("pass cache_position")


class StaticCacheLM(torch.nn.Module):
    """forward(input_ids (1, T) int64, input_pos (T,) int64) -> logits (1, T, vocab), appending to the cache."""

    def __init__(self, model, max_context: int):
        super().__init__()
        from edgekit.arch import get_family

        self.model = model
        self.max_context = max_context
        self.layers = layer_caches(model)
        cfg = model.config.to_dict()
        fam = get_family(cfg.get("model_type"))
        self.window = fam.sliding_window(cfg)
        self.kinds = sorted(set(fam.layer_types(cfg))) if self.window else ["full_attention"]
        for i, lc in enumerate(self.layers):  # per layer, so pruned models with per-layer widths fit too
            shape = (1, lc.kv_heads, max_context, lc.head_dim)
            self.register_buffer(f"k_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape), persistent=False)
        self.register_buffer("slots", torch.arange(max_context), persistent=False)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self._logits(input_pos, input_ids=input_ids)

    def _logits(self, input_pos: torch.Tensor, **inputs) -> torch.Tensor:
        n = len(self.layers)
        cache = _BufferCache([getattr(self, f"k_{i}") for i in range(n)], [getattr(self, f"v_{i}") for i in range(n)])
        # A query at position p sees cache slots 0..p: the already written past and itself; a sliding layer only the
        # last `window` of them. Models with both kinds take one mask per kind.
        full = (self.slots[None, :] <= input_pos[:, None])[None, None]
        masks = {"full_attention": full}
        if self.window:
            masks["sliding_attention"] = full & (self.slots[None, :] > input_pos[:, None] - self.window)[None, None]
        mask = masks if len(self.kinds) > 1 else masks[self.kinds[0]]
        out = self.model(**inputs, attention_mask=mask, position_ids=input_pos[None],
                         cache_position=input_pos, past_key_values=cache, use_cache=True)
        return out.logits


IMAGE_EMBEDS, IMAGE_MASK = "image_embeds", "image_mask"


class StaticCacheVLM(StaticCacheLM):
    """A VLM's language model: forward(input_ids, input_pos, image_embeds (1, T, hidden), image_mask (1, T, 1)) ->
    logits (1, T, vocab); rows where the mask is 1 replace the table's embeddings (module docstring)."""

    def __init__(self, model, max_context: int):
        super().__init__(model, max_context)
        self.hidden = int(model.get_input_embeddings().weight.shape[1])

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, image_embeds: torch.Tensor,
                image_mask: torch.Tensor) -> torch.Tensor:
        table = self.model.get_input_embeddings()(input_ids)
        # a blend, not torch.where: mask 0/1 makes it exact either way, and mul/add stay inside XNNPACK
        return self._logits(input_pos, inputs_embeds=table * (1 - image_mask) + image_embeds * image_mask)


def layer_caches(model) -> list[LayerCache]:
    from edgekit.arch import get_family

    fam = get_family(model.config.model_type)
    out = []
    for layer in fam.layers(model):
        head_dim = int(layer.self_attn.head_dim)
        out.append(LayerCache(kv_heads=fam.widths_of(layer, head_dim).num_key_value_heads, head_dim=head_dim))
    return out


def cache_length(requested: int, config) -> int:
    """The .pte's context: what the user asked, within the model's positions and MAX_CONTEXT. Sliding-window layers
    keep a full-length cache and mask to their window (simple and exact; a ring buffer would save their memory)."""
    return min(requested, getattr(config, "max_position_embeddings", requested) or requested, MAX_CONTEXT)


def spell_out_tanh_gelu(model) -> int:
    """XNNPACK's GELU is the erf form whatever `approximate` says (its node visitor drops the argument: up to 4.7e-4
    per activation, max |delta logit| 0.041 on Gemma 3 270M). Tanh-GELU modules are rewritten as the elementwise
    formula, which XNNPACK runs exactly; returns how many were rewritten."""
    from transformers.activations import GELUTanh

    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, GELUTanh):
            m.act = m._gelu_tanh_python
        elif isinstance(m, torch.nn.GELU) and m.approximate == "tanh":
            model.set_submodule(name, GELUTanh(use_gelu_tanh_python=True))
        else:
            continue
        n += 1
    return n


# --- 8da4w -----------------------------------------------------------------------------------------------------


def _width_fix(name: str, model, group_size: int) -> str:
    """What would make this linear's input width a multiple of the group size."""
    if name.endswith("mlp.down_proj"):
        return f"prune the FFN width to a multiple of {group_size} (edgekit build aligns pruned widths to the target)"
    if name.endswith("self_attn.o_proj"):
        return f"prune attention heads so that heads * head_dim stays a multiple of {group_size}"
    return (f"hidden_size {model.config.hidden_size} is not a multiple of {group_size} and width pruning keeps it, "
            "so only another precision fits")


def check_group_widths(model, group_size: int = GROUP_SIZE, mixed: bool = True) -> None:
    """Refuse 8da4w when a 4-bit linear's input width is not divisible by the group size (it would stay fp32
    silently); the 8-bit ones have one scale per row and take any width."""
    bad = [(name, m.in_features) for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and m.in_features % group_size and not (mixed and keeps_8_bits(name))]
    if not bad:
        return
    shown = ", ".join(f"{n} (in {w})" for n, w in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    fixes = sorted({_width_fix(n, model, group_size) for n, _ in bad})
    raise EdgekitError(f"8da4w needs every linear's input width divisible by the group size {group_size}; "
                       f"{len(bad)} linear(s) are not: {shown}", "; ".join(fixes + ["or use --precision fp32"]))


CALIB_SEQS, CALIB_LEN = 32, 256  # 8k tokens of calibration text: more moved SmolLM2's held-out KL by < 0.01


def calibration_batches(tok, path=None, batch: int = 4) -> list:
    from edgekit.prune.calib import batches, calibration_sequences

    return list(batches(calibration_sequences(tok, path, CALIB_LEN, CALIB_SEQS), batch))


def _bf16(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.bfloat16).float()  # XNNPACK stores group scales in bf16: choose and round with what runs


def gptq_grid(model, eight, group_size: int, calibration: list, in_place: bool = False) -> dict:
    """GPTQ every linear onto the 8da4w grid: the `eight` (names) at int8 with one fp32 scale per row (XNNPACK's
    qc8w), the rest int4 with bf16 scales per group (qb4w); each weight becomes its rounded values in fp32 (`in_place`:
    the same Parameter, as QAT needs for its optimizer and a tied head; otherwise a new one, so a tied embedding
    keeps its float table). Returns name -> scales (rows, groups)."""
    from edgekit.arch import get_family
    from edgekit.gptq import gptq, quantize_sequentially

    scales: dict[str, torch.Tensor] = {}

    def to_grid(name, mod, hessian):  # the rounded weights in fp32 for now: calibrating the next layer is faster
        if name in eight:
            q, scales[name] = gptq(mod.weight, hessian, mod.in_features, bits=8)
        else:  # choose and round the scales with what runs
            q, scales[name] = gptq(mod.weight, hessian, group_size, bits=4, round_scale=_bf16)
        g = scales[name].shape[1]
        grid = (q.float().reshape(q.shape[0], g, -1) * scales[name][..., None]).reshape(q.shape)
        if in_place:
            mod.weight.data.copy_(grid)
        else:
            mod.weight = torch.nn.Parameter(grid, requires_grad=False)

    quantize_sequentially(model, list(get_family(model.config.model_type).layers(model)), calibration, to_grid)
    return scales


def quantize_8da4w(model, group_size: int = GROUP_SIZE, calibration: list | None = None, qat=None,
                   qat_scales: dict | None = None) -> dict:
    """int8 dynamic activations x int4 grouped weights (torchao), the EIGHT_BIT linears at int8 per channel;
    returns what was done.

    With `calibration` (batches of token ids) the weights are GPTQ's (edgekit/gptq.py) rather than torchao's
    round-to-nearest: on SmolLM2-135M mean KL vs fp32 0.62 -> 0.17 with every linear at 4 bits. With `qat`
    (edgekit.qat.QATPlan) the weights were trained through that plan's fake quantizer (its recipe says which linears
    at 8 bits), with `qat_scales` when the scales were fixed during training (edgekit.qat.load_scales): each is
    rounded on exactly its grid by round-to-nearest, which is what QAT trained for; GPTQ would move them off it."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxUnpackedToInt8Tensor, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if qat is None:
        eight = [n for n in linears if keeps_8_bits(n)]
    else:
        from edgekit.qat import bits

        eight = [n for n in linears if bits(qat, n) == 8]
    check_group_widths(model, group_size, mixed=bool(eight))

    def packed(w, bits, s):  # torchao re-derives exactly the rounded integers from (rounded weights, scales)
        return torch.nn.Parameter(IntxUnpackedToInt8Tensor.from_hp(
            w, (1, group_size if bits == 4 else w.shape[1]), torch.int4 if bits == 4 else torch.int8,
            activation_quantization="int8_asym_per_token", intx_choose_qparams_algorithm=None, custom_scale=s,
            custom_zero_point=torch.zeros_like(s, dtype=torch.int8)), requires_grad=False)

    if qat is not None:
        from edgekit.qat import weight_grid

        for n in linears:  # torchao re-derives the fake quantizer's integers from (its output, its scales)
            mod = model.get_submodule(n)
            w, s = weight_grid(mod.weight, qat, n, (qat_scales or {}).get(n))
            mod.weight = packed(w, 8 if n in eight else 4, s)
    elif calibration is None:
        lin = torch.nn.Linear
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                               weight_granularity=PerGroup(group_size)),
                  filter_fn=lambda m, n: isinstance(m, lin) and n not in eight)
        if eight:
            quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                                   weight_granularity=PerAxis(0)),
                      filter_fn=lambda m, n: isinstance(m, lin) and n in eight)
    else:
        for n, s in gptq_grid(model, set(eight), group_size, calibration).items():
            mod = model.get_submodule(n)
            mod.weight = packed(mod.weight.data, 8 if n in eight else 4, s)
    plain = [n for n in linears if type(model.get_submodule(n).weight.data) is torch.Tensor]
    if plain:  # torchao's own filters may skip more than the width rule above: never ship that silently
        raise EdgekitError(f"torchao left {len(plain)} linear(s) unquantized: {', '.join(plain[:6])}",
                           "use --precision fp32, or report the model's shapes as an edgekit bug")
    return {"quantized_linears": len(linears), "group_size": group_size,
            # per tensor what it became (issue #14: the report shows what was quantized to what)
            "weight_bits": {n: 8 if n in eight else 4 for n in linears},
            "weight_rounding": "qat-grid" if qat is not None else "gptq" if calibration is not None
            else "round-to-nearest",
            **({"calibration_tokens": sum(b.numel() for b in calibration)} if calibration is not None else {})}


# --- export ----------------------------------------------------------------------------------------------------


def delegation_summary(edge) -> dict:
    """How much of the lowered graph runs inside XNNPACK, and which operators stay outside (portable kernels)."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    outside = {op: b.non_delegated for op, b in sorted(info.delegation_by_operator.items())
               if b.non_delegated and op not in ("getitem", "sym_size")}  # bookkeeping, no compute
    return {"delegated_subgraphs": info.num_delegated_subgraphs, "delegated_ops": info.num_delegated_nodes,
            "ops_outside_xnnpack": sum(outside.values()), "outside_xnnpack_by_op": outside}


def lower(wrapper: StaticCacheLM):
    """torch.export with a dynamic sequence length, then XNNPACK lowering; returns (program, delegation summary)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    seq = torch.export.Dim("seq", min=1, max=max(EXAMPLE_TOKENS, min(wrapper.max_context, MAX_CHUNK)))
    example = (torch.zeros((1, EXAMPLE_TOKENS), dtype=torch.long), torch.arange(EXAMPLE_TOKENS))
    shapes: tuple = ({1: seq}, {0: seq})
    if isinstance(wrapper, StaticCacheVLM):  # image rows and mask: one per position, on the same dynamic T
        example += (torch.zeros((1, EXAMPLE_TOKENS, wrapper.hidden)), torch.zeros((1, EXAMPLE_TOKENS, 1)))
        shapes += ({1: seq}, {1: seq})
    with torch.no_grad():
        ep = torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        summary = delegation_summary(edge)  # before to_executorch, which adds memory-planning nodes to the graph
        return edge.to_executorch(), summary


def export(model_dir: Path, out: Path, cfg) -> dict:
    import warnings

    from edgekit.fsutil import atomic_write_bytes
    from edgekit.models import load_torch_model

    model, tok = load_torch_model(model_dir)
    n_ctx = cache_length(cfg.context_length, model.config)
    info: dict = {}
    with torch.no_grad():
        if cfg.precision == "8da4w":
            qat = getattr(cfg, "qat", None)
            calib = calibration_batches(tok, cfg.calibration) if cfg.calibrate and tok is not None and qat is None \
                else None
            if qat is not None:
                from edgekit.qat import load_scales

                info = quantize_8da4w(model, qat.group_size, qat=qat, qat_scales=load_scales(model_dir, qat))
            else:
                info = quantize_8da4w(model, calibration=calib)
        spell_out_tanh_gelu(model)
        with warnings.catch_warnings():  # "mutation on a buffer ... meaningless initial state": the mask covers it
            warnings.simplefilter("ignore")
            image = cfg.image_token_id  # a VLM's language model: image rows go in beside the ids
            prog, summary = lower((StaticCacheLM if image is None else StaticCacheVLM)(model, n_ctx))
    atomic_write_bytes(out / ENTRY, prog.buffer)
    return {"entry": ENTRY, "max_context": n_ctx, "max_chunk": min(n_ctx, MAX_CHUNK),
            "size_bytes": (out / ENTRY).stat().st_size,
            **summary, **info} | ({"image_embeds": {"input": IMAGE_EMBEDS, "image_token_id": image,
                                                   "inputs": ["input_ids", "input_pos", IMAGE_EMBEDS, IMAGE_MASK]}}
                                  if image is not None else {})
