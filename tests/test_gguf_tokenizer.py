"""SentencePiece GGUF tokenizers rebuilt as Hugging Face BPE (edgekit.gguf_tokenizer): a tiny Llama 2-style GGUF made
by edgekit's own exporter, rebuilt from its tokens and scores, id for id against the tokenizer it was exported from and
against llama.cpp; a Gemma-style variant (no space prefix, no bos, eos, a user-defined token), a Phi-3-named one
(llama.cpp strips after special tokens), byte-level GGUFs left to transformers, and gguf_to_hf wiring it in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgekit.export import ExportConfig, export_model

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A tiny random Llama with a Llama 2-style SentencePiece BPE tokenizer, exported to GGUF (f32, gated)."""
    from edgekit.testing import make_tiny_model, make_tokenizer

    root = tmp_path_factory.mktemp("spm")
    src = make_tiny_model("llama", root / "model", tokenizer=False)
    make_tokenizer(src, 512, kind="spm-bpe")
    meta = export_model(src, root / "out", ExportConfig(backend="gguf", precision="f32", context_length=128),
                        log=lambda *_: None)
    assert meta["tokenizer"]["model"] == "llama" and meta["tokenizer"]["identical"]
    return {"src": src, "gguf": root / "out" / "model.gguf"}


def _rebuild(gguf: Path, folder: Path):
    """The GGUF's tokenizer rebuilt into `folder` (with the config.json tokenizer_parity's exporter plan needs)."""
    from edgekit.gguf_tokenizer import spm_tokenizer_from_gguf

    tok = spm_tokenizer_from_gguf(gguf)
    assert tok is not None
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


def _llama(gguf: Path):
    from llama_cpp import Llama

    from edgekit.exporters.gguf import captured_stderr

    with captured_stderr():
        return Llama(model_path=str(gguf), vocab_only=True, verbose=False)


def _ids(tok, text: str, special: bool) -> list[int]:
    """Hugging Face ids: special=False leaves special tokens as text (llama.cpp's special=False), and adds none."""
    hf = tok.backend_tokenizer
    hf.encode_special_tokens = not special
    try:
        return hf.encode(text, add_special_tokens=special).ids
    finally:
        hf.encode_special_tokens = False


def _vocab_gguf(folder: Path, out: Path) -> Path:
    import edgekit.exporters.gguf as g

    cfg = json.loads((folder / "config.json").read_text())
    g.write_gguf(folder, out, g.plan(cfg, ExportConfig(backend="gguf", precision="f32")), "f32", tensors=False)
    return out


def _variant(src: Path, folder: Path, edit) -> Path:
    """A copy of the model's tokenizer and config (no weights), its tokenizer.json changed by edit(tj)."""
    folder.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, folder / f.name)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(tj)
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return folder


def test_metadata_reader_matches_gguf_py(spm):
    import numpy as np
    from gguf import GGUFReader

    from edgekit.gguf_tokenizer import TOKENIZER_KEYS, read_gguf_metadata

    meta = read_gguf_metadata(spm["gguf"], TOKENIZER_KEYS)
    fields = GGUFReader(str(spm["gguf"])).fields
    assert meta["tokenizer.ggml.tokens"] == list(fields["tokenizer.ggml.tokens"].contents())
    assert np.array_equal(meta["tokenizer.ggml.scores"], fields["tokenizer.ggml.scores"].contents())
    assert list(meta["tokenizer.ggml.token_type"]) == list(fields["tokenizer.ggml.token_type"].contents())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "general.name"):
        assert meta[key] == fields[key].contents(), key
    assert not any(k.startswith("llama.") for k in meta)  # only the keys asked for


def test_rebuilt_tokenizer_matches_the_original_and_llamacpp(spm, tmp_path):
    """Id for id on the parity text (special tokens as text) and on the rendered chat template (parsed, with bos)."""
    from transformers import AutoTokenizer

    from edgekit.exporters.gguf_vocab import CHAT, parity_text, tokenizer_parity

    tok = _rebuild(spm["gguf"], tmp_path / "tok")
    shutil.copy(spm["src"] / "config.json", tmp_path / "tok" / "config.json")
    res = tokenizer_parity(spm["gguf"], tmp_path / "tok")
    assert res["identical"] and res["special"]["chat_template"] == "rendered", res
    assert res["hf_tokens"] > 10_000
    orig = AutoTokenizer.from_pretrained(str(spm["src"]))
    text = parity_text()
    assert _ids(tok, text, False) == _ids(orig, text, False)
    chat = orig.apply_chat_template(CHAT, tokenize=False)
    assert chat.count("<s>") == 2 and "</s>" in chat
    assert _ids(tok, chat, True) == _ids(orig, chat, True) == _llama(spm["gguf"]).tokenize(chat.encode(), special=True)
    assert tok.decode(_ids(tok, text, False)) == text  # byte fallback and the prefix space decode back
    assert json.loads(tok.backend_tokenizer.to_str())["model"]["type"] == "BPE"


