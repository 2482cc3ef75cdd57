"""The tokenizer of a GGUF: tokenizer.json (+ tokenizer_config.json) as llama.cpp's vocab, and the parity check.

Two kinds of Hugging Face BPE tokenizer map onto llama.cpp tokenizers:

- byte-level BPE (GPT-2, SmolLM, Qwen2, Llama 3): GGUF tokenizer model `gpt2`, the tokens, their merges and the
  name of a pre-tokenizer llama.cpp implements (KNOWN_PRE, matched on the tokenizer.json regexes). Qwen2/2.5/3
  tokenizers NFC-normalize first; llama.cpp has no normalizer for this model and applies no NFC step, and its
  upstream converter writes these tokenizers anyway (pre-tokenizer `qwen2`). So does edgekit, and it records the
  difference: on text NFC leaves unchanged the two agree (gated); on text NFC changes they may not (reported).
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3): GGUF tokenizer model `llama`
  (llama.cpp's SPM tokenizer). The tokens are the pieces themselves ("▁" for a space, <0xXX> byte tokens typed
  BYTE), and each token's score is minus the rank of the first merge that makes it. llama.cpp's SPM loop merges the
  adjacent pair whose concatenation is the highest-scoring token, so with those scores it follows the merge order
  of Hugging Face's BPE. (gguf-py's LlamaHfVocab gives every token -1000, which turns the SPM loop into leftmost-
  first merging; upstream only gets real scores from a tokenizer.model, which a tokenizer.json-only model lacks.)
  Whether llama.cpp prefixes a space (tokenizer.ggml.add_space_prefix) follows the tokenizer: Llama 2's
  Prepend("▁") normalizer yes, Gemma's bare Replace(" ", "▁") no.

Anything else (Unigram, WordPiece, WordLevel, an unknown pre-tokenizer or normalizer) is refused in one line.
tokenizer_parity then tokenizes held-out text with llama.cpp itself (vocab only) and with the tokenizers library.
Nothing here imports torch; transformers is used only to render a chat template for the parity text.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from edgekit.errors import EdgekitError

PARITY_CHARS = 60_000  # held-out text tokenized by both tokenizers at export, before the mixed parity text
SPACE = "▁"  # U+2581, SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
NON_MERGE_SCORE = -1e9  # control, byte and unused tokens: below every merge, never a preferred SPM bigram

SUPPORTED = ("byte-level BPE (GPT-2, SmolLM, Qwen2, Llama 3 pre-tokenizers) and SentencePiece-style BPE with byte "
             "fallback (Llama 2, Mistral, Gemma, Phi-3)")

# The pre-tokenizer regexes of known tokenizer families (data from their tokenizer.json files), keyed to the name
# llama.cpp implements the same splitting under.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT, _LLAMA3_SPLIT = QWEN2_SPLIT, LLAMA3_SPLIT  # the names gguf.py and its tests know them by
KNOWN_PRE = {
    ("bytelevel+gpt2",): "gpt-2",
    ("digits", "bytelevel+gpt2"): "smollm",  # SmolLM/StarCoder: single digits, then the GPT-2 regex
    ("split:" + QWEN2_SPLIT, "bytelevel"): "qwen2",
    ("split:" + LLAMA3_SPLIT, "bytelevel"): "llama-bpe",
}
NFC_OK_PRE = ("qwen2",)  # byte-level pre-tokenizers whose families ship an NFC normalizer that llama.cpp skips
NFC_NOTE = ("the Hugging Face tokenizer NFC-normalizes text first; llama.cpp applies no NFC step (its upstream "
            "converter writes these tokenizers the same way), so text that NFC changes may tokenize differently")


def pre_tokenizer_signature(pt: dict | None) -> tuple[str, ...]:
    steps = [] if pt is None else pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    sig = []
    for s in steps:
        t = s.get("type")
        if t == "ByteLevel" and not s.get("add_prefix_space", False):
            sig.append("bytelevel+gpt2" if s.get("use_regex", True) else "bytelevel")
        elif t == "Digits" and s.get("individual_digits"):
            sig.append("digits")
        elif t == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            sig.append("split:" + (s["pattern"].get("Regex") or s["pattern"].get("String", "")))
        else:
            sig.append(json.dumps(s, sort_keys=True))
    return tuple(sig)


def _steps(node: dict | None, key: str) -> list[dict]:
    """A normalizer / pre-tokenizer as its flat list of steps (Sequences unwrapped, null as none)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for sub in node.get(key, []) for s in _steps(sub, key)]
    return [node]


