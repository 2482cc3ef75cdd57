"""Tiny random models from configs, for tests and quick experiments (seconds, no hub)."""

from __future__ import annotations

from pathlib import Path

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def make_tokenizer(out: Path, vocab_size: int = 512):
    """A byte-level BPE trained on the shipped calibration text: real merges, real text, vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgekit.data import calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([calibration_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def make_tiny_model(arch: str, out: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Save a random `arch` (llama | qwen2 | mistral) causal LM with GQA (4 heads, 2 KV heads) into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**TINY, **overrides}
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
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        make_tokenizer(out, kw["vocab_size"])
    return out