def test_bos_and_special_tokens(spm):
    from edgekit.gguf_tokenizer import spm_tokenizer_from_gguf

    tok = spm_tokenizer_from_gguf(spm["gguf"])
    llm = _llama(spm["gguf"])
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    ids = tok("Hello world").input_ids
    assert ids[0] == 1 and ids[1:] == tok("Hello world", add_special_tokens=False).input_ids
    assert ids == llm.tokenize(b"Hello world", add_bos=True, special=True)
    assert tok("").input_ids == [1] == llm.tokenize(b"", add_bos=True, special=True)
    # control tokens: parsed only as special tokens; byte tokens are vocabulary, never matched in text
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    assert sorted(added) == [0, 1, 2] and all(a.special and not a.normalized for a in added.values())
    assert tok.convert_tokens_to_ids("<0x0A>") == 3 + 0x0A
    assert _ids(tok, "a</s>b", True) == llm.tokenize("a</s>b".encode(), add_bos=True, special=True)
    assert 2 in _ids(tok, "a</s>b", True) and 2 not in _ids(tok, "a</s>b", False)
    assert _ids(tok, "a</s><0x41>b", False) == llm.tokenize("a</s><0x41>b".encode(), add_bos=False, special=False)
    assert tok.decode(tok("  two  spaces\n😀").input_ids, skip_special_tokens=True) == "  two  spaces\n😀"
    from edgekit.gguf_tokenizer import read_gguf_metadata
    from edgekit.testing import LLAMA2_TEMPLATE

    assert tok.chat_template == read_gguf_metadata(spm["gguf"], "tokenizer.")["tokenizer.chat_template"] \
        == LLAMA2_TEMPLATE