def read_tokenizer(model_dir: Path) -> tuple[Path, dict, dict]:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise EdgekitError(f"{model_dir} has no tokenizer.json; a GGUF must embed its tokenizer",
                           "save the tokenizer next to the model (tokenizer.save_pretrained)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    return path, tj, tc


def tokenizer_kind(path: Path, tj: dict) -> str:
    """'bytelevel' or 'spm' for the BPE tokenizers llama.cpp reproduces; EdgekitError for anything else."""
    model = tj.get("model") or {}
    mtype = model.get("type")
    if mtype != "BPE":
        what = {"Unigram": "a Unigram (SentencePiece unigram, T5/ALBERT-style)",
                "WordPiece": "a WordPiece (BERT-style)", "WordLevel": "a WordLevel"}.get(mtype, f"a {mtype}")
        raise EdgekitError(f"{path} is {what} tokenizer; edgekit embeds {SUPPORTED} into GGUF",
                           "use another backend (onnxruntime, executorch) for this model")
    pre = _steps(tj.get("pre_tokenizer"), "pretokenizers")
    if any(s.get("type") == "ByteLevel" for s in pre):
        return "bytelevel"
    norm = _steps(tj.get("normalizer"), "normalizers")
    spaces = any(s.get("type") == "Metaspace" for s in pre) or any(
        s.get("type") in ("Prepend", "Replace") and SPACE in json.dumps(s, ensure_ascii=False) for s in norm)
    if spaces or model.get("byte_fallback"):
        return "spm"
    raise EdgekitError(f"{path} is a BPE tokenizer whose pre-tokenizer {[s.get('type') for s in pre]} is not one "
                       f"llama.cpp is known to reproduce (neither byte-level nor SentencePiece-style '{SPACE}' spaces); "
                       f"edgekit embeds {SUPPORTED} into GGUF", "use another backend (onnxruntime, executorch) for "
                       "this model")


def _added(tj: dict, vocab_size: int) -> list[dict]:
    out = []
    for a in tj.get("added_tokens", []):
        if a["id"] >= vocab_size:
            raise EdgekitError(f"added token {a['content']!r} has id {a['id']} >= vocab_size {vocab_size}",
                               "fix config.json vocab_size")
        out.append(a)
    return out


def _base_tokens(tj: dict, vocab_size: int) -> list[str | None]:
    tokens: list[str | None] = [None] * vocab_size
    for tok, i in tj["model"]["vocab"].items():
        if i >= vocab_size:
            raise EdgekitError(f"token {tok!r} has id {i} >= vocab_size {vocab_size}", "fix config.json vocab_size")
        tokens[i] = tok
    return tokens


def _bytelevel_fields(path: Path, tj: dict, vocab_size: int) -> dict:
    """Tokens, token types and the pre-tokenizer name of a GPT-2-style byte-level BPE tokenizer.json."""
    import gguf

    sig = pre_tokenizer_signature(tj.get("pre_tokenizer"))
    if sig not in KNOWN_PRE:
        raise EdgekitError(f"{path}'s byte-level BPE pre-tokenizer {list(sig)} is not one llama.cpp is known to "
                           "reproduce", "use a tokenizer of the GPT-2, SmolLM, Qwen2 or Llama-3 families")
    pre = KNOWN_PRE[sig]
    info: dict = {"model": "gpt2", "pre": pre}
    # A byte_fallback flag (transformers' GGUF loader sets one) cannot act on real text: byte-level BPE maps every
    # byte of valid UTF-8 to a symbol of the vocab. The parity check at export confirms it on the held-out text.
    norm = _steps(tj.get("normalizer"), "normalizers")
    if norm:
        kinds = [s.get("type") for s in norm]
        if kinds == ["NFC"] and pre in NFC_OK_PRE:
            info["normalizer"] = {"hf": "NFC", "llamacpp": "none", "note": NFC_NOTE}
        else:
            raise EdgekitError(f"{path} normalizes text ({', '.join(map(str, kinds))}) before its {pre} "
                               "pre-tokenizer, which llama.cpp's BPE does not", "use a tokenizer without a "
                               "normalizer (NFC is accepted with the Qwen2 pre-tokenizer)")
    tokens = _base_tokens(tj, vocab_size)
    types = [gguf.TokenType.NORMAL] * vocab_size
    for a in _added(tj, vocab_size):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):  # embedding rows the tokenizer never produces
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    return {"tokens": tokens, "types": types, "scores": None, "merges": True, "info": info}


