"""A GGUF's SentencePiece tokenizer (tokenizer.ggml.model "llama") as a Hugging Face BPE tokenizer.json that
tokenizes id for id as llama.cpp does.

transformers' GGUF loader (4.57) turns Gemma's into a Unigram model with a whitespace pre-tokenizer: on Gemma 3 270M
it splits "General Python" into 'Gener' 'al' '▁Py' 'th' 'on' where llama.cpp gives 'General' '▁Python' (27,880 vs
16,563 tokens on edgekit's parity text), and edgekit's GGUF exporter refuses Unigram outright. Every SentencePiece
GGUF (Gemma, Llama 2, Mistral 7B, Phi-3) gets this rebuild, so all of them tokenize as the GGUF does in llama.cpp.

llama.cpp's SPM tokenizer starts from the text's characters and keeps merging the adjacent pair whose concatenation
is the highest-scoring token (ties: the leftmost pair); what is left outside the vocabulary falls back to <0xXX>
byte tokens. A BPE over the same vocabulary whose merges are every (a, b) with a, b and a + b all tokens, ranked by
the score of a + b (highest first), makes the same choices: the idea of transformers' SentencePieceExtractor, here
from the GGUF's tokens and scores. Around it sits what llama.cpp does to text: spaces as "▁", a "▁" in front of each
text run when tokenizer.ggml.add_space_prefix (llama.cpp's default for SPM), user-defined tokens matched in the raw
text always and control tokens only when special tokens are parsed (Hugging Face's non-special / special added
tokens), bos in front when tokenizer.ggml.add_bos_token (default true), eos behind when add_eos_token.

GGUF byte tokens stay ordinary vocabulary entries (as in Llama 2's own tokenizer.json): llama.cpp never matches
"<0x41>" typed in a text, and skip_special_tokens must not drop the bytes of an emoji when decoding.

The metadata is read with struct from the file's header: well under a second for a 262k vocabulary (gguf-py's
GGUFReader takes 13-23 s on 2 cores), and the tokenizer builds in seconds.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.exporters.gguf_vocab import LLAMACPP_FORCED_CONTROL

SPACE = "▁"  # U+2581, SentencePiece's visible space
# gguf TokenType values (gguf-py's gguf.TokenType; not imported so this reads without gguf-py)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# llama.cpp's defaults for an SPM vocabulary whose file leaves a key out
SPM_DEFAULTS = {"bos": 1, "eos": 2, "unk": 0, "add_bos": True, "add_eos": False, "add_space_prefix": True}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path, prefix: str | tuple[str, ...] = "") -> dict:
    """The GGUF's key/value metadata (keys starting with `prefix`): scalars as Python values, strings decoded,
    numeric arrays as numpy arrays, string arrays as lists. Stops at the tensor infos; reads nothing of the weights."""
    import numpy as np

    def fail(why: str):
        return EdgekitError(f"could not read {path} as a GGUF model: {why}", "pass an unbroken .gguf file")

    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            raise fail("it is empty") from None
    try:
        pos = 0

        def unpack(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(mm):
                raise fail("the header is truncated")
            v = struct.unpack_from(fmt, mm, pos)[0]
            pos += size
            return v

        def string() -> str:
            nonlocal pos
            n = unpack("<Q")
            if pos + n > len(mm):
                raise fail("the header is truncated")
            s = mm[pos:pos + n].decode("utf-8", "replace")
            pos += n
            return s

        def value(vtype: int, keep: bool):
            nonlocal pos
            if vtype == _STRING:
                return string()
            if vtype in _SCALARS:
                return unpack(_SCALARS[vtype])
            if vtype != _ARRAY:
                raise fail(f"unknown metadata type {vtype}")
            inner, n = unpack("<I"), unpack("<Q")
            if inner in _SCALARS:
                dt = np.dtype(_SCALARS[inner].replace("?", "b1"))
                end = pos + dt.itemsize * n
                if end > len(mm):
                    raise fail("the header is truncated")
                arr = np.frombuffer(mm, dtype=dt, count=n, offset=pos).copy() if keep else None
                pos = end
                return arr
            if inner == _STRING and not keep:
                for _ in range(n):
                    length = unpack("<Q")  # (not `pos += unpack(...)`: that adds to pos as it was before the read)
                    pos += length
                return None
            return [value(inner, keep) for _ in range(n)]

        if mm[:4] != b"GGUF":
            raise fail("it does not start with the GGUF magic")
        pos = 4
        version = unpack("<I")
        if version < 2:
            raise fail(f"GGUF version {version} is too old")
        unpack("<Q")  # tensor count
        out = {}
        for _ in range(unpack("<Q")):
            key = string()
            vtype = unpack("<I")
            keep = key.startswith(prefix)
            v = value(vtype, keep)
            if keep:
                out[key] = v
        return out
    finally:
        mm.close()


def spm_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """Every (a, b) whose parts and concatenation are all tokens, the pair making the highest-scoring token first
    (llama.cpp merges by the score of the result). Pairs making the same token follow in token-id order of (a, b);
    tokens of equal score in token-id order. All token types take part, as in llama.cpp's merge loop."""
    index = {t: i for i, t in enumerate(tokens)}  # a repeated text: the last id, as llama.cpp's token_to_id
    found = []
    for i, t in enumerate(tokens):
        if len(t) < 2 or index[t] != i:
            continue
        s = -float(scores[i])
        for k in range(1, len(t)):
            a = index.get(t[:k])
            if a is not None:
                b = index.get(t[k:])
                if b is not None:
                    found.append((s, i, a, b))
    found.sort()
    return [(tokens[a], tokens[b]) for _, _, a, b in found]