def _gemma_style(tj: dict) -> None:
    """No space prefix (Replace only, as Gemma), no bos, eos after the text, and one user-defined (non-special)
    token: matched in raw text even with special tokens off."""
    tj["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    tj["decoder"]["decoders"] = tj["decoder"]["decoders"][:-1]  # no Strip
    tj["post_processor"] = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                                    {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    word = next(t for t in tj["model"]["vocab"] if len(t) >= 3 and t.isalpha())
    tj["added_tokens"].append({"id": tj["model"]["vocab"][word], "content": word, "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False, "special": False})


def test_gemma_style_no_prefix_no_bos_eos_and_user_defined(spm, tmp_path):
    from edgekit.exporters.gguf_vocab import parity_text, tokenizer_parity
    from edgekit.gguf_tokenizer import TOKENIZER_KEYS, read_gguf_metadata
    from tokenizers import Tokenizer

    folder = _variant(spm["src"], tmp_path / "gemma-style", _gemma_style)
    path = _vocab_gguf(folder, tmp_path / "vocab.gguf")
    meta = read_gguf_metadata(path, TOKENIZER_KEYS)
    assert (meta["tokenizer.ggml.add_space_prefix"], meta["tokenizer.ggml.add_bos_token"],
            meta["tokenizer.ggml.add_eos_token"]) == (False, False, True)
    assert 4 in set(meta["tokenizer.ggml.token_type"])  # USER_DEFINED
    tok = _rebuild(path, tmp_path / "tok")
    shutil.copy(folder / "config.json", tmp_path / "tok" / "config.json")
    res = tokenizer_parity(path, tmp_path / "tok")
    assert res["identical"], res
    orig = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = parity_text()
    orig.encode_special_tokens = True
    assert _ids(tok, text, False) == orig.encode(text, add_special_tokens=False).ids
    user = next(a for a in tok.added_tokens_decoder.values() if not a.special)
    assert _ids(tok, f"x{user.content}y", False) == _llama(path).tokenize(f"x{user.content}y".encode(), special=False,
                                                                           add_bos=False)
    assert user.content in tok.convert_ids_to_tokens(_ids(tok, f"x{user.content}y", False))
    ids = tok(" Hello").input_ids
    assert ids[-1] == 2 and ids[0] != 1 and tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tok.decode(ids, skip_special_tokens=True) == " Hello"


def _phi3_style(tj: dict) -> None:
    """Phi-3's <|endoftext|> and <|end|> (llama.cpp requires the first in a model named Phi-3), in place of the two
    last-learned tokens, and every added token rstrip as Phi-3's tokenizer.json has them."""
    vocab = tj["model"]["vocab"]
    old = sorted(vocab, key=vocab.get)[-2:]
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in tj["model"]["merges"]]
    tj["model"]["merges"] = [[a, b] for a, b in pairs if a + b not in old and a not in old and b not in old]
    for text, new in zip(old, ("<|endoftext|>", "<|end|>")):
        vocab[new] = vocab.pop(text)
        tj["added_tokens"].append({"id": vocab[new], "content": new, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
    for a in tj["added_tokens"]:
        a["rstrip"] = a["content"] not in ("<unk>", "<s>", "<|endoftext|>")


def test_phi3_named_model_strips_after_special_tokens(spm, tmp_path):
    """llama.cpp strips the whitespace after special tokens in a model whose name says Phi-3; so does the rebuild."""
    from edgekit.exporters.gguf_vocab import tokenizer_parity
    from edgekit.gguf_tokenizer import TOKENIZER_KEYS, read_gguf_metadata

    folder = _variant(spm["src"], tmp_path / "phi-3-tiny", _phi3_style)
    path = _vocab_gguf(folder, tmp_path / "vocab.gguf")
    assert "phi-3" in read_gguf_metadata(path, TOKENIZER_KEYS)["general.name"]
    tok = _rebuild(path, tmp_path / "tok")
    shutil.copy(folder / "config.json", tmp_path / "tok" / "config.json")
    res = tokenizer_parity(path, tmp_path / "tok")
    assert res["identical"], res
    text = "<|end|>\n  next</s> x<|endoftext|> y"
    ids = _ids(tok, text, True)
    assert ids == _llama(path).tokenize(text.encode(), add_bos=True, special=True)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["<s>", "<|end|>"] and pieces[2].startswith("▁n")  # "\n  " went with <|end|>
    plain = _variant(spm["src"], tmp_path / "tiny", _phi3_style)  # the same vocab under another name: no strip
    tok2 = _rebuild(_vocab_gguf(plain, tmp_path / "plain.gguf"), tmp_path / "tok2")
    assert _ids(tok2, text, True) == _llama(tmp_path / "plain.gguf").tokenize(text.encode(), add_bos=True,
                                                                              special=True) != ids


def test_byte_level_gguf_is_left_to_transformers(tmp_path):
    from edgekit.gguf_tokenizer import gguf_tokenizer_model, spm_tokenizer_from_gguf, write_spm_tokenizer
    from edgekit.testing import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "bytelevel")  # GPT-2 style byte-level BPE tokenizer
    path = _vocab_gguf(folder, tmp_path / "vocab.gguf")
    assert gguf_tokenizer_model(path) == "gpt2"
    assert spm_tokenizer_from_gguf(path) is None
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert write_spm_tokenizer(path, folder) is False
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


def test_gguf_to_hf_writes_the_spm_tokenizer(spm, tmp_path, monkeypatch):
    """The converted folder holds the rebuilt BPE (transformers would write its own), loads with AutoTokenizer, goes
    back into a GGUF through edgekit's exporter with parity, and an older cached conversion gets it on next use."""
    from transformers import AutoTokenizer

    from edgekit.exporters.gguf_vocab import parity_text, tokenizer_parity
    from edgekit.models import gguf_to_hf

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny-spm.gguf"
    shutil.copy(spm["gguf"], gguf)
    out = gguf_to_hf(gguf)
    assert json.loads((out / "edgekit-source.json").read_text())["tokenizer"] == "edgekit-spm-bpe"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert "edgekit_tokenizer" in tc and tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (out / "tokenizer.model").exists() and not list(out.glob(".tokenizer.tmp-*"))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert list(tok("x")) == ["input_ids", "attention_mask"] and tok.padding_side == "left"  # as Llama's own class
    text = parity_text()
    assert _ids(tok, text, False) == _llama(gguf).tokenize(text.encode(), add_bos=False, special=False)
    res = tokenizer_parity(_vocab_gguf(out, tmp_path / "again.gguf"), out)
    assert res["identical"], res
    # a folder converted before the rebuild existed: no "tokenizer" in edgekit-source.json
    src = json.loads((out / "edgekit-source.json").read_text())
    del src["tokenizer"]
    (out / "edgekit-source.json").write_text(json.dumps(src))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert gguf_to_hf(gguf) == out
    assert "edgekit_tokenizer" in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "edgekit-source.json").read_text())["tokenizer"] == "edgekit-spm-bpe"
