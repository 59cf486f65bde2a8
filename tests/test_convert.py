"""convert_gpt2.py: ToyGPT <-> transformers' GPT2LMHeadModel, exact both ways, as functions and as a CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import REPO, small_config
from toygpt.gpt2_conversion import (
    convert_from_gpt2,
    convert_to_gpt2,
    gpt2_config_from_toygpt,
    gpt2_to_toygpt,
    toygpt_config_from_gpt2,
    toygpt_to_gpt2,
)
from toygpt.model_dir import ModelDirError, check_model_dir
from convert_gpt2 import main
from modeling_toygpt import ToyGPTForCausalLM

EOT = 50256


def small_gpt2_config(**overrides):
    return GPT2Config(**{**dict(n_layer=2, n_head=2, n_embd=32, n_positions=64), **overrides})


def random_gpt2(**overrides):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(small_gpt2_config(**overrides)).eval()
    with torch.no_grad():  # GPT-2's init zeroes biases and sets LayerNorms to 1: randomize so every tensor counts
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def random_toygpt(**overrides):
    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def assert_same_function(a, b, vocab_size=50257):
    torch.manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, 24))
    with torch.no_grad():
        diff = (a(input_ids).logits - b(input_ids).logits).abs().max().item()
    assert diff <= 1e-4, f"logits differ by {diff}"
    prompt = input_ids[:1, :6]
    tokens_a = a.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=EOT)
    tokens_b = b.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=EOT)
    assert tokens_a.tolist() == tokens_b.tolist()


def assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("bias", [True, False])
def test_toygpt_to_gpt2_and_back(bias):
    toygpt = random_toygpt(bias=bias, dropout=0.1, initializer_range=0.2)
    gpt2 = toygpt_to_gpt2(toygpt)
    assert type(gpt2) is GPT2LMHeadModel and not gpt2.training
    assert gpt2.config.n_positions == 64 and gpt2.config.resid_pdrop == gpt2.config.attn_pdrop == 0.1
    assert_same_function(toygpt, gpt2)

    back = gpt2_to_toygpt(gpt2)
    assert back.config.block_size == 64 and back.config.dropout == 0.1 and back.config.bias
    if bias:
        assert_same_state(back, toygpt)
    assert_same_function(back, toygpt)


def test_gpt2_to_toygpt_and_back():
    gpt2 = random_gpt2(layer_norm_epsilon=1e-6, initializer_range=0.2)
    toygpt = gpt2_to_toygpt(gpt2)
    assert type(toygpt) is ToyGPTForCausalLM
    assert toygpt.config.layer_norm_epsilon == 1e-6 and toygpt.config.block_size == 64
    assert toygpt.lm_head.weight is toygpt.transformer.wte.weight
    # GPT-2's Conv1D stores [in, out]; ToyGPT's Linear stores [out, in].
    assert torch.equal(toygpt.transformer.h[0].attn.c_attn.weight, gpt2.transformer.h[0].attn.c_attn.weight.t())
    assert_same_function(gpt2, toygpt)
    assert_same_state(toygpt_to_gpt2(toygpt), gpt2)


def test_config_mapping_both_ways():
    toygpt_config = small_config(dropout=0.2, layer_norm_epsilon=1e-6, initializer_range=0.03)
    gpt2_config = gpt2_config_from_toygpt(toygpt_config)
    assert (gpt2_config.n_layer, gpt2_config.n_head, gpt2_config.n_embd, gpt2_config.n_positions) == (2, 2, 32, 64)
    assert gpt2_config.activation_function == "gelu_new" and gpt2_config.n_inner is None
    assert gpt2_config.resid_pdrop == gpt2_config.embd_pdrop == gpt2_config.attn_pdrop == 0.2
    assert gpt2_config.layer_norm_epsilon == 1e-6 and gpt2_config.initializer_range == 0.03
    assert gpt2_config.eos_token_id == gpt2_config.bos_token_id == EOT
    assert toygpt_config_from_gpt2(gpt2_config).to_diff_dict() == toygpt_config.to_diff_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_inner=100), "n_inner"),
        (dict(activation_function="relu"), "activation_function"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(scale_attn_weights=False), "scale_attn_weights"),
        (dict(attn_pdrop=0.0), "dropout"),
    ],
)
def test_unrepresentable_gpt2_config_is_refused(overrides, field):
    with pytest.raises(ValueError, match=field):
        toygpt_config_from_gpt2(small_gpt2_config(**overrides))


def test_representable_variants_are_accepted():
    assert toygpt_config_from_gpt2(small_gpt2_config(n_inner=128)).n_embd == 32  # n_inner == 4 * n_embd
    assert toygpt_config_from_gpt2(small_gpt2_config(activation_function="gelu_pytorch_tanh")).n_layer == 2


def test_int8_toygpt_is_refused():
    with pytest.raises(ValueError, match="int8"):
        gpt2_config_from_toygpt(small_config(quantization={"method": "int8"}))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "convert_gpt2.py", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_cli_refuses(argv, message, capsys):
    """main() answers bad input like argparse does: status 2, a one-line reason, no traceback."""
    assert main([str(arg) for arg in argv]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # earlier lines: progress bars of the conversions above
    assert err.startswith("convert_gpt2.py: error: ") and message in err


def test_cli_converts_both_ways_between_directories(tmp_path, capsys):
    gpt2 = random_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")
    toygpt_dir, gpt2_again_dir = tmp_path / "toygpt", tmp_path / "gpt2-again"

    proc = run_cli("from-gpt2", tmp_path / "gpt2", toygpt_dir)
    assert proc.returncode == 0, proc.stderr
    assert check_model_dir(toygpt_dir)["model_type"] == "toygpt"
    assert {"tokenizer.json", "configuration_toygpt.py", "modeling_toygpt.py"} <= {p.name for p in toygpt_dir.iterdir()}
    toygpt = ToyGPTForCausalLM.from_pretrained(toygpt_dir).eval()
    assert_same_function(gpt2, toygpt)

    assert main(["to-gpt2", str(toygpt_dir), str(gpt2_again_dir)]) == 0  # the way back in-process: no second import
    config = json.loads((gpt2_again_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(gpt2_again_dir).eval()  # native class, no remote code
    assert type(reloaded) is GPT2LMHeadModel
    assert_same_state(reloaded, gpt2)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_again_dir)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995] and tokenizer.eos_token_id == EOT

    # An existing DST is refused with a clear message, and replaced with --overwrite.
    assert_cli_refuses(["to-gpt2", toygpt_dir, gpt2_again_dir], "--overwrite", capsys)
    assert_cli_refuses(["from-gpt2", tmp_path / "gpt2", toygpt_dir], "--overwrite", capsys)
    before = (gpt2_again_dir / "model.safetensors").stat().st_mtime_ns
    convert_to_gpt2(toygpt_dir, gpt2_again_dir, overwrite=True)
    assert (gpt2_again_dir / "model.safetensors").stat().st_mtime_ns != before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_bad_sources_are_refused_clearly(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(ModelDirError, match="not a directory"):
        convert_from_gpt2(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ModelDirError, match="not a directory"):
        convert_to_gpt2(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="config.json"):
        convert_from_gpt2(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelDirError, match="to-gpt2"):  # a ToyGPT dir given to from-gpt2 points at the other way
        convert_from_gpt2(tiny_model_dir, tmp_path / "out")

    gpt2_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16).save_pretrained(gpt2_dir)
    with pytest.raises(ModelDirError, match="no weights"):
        convert_from_gpt2(gpt2_dir, tmp_path / "out")
    with pytest.raises(ModelDirError, match="from-gpt2"):  # a GPT-2 dir given to to-gpt2
        convert_to_gpt2(gpt2_dir, tmp_path / "out")

    int8_dir = tmp_path / "int8"
    int8_dir.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (int8_dir / "config.json").write_text(json.dumps({**config, "quantization": {"method": "int8"}}))
    (int8_dir / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelDirError, match="int8"):
        convert_to_gpt2(int8_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="is the input itself"):
        convert_to_gpt2(tiny_model_dir, tiny_model_dir, overwrite=True)
    assert not (tmp_path / "out").exists()

    assert_cli_refuses(["from-gpt2", tmp_path / "missing", tmp_path / "out"], "not a directory", capsys)
    assert_cli_refuses(["to-gpt2", tmp_path / "empty", tmp_path / "out"], "config.json", capsys)


@pytest.mark.parametrize("direction, keep", [("from-gpt2", 0.5), ("to-gpt2", 0.0001)],
                         ids=["from-gpt2-half", "to-gpt2-header-cut"])
def test_truncated_weights_are_refused_naming_the_file_and_nothing_is_written(tmp_path, tiny_model_dir, direction,
                                                                             keep, capsys):
    src = tmp_path / "src"
    if direction == "from-gpt2":
        random_gpt2().save_pretrained(src)
    else:
        shutil.copytree(tiny_model_dir, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep))])  # an interrupted copy or download
    proc = run_cli(direction, src, tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"convert_gpt2.py: error: {weights} cannot be loaded (SafetensorError: "), err
    assert "copy" in err and "Nothing was written." in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temp dir
    # With --overwrite, an existing DST survives the refusal untouched (main() in this process: the same refusal).
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main([direction, str(src), str(tmp_path / "out"), "--overwrite"]) == 2  # a traceback would raise here
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("convert_gpt2.py: error: "), err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