def _meta_int(meta: dict, key: str, default):
    v = meta.get(key)
    return default if v is None else int(v)


def spm_tokenizer_from_metadata(meta: dict):
    """A PreTrainedTokenizerFast (BPE with byte fallback) reproducing llama.cpp's SPM tokenizer on the metadata of
    a GGUF whose tokenizer.ggml.model is "llama"."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(meta["tokenizer.ggml.tokens"])
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    scores = [0.0] * n if scores is None else scores
    types = meta.get("tokenizer.ggml.token_type")
    types = [NORMAL] * n if types is None else [int(t) for t in types]
    if len(scores) != n or len(types) != n:
        raise EdgekitError(f"the GGUF's tokenizer has {n} tokens but {len(scores)} scores and {len(types)} token "
                           "types", "pass an unbroken .gguf file")
    byte_tokens = {tokens[i] for i in range(n) if types[i] == BYTE}
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in byte_tokens]
    if missing and byte_tokens:
        raise EdgekitError(f"the GGUF's SentencePiece vocab lacks {len(missing)} of the 256 byte tokens (first "
                           f"<0x{missing[0]:02X}>)", "pass an unbroken .gguf file")

    def tok_id(key: str, default: int | None) -> int | None:
        i = _meta_int(meta, f"tokenizer.ggml.{key}", default)
        return i if i is not None and 0 <= i < n else None

    bos, eos = tok_id("bos_token_id", SPM_DEFAULTS["bos"]), tok_id("eos_token_id", SPM_DEFAULTS["eos"])
    unk, pad = tok_id("unknown_token_id", SPM_DEFAULTS["unk"]), tok_id("padding_token_id", None)

    def flag(key: str, default: bool) -> bool:
        v = meta.get(f"tokenizer.ggml.{key}")
        return default if v is None else bool(v)

    add_bos, add_eos = flag("add_bos_token", SPM_DEFAULTS["add_bos"]), flag("add_eos_token", SPM_DEFAULTS["add_eos"])
    prefix = flag("add_space_prefix", SPM_DEFAULTS["add_space_prefix"])

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) < n:  # tokenizers' BPE needs one text per id; llama.cpp reaches a repeated text by its last id
        seen: set[str] = set()
        for i in range(n - 1, -1, -1):
            if tokens[i] in seen:
                tokens[i] = f"[DUP{i}]{tokens[i]}"
            seen.add(tokens[i])
        vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), unk_token=None if unk is None else tokens[unk],
                       fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix else [])
                                          + [normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # llama.cpp matches control and unknown tokens in the text only with special=True, user-defined ones always,
    # both in the raw text (before spaces become "▁"): Hugging Face's special / non-special unnormalized added
    # tokens. llama.cpp retypes end-of-turn-looking texts ("</s>", "<end_of_turn>", ...) CONTROL whatever the file
    # says (Gemma's user-defined "</s>"), so those are special here too.
    for i in range(n):
        if tokens[i] in LLAMACPP_FORCED_CONTROL and types[i] != BYTE:
            types[i] = CONTROL
    rstrip = _rstrip_rule(str(meta.get("general.name", "")))
    tok.add_tokens([AddedToken(tokens[i], special=types[i] != USER_DEFINED, normalized=False, rstrip=rstrip(tokens[i]))
                    for i in range(n) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)])
    b = [(tokens[bos], bos)] if add_bos and bos is not None else []
    e = [(tokens[eos], eos)] if add_eos and eos is not None else []
    if b or e:  # as Llama 2's tokenizer.json: bos (and eos) around each sequence of a pair too
        single = " ".join([t for t, _ in b] + ["$A"] + [t for t, _ in e])
        pair = " ".join([f"{t}:0" for t, _ in b] + ["$A:0"] + [f"{t}:0" for t, _ in e]
                        + [f"{t}:1" for t, _ in b] + ["$B:1"] + [f"{t}:1" for t, _ in e])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list(dict.fromkeys(b + e)))
    kw = {name: tokens[i] for name, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk),
                                          ("pad_token", pad)) if i is not None}
    if meta.get("tokenizer.chat_template"):
        kw["chat_template"] = meta["tokenizer.chat_template"]
    # as transformers' Llama / Gemma tokenizer classes: no token_type_ids (generate() refuses them), left padding
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"], **kw)


TOKENIZER_KEYS = ("tokenizer.", "general.name")


def _rstrip_rule(model_name: str):
    """llama.cpp strips the whitespace after every special token of a model named Phi-3 (as Phi-3's tokenizer.json
    marks its added tokens rstrip), except <unk>, <s> and <|endoftext|>; no other SPM model strips."""
    name = model_name.lower()
    if "phi-3" not in name and "phi3" not in name:
        return lambda text: False
    return lambda text: text not in ("<unk>", "<s>", "<|endoftext|>")


def gguf_tokenizer_model(gguf: Path) -> str:
    """tokenizer.ggml.model of the GGUF ("llama" for SentencePiece, "gpt2" for byte-level BPE, "" if none)."""
    return str(read_gguf_metadata(gguf, "tokenizer.ggml.model").get("tokenizer.ggml.model", ""))


def spm_tokenizer_from_gguf(gguf: Path):
    """The GGUF's SentencePiece tokenizer as a PreTrainedTokenizerFast, or None when its tokenizer is not one
    (tokenizer.ggml.model other than "llama": those transformers converts faithfully)."""
    meta = read_gguf_metadata(Path(gguf), TOKENIZER_KEYS)
    if meta.get("tokenizer.ggml.model") != "llama" or not meta.get("tokenizer.ggml.tokens"):
        return None
    return spm_tokenizer_from_metadata(meta)


def write_spm_tokenizer(gguf: Path, folder: Path) -> bool:
    """Replace the tokenizer files transformers wrote into `folder` with the GGUF's SentencePiece tokenizer as a BPE
    tokenizer.json + tokenizer_config.json. False (folder untouched) when the GGUF's tokenizer is not SentencePiece.
    The new files are written aside first and then moved in one by one, so the folder never lacks a tokenizer."""
    import os
    import shutil
    import tempfile

    tok = spm_tokenizer_from_gguf(gguf)
    if tok is None:
        return False
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tokenizer.tmp-"))
    try:
        tok.save_pretrained(str(tmp))
        cfg = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        cfg["edgekit_tokenizer"] = "BPE from the GGUF's SentencePiece tokens and scores (edgekit.gguf_tokenizer)"
        (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        written = {f.name for f in tmp.iterdir()}
        for name in TOKENIZER_FILES:  # what transformers wrote that this tokenizer does not replace
            if name not in written:
                (folder / name).unlink(missing_ok=True)
        for name in sorted(written):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
