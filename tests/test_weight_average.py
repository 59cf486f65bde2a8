"""toygpt/weight_average.py and train.py --ema-decay: evals, the best and the model dir see an exponential moving
average of the weights; each checkpoint carries it (--resume continues it exactly: test_train's resume test, which
runs the tiny preset's default average); --ema-decay 0 evaluates and saves the trained weights themselves."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_config
from test_train import RUN, metrics, run_train
from toygpt.weight_average import decay_after, update, updates, weight_average

STEPS = int(RUN[RUN.index("--max-steps") + 1])


def test_the_decay_warms_up_then_holds():
    assert decay_after(0, 0.999) == 0.0  # the first update copies the weights
    assert decay_after(1, 0.999) == pytest.approx(2 / 11)
    assert decay_after(100, 0.999) == pytest.approx(101 / 110)
    assert decay_after(100_000, 0.999) == 0.999


def test_the_average_lerps_each_weight_once_tied_ones_included():
    from modeling_toygpt import ToyGPTForCausalLM

    model = ToyGPTForCausalLM(small_config())
    average = weight_average(model, 0.5)
    assert average.module.lm_head.weight is average.module.transformer.wte.weight  # still tied in the copy
    expected = torch.zeros(())
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0]):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        update(average, model)
        kept = decay_after(n, 0.5)
        expected = kept * expected + (1 - kept) * value  # 1, 1.545..., 2.9..., 5.45...
    assert updates(average) == 4
    for name, p in average.module.named_parameters():
        torch.testing.assert_close(p, torch.full_like(p, float(expected)), msg=name)
    assert weight_average(model, 0.0) is None


@pytest.fixture
def text(tmp_path, shakespeare_path):
    path = tmp_path / "input.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


def run_dir(text, *flags):
    """A run whose model dir is its last step's weights or their average (--no-keep-best), and that checkpoint."""
    out = text.parent / "model"
    run_train("--input", text, "--output-dir", out, *RUN, "--vocab", "full", "--no-keep-best",
              "--checkpoint-every", "1000", *flags)
    return out, out / "checkpoint" / f"step-{STEPS:08d}"


def test_a_run_evaluates_and_saves_the_average(text):
    out, last = run_dir(text, "--ema-decay", "0.9")
    saved, average = load_file(out / "model.safetensors"), load_file(last / "ema.safetensors")
    trained = load_file(last / "model.safetensors")
    assert json.loads((last / "trainer_state.json").read_text())["ema_updates"] == STEPS
    assert not torch.equal(average["transformer.h.0.mlp.c_fc.weight"], trained["transformer.h.0.mlp.c_fc.weight"])
    tied = {"lm_head.weight": "transformer.wte.weight"}  # save_model and save_pretrained keep different names
    for name, tensor in average.items():
        assert torch.equal(saved[tied.get(name, name) if name not in saved else name], tensor), name
    evals = [r["val_loss"] for r in metrics(out) if "val_loss" in r and not r.get("final")]
    assert metrics(out)[-1]["ema_decay"] == 0.9 and metrics(out)[-1]["val_loss"] == evals[-1]


def test_ema_decay_0_saves_the_trained_weights(text):
    out, last = run_dir(text, "--ema-decay", "0")
    saved, trained = load_file(out / "model.safetensors"), load_file(last / "model.safetensors")
    assert not (last / "ema.safetensors").exists()
    assert json.loads((last / "trainer_state.json").read_text())["ema_updates"] == 0
    tied = {"lm_head.weight": "transformer.wte.weight"}
    assert all(torch.equal(saved[name if name in saved else tied[name]], tensor) for name, tensor in trained.items())
    assert "ema_decay" not in metrics(out)[-1]


@pytest.mark.parametrize("final, label", [({"ema_decay": 0.995}, "validation (the weights' moving average)"),
                                          ({}, "validation")])
def test_the_loss_curve_says_whose_validation_loss_it_plots(tmp_path, monkeypatch, final, label):
    import matplotlib.pyplot as plt

    from toygpt.run_log import plot_loss_curve

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    records = [{"step": 1, "train_loss": 5.0}, {"step": 1, "val_loss": 5.5},
               {"final": True, "step": 1, "val_loss": 5.5, "best_step": 1, **final}]
    plot_loss_curve(records, tmp_path / "curve.png")
    assert label in figures[0].axes[0].get_legend_handles_labels()[1]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
