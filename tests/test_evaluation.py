"""toygpt/evaluation.py: one evaluation (loss, perplexity, bits per character) that train.py, quantize.py and the benches
share, over the same windows, with the head's memory bounded by a chunk."""

import math

import pytest
import torch
import torch.nn.functional as F

from toygpt.stream import val_windows
from conftest import small_config
from toygpt.evaluation import evaluate
from modeling_toygpt import ToyGPTForCausalLM
from toygpt.training_loss import CausalLMLoss


def test_evaluate_is_the_mean_cross_entropy_and_bits_per_character(tmp_path):
    text = "".join(f"Vers {i}: « déjà vu » — ça va? 🙂\n" for i in range(400))
    path = tmp_path / "fr.txt"
    path.write_text(text, encoding="utf-8")
    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(block_size=16)).train()
    val = val_windows(path, 16)
    with torch.no_grad():
        logits = model.eval()(val.windows[:, :-1]).logits
    model.train()
    summed = F.cross_entropy(logits.flatten(0, 1), val.windows[:, 1:].flatten(), reduction="sum").item()
    tokens = val.windows[:, 1:].numel()
    result = evaluate(CausalLMLoss(model), val, batch_size=3)  # 3 does not divide the window count
    assert result["val_tokens"] == tokens
    assert result["val_loss"] == pytest.approx(summed / tokens, rel=1e-5)
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_bits_per_char"] == pytest.approx(summed / val.target_chars.sum().item() / math.log(2), rel=1e-5)
    assert model.training  # put back in the mode it was in
    # max_batches: a prefix of the same windows
    first = evaluate(CausalLMLoss(model), val, batch_size=2, max_batches=1)
    assert first["val_tokens"] == 2 * 16


def test_validation_windows_are_the_whole_held_out_split_or_the_stated_subset(tmp_path, monkeypatch):
    """The one definition of the validation loss (issue 21.1): every window of the held-out split, capped at
    VAL_MAX_TOKENS target tokens, or the first eval_batches x batch_size where a run states that subset."""
    from toygpt import evaluation

    path = tmp_path / "text.txt"
    path.write_text("".join(f"Line {i}: to be, or not to be.\n" for i in range(2000)), encoding="utf-8")
    whole = val_windows(path, 16)
    assert torch.equal(evaluation.validation_windows(path, 16).windows, whole.windows)
    assert torch.equal(evaluation.validation_windows(path, 16, eval_batches=2, batch_size=3).windows, whole.windows[:6])
    assert len(evaluation.validation_windows(path, 16, eval_batches=10**6, batch_size=4).windows) == len(whole.windows)
    monkeypatch.setattr(evaluation, "VAL_MAX_TOKENS", 16 * 5)
    assert torch.equal(evaluation.validation_windows(path, 16).windows, whole.windows[:5])


@pytest.mark.parametrize("training", [False, True])
def test_evaluate_leaves_the_model_in_the_mode_it_found_it(tmp_path, training):
    """A model in eval mode (loaded for quantize.py, for the app) stays in it: with dropout in its config, a model
    left in training mode would give different logits on every call (quantize.py's reload check caught it)."""
    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(dropout=0.1)).train(training)
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    val = val_windows(path, model.config.block_size)
    evaluate(CausalLMLoss(model), val, batch_size=2)
    assert all(module.training == training for module in model.modules())
