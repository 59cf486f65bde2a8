"""ToyGPTConfig: validation with clear errors, presets, transformers' standard attribute names."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from configuration_toygpt import PRESETS, ToyGPTConfig
from conftest import small_config
from modeling_toygpt import ToyGPTForCausalLM


@pytest.mark.parametrize(
    "overrides, field, value",
    [
        (dict(n_embd=30, n_head=4), "n_embd", "30"),
        (dict(hidden_size=30, num_attention_heads=4), "n_embd", "30"),  # standard names are validated too
        (dict(n_layer=0), "n_layer", "0"),
        (dict(n_head=-2), "n_head", "-2"),
        (dict(n_embd=0), "n_embd", "0"),
        (dict(block_size=0), "block_size", "0"),
        (dict(vocab_size=-1), "vocab_size", "-1"),
        (dict(n_layer=2.5), "n_layer", "2.5"),
        (dict(dropout=1.0), "dropout", "1.0"),
        (dict(dropout=-0.1), "dropout", "-0.1"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon", "0.0"),
    ],
)
def test_invalid_config_raises_naming_field_and_value(overrides, field, value):
    with pytest.raises(ValueError) as excinfo:
        small_config(**overrides)
    message = str(excinfo.value)
    assert field in message and value in message, message


def test_valid_edge_values_are_accepted():
    config = small_config(dropout=0.0, n_head=32, n_embd=32)  # head size 1 is odd but legal
    assert config.n_head == 32 and config.dropout == 0.0
    assert small_config(dropout=0.99).dropout == 0.99


def test_gpt2_preset_is_gpt2_small_124m():
    config = ToyGPTConfig.from_preset("gpt2")
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (12, 12, 768, 1024)
    assert config.vocab_size == 50257
    with torch.device("meta"):  # count parameters without allocating 500 MB
        toygpt = ToyGPTForCausalLM(config)
        reference = GPT2LMHeadModel(GPT2Config())
    assert toygpt.num_parameters() == reference.num_parameters()
    assert 123e6 < toygpt.num_parameters() < 125e6


def test_presets_and_overrides():
    assert set(PRESETS) >= {"tiny", "gpt2"}
    tiny = ToyGPTConfig.from_preset("tiny", n_layer=2)
    assert tiny.n_layer == 2 and tiny.n_embd == PRESETS["tiny"]["n_embd"]
    with pytest.raises(ValueError, match="gpt2"):  # the message lists the valid names
        ToyGPTConfig.from_preset("huge")


def test_standard_names_alias_nanogpt_names(tmp_path):
    config = ToyGPTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128)
    assert (config.n_embd, config.n_layer, config.n_head, config.block_size) == (64, 3, 4, 128)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 4)
    assert config.max_position_embeddings == 128

    config.save_pretrained(tmp_path)
    reloaded = ToyGPTConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict()["n_embd"] == 64 and reloaded.hidden_size == 64
    assert reloaded.auto_map["AutoModelForCausalLM"] == "modeling_toygpt.ToyGPTForCausalLM"
    assert reloaded.quantization is None