def _spm_spaces(path: Path, tj: dict) -> tuple[bool, str]:
    """(add_space_prefix, how the tokenizer writes spaces) for a SentencePiece-style tokenizer.json, or refuse what
    llama.cpp's SPM tokenizer (every space as "▁", an optional "▁" in front of each text run) cannot do."""
    norm = _steps(tj.get("normalizer"), "normalizers")
    pre = _steps(tj.get("pre_tokenizer"), "pretokenizers")
    fix = "use a tokenizer in the Llama 2 / Gemma tokenizer.json layout"

    def is_replace(s):
        return s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " " and s.get("content") == SPACE

    if norm and not pre:
        if len(norm) == 2 and norm[0] == {"type": "Prepend", "prepend": SPACE} and is_replace(norm[1]):
            return True, "Prepend + Replace normalizer (Llama 2)"
        if len(norm) == 1 and is_replace(norm[0]):
            return False, "Replace normalizer, no prefix (Gemma)"
        raise EdgekitError(f"{path} normalizes text ({', '.join(str(s.get('type')) for s in norm)}) in a way "
                           "llama.cpp's SPM tokenizer does not (it only writes spaces as '▁')", fix)
    if not norm and len(pre) == 1 and pre[0].get("type") == "Metaspace" and pre[0].get("replacement") == SPACE:
        scheme = pre[0].get("prepend_scheme", "always" if pre[0].get("add_prefix_space", True) else "never")
        if pre[0].get("split", False):
            # splitting at each "▁" cannot change BPE results unless a token holds a "▁" past its first character
            inner = [t for t in tj["model"]["vocab"] if SPACE in t[1:]]
            if inner:
                raise EdgekitError(f"{path} splits words at '▁' (Metaspace split=true) but has tokens spanning "
                                   f"words ({inner[0]!r}); llama.cpp's SPM tokenizer does not split", fix)
        # llama.cpp puts "▁" before every text run that starts the text or follows a special token, even one that
        # starts with a space; Metaspace skips a run already starting with "▁", and `first` prefixes only the text's
        # first run. Written as the nearest setting; the parity check (special tokens mid-text) shows the rest.
        return scheme != "never", (f"Metaspace pre-tokenizer (prepend_scheme {scheme}); llama.cpp differs on text "
                                   "that starts with a space" + (" and after special tokens" if scheme == "first"
                                                                  else ""))
    if not norm and not pre:
        raise EdgekitError(f"{path} is a BPE with byte fallback that keeps spaces as ' '; llama.cpp's SPM tokenizer "
                           "always writes them as '▁'", fix)
    raise EdgekitError(f"{path}'s SentencePiece-style BPE pre-tokenizer {[s.get('type') for s in pre]} is not one "
                       "llama.cpp is known to reproduce (its SPM tokenizer takes none, or a Metaspace)", fix)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _spm_fields(path: Path, tj: dict, vocab_size: int) -> dict:
    """Tokens, scores (from merge ranks) and types of a SentencePiece-style BPE tokenizer.json for llama.cpp's SPM."""
    import gguf

    model = tj["model"]
    if not model.get("byte_fallback"):
        raise EdgekitError(f"{path} is a SentencePiece-style BPE without byte fallback; llama.cpp's SPM tokenizer "
                           "always falls back to <0xXX> byte tokens", "use a tokenizer with byte_fallback")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise EdgekitError(f"{path} marks subwords with a prefix or suffix, which llama.cpp's SPM tokenizer does not",
                           "use a tokenizer in the Llama 2 / Gemma tokenizer.json layout")
    add_prefix, spaces = _spm_spaces(path, tj)
    tokens = _base_tokens(tj, vocab_size)
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if missing:
        raise EdgekitError(f"{path} has byte fallback but lacks {len(missing)} of the 256 byte tokens (first "
                           f"<0x{missing[0]:02X}>); llama.cpp needs all of them", "use the tokenizer's full vocab")
    index = {t: i for i, t in enumerate(tokens) if t is not None}
    scores = [NON_MERGE_SCORE] * vocab_size
    pairs = _merge_pairs(model.get("merges", []))
    for rank, (a, b) in enumerate(pairs):
        i = index.get(a + b)
        if i is not None and scores[i] == NON_MERGE_SCORE:
            scores[i] = -float(rank + 1)
    for i, t in enumerate(tokens):
        if t is not None and len(t) == 1:
            scores[i] = 0.0  # single characters are where merging starts; their score is never compared
    types = [gguf.TokenType.NORMAL] * vocab_size
    for i, t in enumerate(tokens):
        if t is not None and BYTE_TOKEN.fullmatch(t):
            types[i] = gguf.TokenType.BYTE
    unk = model.get("unk_token")
    for a in _added(tj, vocab_size):
        i, text = a["id"], a["content"]
        if text == unk:
            types[i] = gguf.TokenType.UNKNOWN
        elif a.get("special"):
            types[i] = gguf.TokenType.CONTROL
        else:  # llama.cpp matches user-defined tokens in the raw text, before spaces become "▁"
            types[i], text = gguf.TokenType.USER_DEFINED, text.replace(SPACE, " ")
        tokens[i] = text
        scores[i] = NON_MERGE_SCORE
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    # llama.cpp's SPM merges every adjacent pair whose concatenation is a token; BPE merges listed pairs only. Count
    # the tokens that can be made from a pair the merges never list: 0 for tokenizer.json files converted from a
    # SentencePiece model (transformers lists every split), and where it is not 0 the parity check decides.
    listed = set(pairs)
    unlisted = sum(1 for t in index if len(t) > 1 and not BYTE_TOKEN.fullmatch(t) and any(
        t[:k] in index and t[k:] in index and (t[:k], t[k:]) not in listed for k in range(1, len(t))))
    info = {"model": "llama", "pre": "default", "spaces": spaces, "add_space_prefix": add_prefix,
            "scores": "minus the rank of each token's first merge", "tokens_from_unlisted_pairs": unlisted}
    return {"tokens": tokens, "types": types, "scores": scores, "merges": False, "add_space_prefix": add_prefix,
            "info": info}


