import json

import pytest

from edgekit.errors import EdgekitError
from edgekit.models import SUPPORTED_ARCHS, default_gguf, resolve_model


def test_missing_path():
    with pytest.raises(EdgekitError, match="model path not found"):
        resolve_model("/definitely/not/here")


def test_folder_without_config(tmp_path):
    with pytest.raises(EdgekitError, match="is not a model folder: it has no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_arch_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EdgekitError) as e:
        resolve_model(str(tmp_path))
    assert "unsupported architecture 'bert'" in str(e.value) and "Llama, Qwen2, Mistral" in str(e.value)


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
        assert ref.arch == arch and arch in SUPPORTED_ARCHS


@pytest.mark.smollm2
def test_default_model_and_gguf_path_share_one_cached_folder():
    d = resolve_model(None)
    g = resolve_model(str(default_gguf()))
    assert d.path == g.path and d.arch == "llama"
    cfg = d.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert "quantization_config" not in cfg
    assert (d.path / "tokenizer.json").is_file() and not (d.path / "tokenizer.model").exists()
