"""Tiny random models from configs, for tests and quick experiments (seconds, no hub)."""

from __future__ import annotations

from pathlib import Path

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


TOKENIZER_KINDS = ("bpe-bytelevel", "bpe-nfc", "spm-bpe")

# Chat templates in the style of the families each tokenizer kind stands for (rendered by transformers' jinja).
CHATML_TEMPLATE = (  # Qwen2 / Qwen2.5: ChatML, a default system turn
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA2_TEMPLATE = (  # Llama 2 chat: [INST] turns, an optional <<SYS>> block in the first one, bos per turn
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + (system if loop.first else '') + message['content'].strip() + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'].strip() + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def make_tokenizer(out: Path, vocab_size: int = 512, kind: str = "bpe-bytelevel"):
    """A BPE tokenizer trained on the shipped calibration text (real merges, real text, exactly vocab_size ids),
    saved with save_pretrained so AutoTokenizer.from_pretrained(out) loads it. kind:

    - "bpe-bytelevel": GPT-2 / SmolLM style byte-level BPE, <|endoftext|> as bos and eos, no chat template.
    - "bpe-nfc": Qwen2 style: NFC normalizer, Qwen2's Split regex then ByteLevel(use_regex=False), special tokens
      <|endoftext|> <|im_start|> <|im_end|> after the BPE ids, a ChatML template.
    - "spm-bpe": Llama 2 / Phi-3 style SentencePiece BPE: <unk> <s> </s> then the 256 <0xXX> byte tokens first,
      byte_fallback, spaces as "▁" through the Prepend("▁") + Replace(" ", "▁") normalizer (Llama 2's
      tokenizer.json), no pre-tokenizer, <s> added in front, a Llama 2 chat template. Trained SentencePiece-style
      (words start with "▁", lines are sentences, so newline and rare characters fall back to bytes), and the merges
      are then listed the way transformers converts a SentencePiece model: every split of every token into two
      tokens, ordered by the merged token's id.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; one of {', '.join(TOKENIZER_KINDS)}")
    if kind == "spm-bpe":
        return _make_spm_tokenizer(Path(out), vocab_size)
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    from edgekit.data import calibration_text

    tok = Tokenizer(models.BPE())
    if kind == "bpe-bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([calibration_text()], trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
        fast.save_pretrained(out)
        return fast
    from transformers import Qwen2TokenizerFast

    from edgekit.exporters.gguf_vocab import QWEN2_SPLIT

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([calibration_text()], trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    _check_size(tok, vocab_size)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                              unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                              errors="replace", split_special_tokens=False)
    fast.save_pretrained(out)
    return fast


def _check_size(tok, vocab_size: int) -> None:
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != vocab_size:
        raise ValueError(f"trained {n} tokens for vocab_size {vocab_size}: the calibration text is too small for it")


def _make_spm_tokenizer(out: Path, vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    from edgekit.data import calibration_text

    specials = ["<unk>", "<s>", "</s>"]
    fixed = specials + [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size < len(fixed) + 64:
        raise ValueError(f"spm-bpe needs vocab_size >= {len(fixed) + 64} (specials, 256 byte tokens, characters)")
    # SentencePiece trains on sentences split into words that start with "▁"; characters past the most frequent
    # ones are left to byte fallback, as SentencePiece's character_coverage does
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainable = vocab_size - len(fixed)
    trainer = trainers.BpeTrainer(vocab_size=trainable, limit_alphabet=min(96, trainable // 2), show_progress=False)
    trainer_tok.train_from_iterator(calibration_text().splitlines(), trainer)
    learned = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(fixed)}
    for t, _ in learned:
        vocab.setdefault(t, len(vocab))
    # transformers' SentencePiece -> tokenizer.json conversion lists, for each piece in id order, every split into
    # two pieces of the vocab: llama.cpp's SPM merge loop (any adjacent pair whose concatenation is a token, the
    # highest-scoring first) then makes the same choices as the BPE merges.
    merges = []
    for t, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i < len(fixed) or len(t) < 2:
            continue
        splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        merges += sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    _check_size(tok, vocab_size)
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="</s>", chat_template=LLAMA2_TEMPLATE, add_bos_token=True, add_eos_token=False,
                              clean_up_tokenization_spaces=False, legacy=True)
    fast.save_pretrained(out)
    return fast


# Each registered family's real config quirks at tiny size (the meta-test builds one of each). Keys are config.json
# keys; the tokenizer kind is the family's (edgekit.arch Family.tokenizer).
FAMILY_QUIRKS: dict[str, dict] = {
    # Llama 3.x: llama3 rope scaling (an original context short enough that all three frequency bands occur at
    # test lengths), tied embeddings as in Llama 3.2 1B/3B
    "llama": dict(tie_word_embeddings=True, rope_theta=10000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=4096, rope_theta=1e6),
    # Qwen2.5 small: q/k/v biases, tied embeddings, rope 1e6, the sliding-window keys present but off
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=2),
    # Qwen3: head_dim not hidden/heads, q/k norms, tied
    "qwen3": dict(head_dim=32, tie_word_embeddings=True, rope_theta=1e6, attention_bias=False),
    # Gemma 3 (270M-like): head_dim 32 != 64/4, query_pre_attn_scalar = head_dim, sliding layers interleaved with a
    # global one and a window shorter than the fidelity gate's 64 tokens, local rope base, tied, GELU-tanh
    "gemma3_text": dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        rope_theta=1e6, rope_local_base_freq=10000.0, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh"),
    # Phi-4-mini: fused qkv_proj / gate_up_proj, 3/4 of each head rotary, tied
    "phi3": dict(partial_rotary_factor=0.75, tie_word_embeddings=True, sliding_window=None, rope_theta=10000.0,
                 pad_token_id=None, bos_token_id=1, eos_token_id=2),
}


def make_tiny_model(arch: str, out: Path, seed: int = 0, tokenizer: bool = True, quirks: bool = False,
                    dtype: str = "float32", shard_size: str | None = None, **overrides) -> Path:
    """Save a random `arch` causal LM (any registered family) with GQA (4 heads, 2 KV heads) into `out`.

    quirks=True adds the family's real config quirks (FAMILY_QUIRKS) and a tokenizer of the family's kind;
    dtype="bfloat16" saves the weights as a bf16 checkpoint (how most real checkpoints ship); shard_size (e.g.
    "40KB") splits them into shards with a model.safetensors.index.json, as large checkpoints are published."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgekit.arch import get_family

    fam = get_family(arch)
    kw = {**TINY, **(FAMILY_QUIRKS.get(arch, {}) if quirks else {}), **overrides}
    if arch == "mistral":
        kw.setdefault("sliding_window", None)
    cfg = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random init gives near-uniform logits; a larger scale makes top-1 meaningful
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    out = Path(out)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
    model.generation_config.save_pretrained(out)
    if tokenizer:
        make_tokenizer(out, kw["vocab_size"], **({"kind": fam.tokenizer} if quirks else {}))
    return out


# Tiny vision-language models (task "vlm"): each VLM family's real layout at tiny size. LLaVA-1.5-like: a CLIP tower
# whose second-to-last layer feeds the projector (so the last layer's output is unused, as in the real model), the
# CLS token dropped ("default"), a GELU MLP projector with biases, a Llama language model.
VLM_TINY: dict[str, dict] = {
    "llava": dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
                           projection_dim=32, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", **{**TINY, "vocab_size": 512}, tie_word_embeddings=False),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        multimodal_projector_bias=True),
}
# Idefics3 / SmolVLM: a SigLIP-style tower (gelu-tanh, no class token) whose post-layernormed output is pixel-shuffled
# (scale 2: 64 patches -> 16 image tokens) into one bias-free linear, a Llama language model
for _arch in ("idefics3", "smolvlm"):
    VLM_TINY[_arch] = dict(
        vision_config=dict(model_type=f"{_arch}_vision", hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, image_size=32, patch_size=4, hidden_act="gelu_pytorch_tanh"),
        text_config=dict(model_type="llama", **{**TINY, "vocab_size": 512}, tie_word_embeddings=False),
        scale_factor=2)


def _tiny_image_processor(arch: str, size: int):
    """The family's own image processor at the tower's resolution (Idefics3/SmolVLM: one unsplit image)."""
    import transformers

    if arch == "llava":
        return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    cls = {"idefics3": "Idefics3ImageProcessor", "smolvlm": "SmolVLMImageProcessor"}[arch]
    return getattr(transformers, cls)(do_image_splitting=False, size={"longest_edge": size},
                                      max_image_size={"longest_edge": size})


def make_tiny_vlm(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random `arch` VLM (a registered VLM family) with a byte-level BPE tokenizer holding the family's
    special tokens (<image>, and Idefics3's image wrapping tokens) and the family's image processor
    (preprocessor_config.json), so the folder loads with from_pretrained, AutoTokenizer and AutoImageProcessor
    offline."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from edgekit.arch import get_vlm_family

    fam = get_vlm_family(arch)
    kw = {**VLM_TINY[arch], **overrides}
    vocab = kw["text_config"]["vocab_size"]
    out = Path(out)
    make_tokenizer(out, vocab - len(fam.extra_tokens))
    tok = AutoTokenizer.from_pretrained(out)
    # pieces llama.cpp's image template looks up (Idefics3: "\n\n") that real tokenizers have as one token
    missing = [p for p in fam.mmproj_template_pieces if len(tok(p, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        make_tokenizer(out, vocab - len(fam.extra_tokens) - len(missing))
        tok = AutoTokenizer.from_pretrained(out)
        tok.add_tokens(missing)
    tok.add_special_tokens({"additional_special_tokens": list(fam.extra_tokens)})
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out)
    image_id = tok.convert_tokens_to_ids(fam.image_token)
    assert len(tok) == vocab and image_id < vocab, (len(tok), image_id)
    extra = dict(image_token_index=image_id, image_seq_length=fam.image_tokens({**kw})) if arch == "llava" else \
        dict(image_token_id=image_id, pad_token_id=tok.pad_token_id)
    cfg = getattr(transformers, fam.config_class)(**kw, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embedding" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    _tiny_image_processor(arch, kw["vision_config"]["image_size"]).save_pretrained(out)
    return out


# image towers alone (task "vision-encoder"), each with its real layout quirks: CLIP's quick-GELU and class token,
# SigLIP's attention-pooling head (its MLP is intermediate_size wide too), ViT's dense pooler
VISION_TINY: dict[str, dict] = {
    "clip_vision_model": dict(hidden_act="quick_gelu", projection_dim=32),
    "siglip_vision_model": dict(hidden_act="gelu_pytorch_tanh", vision_use_head=True),
    "vit": dict(hidden_act="gelu", qkv_bias=True),
}


def make_tiny_vision_encoder(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random image tower of a registered vision-encoder family with its image processor, so the folder loads
    with from_pretrained and AutoImageProcessor offline (32x32 images, 8x8 patches: 16 patches)."""
    import torch
    import transformers

    from edgekit.arch import VISION_ENCODERS

    fam = VISION_ENCODERS[arch]
    kw = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, **VISION_TINY[arch], **overrides)
    cls = getattr(transformers, fam.model_class)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embedding" not in name:
                p.normal_(0, 0.08)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    size = kw["image_size"]
    proc = getattr(transformers, fam.processor_class)
    extra = {"crop_size": {"height": size, "width": size}} if fam.processor_class == "CLIPImageProcessor" else {}
    proc(size={"shortest_edge": size} if extra else {"height": size, "width": size}, **extra).save_pretrained(out)
    return out