def tokenizer_fields(model_dir: Path, vocab_size: int) -> dict:
    """What the GGUF's tokenizer.ggml.* keys hold for the folder's tokenizer.json: tokens, types, scores (SPM), whether
    to write merges, and `info` (model, pre-tokenizer, normalizer notes) for artifact.json."""
    path, tj, _ = read_tokenizer(model_dir)
    kind = tokenizer_kind(path, tj)
    f = _bytelevel_fields(path, tj, vocab_size) if kind == "bytelevel" else _spm_fields(path, tj, vocab_size)
    f["pre"] = f["info"]["pre"]
    return f


def _hf(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def _auto_added(hf) -> dict[str, bool]:
    """Whether the Hugging Face tokenizer puts tokens before / after a text when asked for special tokens."""
    plain = hf.encode("a b", add_special_tokens=False).ids
    full = hf.encode("a b", add_special_tokens=True).ids
    at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), 0)
    return {"bos": at > 0, "eos": len(full) > at + len(plain)}


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def add_tokenizer(w, model_dir: Path, vocab_size: int) -> dict:
    """Write the tokenizer into GGUFWriter `w`: tokens, types, scores or merges, special token ids, add_bos/add_eos
    as the Hugging Face tokenizer does it, add_space_prefix, and the chat template. Returns the info for
    artifact.json."""
    import gguf

    f = tokenizer_fields(model_dir, vocab_size)
    w.add_tokenizer_model(f["info"]["model"])
    w.add_tokenizer_pre(f["pre"])
    w.add_token_list(f["tokens"])
    if f["scores"] is not None:
        w.add_token_scores(f["scores"])
    w.add_token_types(f["types"])
    if "add_space_prefix" in f:
        w.add_add_space_prefix(f["add_space_prefix"])
    quiet = _DropRecords("Unknown separator token")  # gguf-py's guess at Llama 2's own pair template
    logging.getLogger("gguf.vocab").addFilter(quiet)
    try:
        sv = gguf.SpecialVocab(model_dir, load_merges=f["merges"], n_vocab=vocab_size)
    finally:
        logging.getLogger("gguf.vocab").removeFilter(quiet)
    # gguf-py guesses add_bos/add_eos from the post-processor and tokenizer_config.json; llama.cpp's defaults
    # differ per tokenizer model (SPM adds bos unless told). Write what the tokenizer itself does.
    added = _auto_added(_hf(model_dir))
    sv.add_special_token.update(added)
    sv.add_to_gguf(w, quiet=True)
    info = dict(f["info"])
    info.update(add_bos=added["bos"], add_eos=added["eos"], chat_template=sv.chat_template is not None)
    return info


