import json

import pytest

from edgekit.errors import EdgekitError
from edgekit.arch import FAMILIES
from edgekit.models import default_gguf, resolve_model


def test_missing_path():
    with pytest.raises(EdgekitError, match="model path not found"):
        resolve_model("/definitely/not/here")


def test_folder_without_config(tmp_path):
    with pytest.raises(EdgekitError, match="is not a model folder: it has no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("model_type", ["bert", "mixtral", "qwen2_moe"])  # encoder-only, mixtures of experts
def test_unsupported_family_names_supported_ones(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(EdgekitError) as e:
        resolve_model(str(tmp_path))
    msg = str(e.value)
    assert f"unsupported model family {model_type!r}" in msg and "\n" not in msg
    for fam in FAMILIES.values():
        assert fam.model_type in msg


def test_unsupported_gguf_family_is_refused_from_its_header(tmp_path, monkeypatch):
    """The architecture is read from the GGUF header: refused in milliseconds, before any dequantization."""
    import time

    gguf = pytest.importorskip("gguf")
    import edgekit.models as models

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "encoder.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(models, "sha256_file", lambda p: pytest.fail("hashed/dequantized before the family check"))
    t0 = time.perf_counter()
    with pytest.raises(EdgekitError, match="llama.cpp architecture 'bert', which edgekit does not support"):
        resolve_model(str(path))
    assert time.perf_counter() - t0 < 1.0
    assert models.gguf_architecture(path) == "bert"


def test_cli_refuses_an_unsupported_family_in_one_line(tmp_path, cli):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    p = cli("plan", "-t", "x86-cpu", tmp_path, check=2)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) <= 2, p.stderr
    assert "unsupported model family 'bert'" in p.stderr


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EdgekitError, match="no weights"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(EdgekitError, match="not a .gguf"):
        resolve_model(str(f))


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EdgekitError, match="could not read .* as a GGUF model"):
        resolve_model(str(f))


def test_tiny_models_resolve(tiny_models):
    for arch, path in tiny_models.items():
        ref = resolve_model(str(path))
        assert ref.arch == arch and arch in FAMILIES


@pytest.mark.smollm2
def test_default_model_and_gguf_path_share_one_cached_folder():
    d = resolve_model(None)
    g = resolve_model(str(default_gguf()))
    assert d.path == g.path and d.arch == "llama"
    cfg = d.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert "quantization_config" not in cfg
    assert (d.path / "tokenizer.json").is_file() and not (d.path / "tokenizer.model").exists()