# -- parity -----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def mixed_text() -> str:
    """edgekit/data/parity.txt, byte for byte (CRLF and lone CR kept: text-mode reading would turn them into \\n)."""
    from importlib import resources

    return resources.files("edgekit").joinpath("data", "parity.txt").read_bytes().decode("utf-8")


def parity_text() -> str:
    """Held-out prose, then the mixed parity text: CJK, emoji, CRLF, digit runs, leading/multiple spaces, tabs,
    accented text in NFC and in NFD form."""
    from edgekit.data import heldout_text

    return heldout_text()[:PARITY_CHARS] + "\n" + mixed_text()


CHAT = [{"role": "user", "content": "Hello! Can you tokenize   this: naïve café, 東京 😀 and 12345?"},
        {"role": "assistant", "content": "Sure.\tTabs, CRLF\r\nand  double spaces too."},
        {"role": "user", "content": "Thanks. Now the <|im_end|> string, typed as text."}]
# Token texts llama.cpp's vocab loader forces to CONTROL when it finds them, whatever type the file gives (its EOG/EOT
# detection): where a tokenizer keeps one as an ordinary BPE token (Qwen2.5 has "</s>" at id 128247), llama.cpp with
# special parsing reads that text typed by a user as the control token. Upstream GGUFs behave the same; the parity
# text leaves these out and the artifact lists them.
LLAMACPP_FORCED_CONTROL = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>",
                           "<|end_of_text|>", "<EOT>")


def special_text(model_dir: Path, tj: dict) -> tuple[str, str]:
    """Text with the tokenizer's own special tokens in it: its chat template rendered on a short conversation (as
    transformers renders it), then every added token between ordinary words. Returns (text, what became of the
    chat template: rendered | none | the reason it did not render)."""
    parts, template = [], "none"
    tc_path = Path(model_dir) / "tokenizer_config.json"
    if (Path(model_dir) / "chat_template.jinja").is_file() or (
            tc_path.is_file() and "chat_template" in json.loads(tc_path.read_text(encoding="utf-8"))):
        from jinja2 import TemplateError
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
            parts.append(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))
            template = "rendered"
        except (TemplateError, ValueError) as e:  # a template that wants other roles or tools: the tokens remain
            template = f"not rendered ({type(e).__name__}: {e})"
    added = [a["content"] for a in tj.get("added_tokens", [])]
    parts.append(" ".join(f"word{a}next {a}" for a in added) + "\n" + "".join(added) + " end")
    return "\n".join(parts), template


def _compare(ref: list[int], got: list[int], chars: int) -> dict:
    n = min(len(ref), len(got))
    diff = next((i for i in range(n) if ref[i] != got[i]), None if len(ref) == len(got) else n)
    return {"chars": chars, "hf_tokens": len(ref), "llamacpp_tokens": len(got), "identical": diff is None,
            "first_difference": diff}


def _nfc_split(text: str) -> tuple[str, str, int]:
    """(lines NFC leaves as they are, lines NFC changes, how many of those). NFC never composes across a newline,
    so each part normalizes exactly as it would inside the whole text."""
    keep, changed = [], []
    for line in text.splitlines(keepends=True) if "\n" in text else [text]:
        (keep if unicodedata.normalize("NFC", line) == line else changed).append(line)
    return "".join(keep), "".join(changed), len(changed)


def tokenizer_parity(gguf_path: Path, model_dir: Path, text: str | None = None) -> dict:
    """Token ids from llama.cpp (the GGUF's vocab, loaded vocab-only) against the Hugging Face tokenizer.json.

    The top-level counts are `text` (default: parity_text()) tokenized as plain text: llama.cpp with special=False,
    Hugging Face with its special tokens left as text too. `special` is the chat-template text with special tokens
    parsed on both sides (llama.cpp special=True) and bos/eos added as each tokenizer adds them. `identical` is both.
    For a tokenizer that NFC-normalizes, only the lines NFC leaves unchanged are gated; the lines it changes are
    compared under `nfc_changed` and reported, not gated: llama.cpp applies no NFC step, and upstream llama.cpp
    converts and runs these tokenizers (Qwen2/2.5/3) with exactly this difference."""
    from llama_cpp import Llama

    from edgekit.exporters.gguf import captured_stderr

    text = parity_text() if text is None else text
    _, tj, _ = read_tokenizer(model_dir)
    hf = _hf(model_dir)
    nfc = [s.get("type") for s in _steps(tj.get("normalizer"), "normalizers")] == ["NFC"]
    with captured_stderr():
        llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        def both(t: str, special: bool) -> dict:
            hf.encode_special_tokens = not special  # special=False: "<|im_start|>" typed as text is just text
            ref = hf.encode(t, add_special_tokens=special).ids
            with captured_stderr():  # llama.cpp warns about a double bos when the template already starts with one
                got = llm.tokenize(t.encode("utf-8"), add_bos=special, special=special)
            return _compare(ref, got, len(t))

        plain_text, changed_text, n_changed = _nfc_split(text) if nfc else (text, "", 0)
        out = both(plain_text, False)
        chat, template = special_text(model_dir, tj)
        out["special"] = {**both(chat, True), "chat_template": template}
        special_ids = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
        vocab = tj.get("model", {}).get("vocab", {})
        vocab = vocab if isinstance(vocab, dict) else {}
        forced = [t for t in LLAMACPP_FORCED_CONTROL if t in vocab and vocab[t] not in special_ids]
        if forced:
            out["special"]["llamacpp_forced_control"] = forced
        if nfc:
            out["nfc_changed"] = {**both(changed_text, False), "lines": n_changed, "gated": False, "note": NFC_NOTE}
        out["identical"] = out["identical"] and out["special"]["identical"]
    finally:
        hf.encode_special_tokens = False
        del llm
    return out
