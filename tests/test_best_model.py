"""toygpt/best_model.py and train.py --keep-best (issue 18.1): a run that ends worse than it was saves the weights of
its best eval, names that step, keeps it exactly across a kill and --resume; --no-keep-best saves the last. And the one
validation loss (issue 21.1): the saved model, the card, the curve and quantize.py agree on it.

The runs are real `python train.py` processes: a 2-layer, 32-wide model at a constant, high learning rate (3e-2) on
8 kB of Shakespeare (many epochs), whose validation loss swings and ends above its low; the tests check that premise.
"""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train import TINY, metrics, run_train, train_cmd, train_env
from toygpt.defaults import TRAINING_DEFAULTS

TINY_EMA_DECAY = TRAINING_DEFAULTS["tiny"]["ema_decay"]  # the average the tiny preset evaluates and saves

STEPS = 40
OVERFIT = TINY + ["--max-steps", str(STEPS), "--eval-every", "4", "--lr", "3e-2", "--min-lr", "3e-2",
                  "--warmup-steps", "0", "--schedule", "cosine", "--checkpoint-every", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, shakespeare_path):
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:8_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, small_text):
    out = tmp_path_factory.mktemp("best") / "model"
    run_train("--input", small_text, "--output-dir", out, *OVERFIT)
    return out


def evals(out_dir):
    """(step, val loss) of each eval before the final record."""
    return [(r["step"], r["val_loss"]) for r in metrics(out_dir) if "val_loss" in r and not r.get("final")]


def saved_val_loss(model_dir, text) -> float:
    """The validation loss of the saved model dir, by the one definition (evaluation.validation_windows)."""
    from modeling_toygpt import ToyGPTForCausalLM
    from toygpt.evaluation import evaluate, validation_windows
    from toygpt.training_loss import CausalLMLoss

    model = ToyGPTForCausalLM.from_pretrained(model_dir)
    return evaluate(CausalLMLoss(model), validation_windows(text, 32), batch_size=4)["val_loss"]


def test_a_run_that_ends_worse_saves_its_best_eval(overfit_run, small_text):
    steps = dict(evals(overfit_run))
    best_step = min(steps, key=steps.get)
    final = metrics(overfit_run)[-1]
    assert final["final"] and final["step"] == STEPS
    assert steps[STEPS] > steps[best_step] and best_step < STEPS, steps  # the premise: the last eval is worse
    assert final["best_step"] == best_step and final["val_loss"] == steps[best_step]
    assert final["last_val_loss"] == steps[STEPS]
    # To 1e-6 of the eval (float32 sums: the run evaluated the compact corpus-vocabulary model, this the full one).
    assert saved_val_loss(overfit_run, small_text) == pytest.approx(steps[best_step], rel=1e-6)
    card = " ".join((overfit_run / "README.md").read_text().split())
    assert (f"The weights are an exponential moving average of the trained weights (decay {TINY_EMA_DECAY:g}), as it "
            f"was at step {best_step}, the eval with the lowest validation loss") in card  # the tiny preset's average
    assert f"| validation loss | {steps[best_step]:.4f} |" in card
    # The checkpoint kept for --resume has the best beside it.
    assert (overfit_run / "checkpoint" / f"best-for-step-{STEPS:08d}.safetensors").is_file()


def test_no_keep_best_saves_the_last_weights(tmp_path, overfit_run, small_text):
    out = tmp_path / "model"
    run_train("--input", small_text, "--output-dir", out, *OVERFIT, "--no-keep-best")
    assert evals(out) == evals(overfit_run)  # the same run
    final = metrics(out)[-1]
    assert "best_step" not in final and final["val_loss"] == evals(out)[-1][1]
    assert saved_val_loss(out, small_text) == pytest.approx(evals(out)[-1][1], rel=1e-6)
    card = " ".join((out / "README.md").read_text().split())
    assert "the eval with the lowest" not in card and f"(decay {TINY_EMA_DECAY:g}), as it was at the last step." in card
    assert not list((out / "checkpoint").glob("best-*"))


@pytest.mark.slow
def test_resume_after_a_kill_keeps_the_best_exactly(tmp_path, overfit_run, small_text):
    best_step = metrics(overfit_run)[-1]["best_step"]
    out = tmp_path / "model"
    log = tmp_path / "killed_run.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(train_cmd("--input", small_text, "--output-dir", out, *OVERFIT), env=train_env(),
                                stdout=subprocess.DEVNULL, stderr=f)
    try:  # killed once a checkpoint after the best step is complete (its trainer_state.json is written last)
        deadline = time.monotonic() + 240
        done = out / "checkpoint" / f"step-{best_step + 2:08d}" / "trainer_state.json"
        while proc.poll() is None and time.monotonic() < deadline and not done.is_file():
            time.sleep(0.01)
        assert proc.poll() is None, f"run ended before it could be killed:\n{log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = max(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint/step-*/trainer_state.json"))
    assert best_step < killed_at < STEPS
    run_train("--resume", "--output-dir", out)
    final, reference = metrics(out)[-1], metrics(overfit_run)[-1]
    assert (final["best_step"], final["val_loss"]) == (reference["best_step"], reference["val_loss"])
    a, b = load_file(overfit_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_quantize_evaluates_the_training_runs_validation_loss(overfit_run, tmp_path):
    """One model, one validation loss (issue 21.1): quantize.py's fp32 figure is the saved model's, as carded."""
    from toygpt.quantization import quantize_dir

    figures = quantize_dir(overfit_run, tmp_path / "int8", speed_tokens=0, log=lambda message: None)
    assert figures["before"]["val_loss"] == pytest.approx(metrics(overfit_run)[-1]["val_loss"], rel=1e-6)


def test_the_curve_has_one_point_per_eval_step(overfit_run):
    from toygpt.run_log import validation_curve

    curve = validation_curve(metrics(overfit_run))
    assert curve == evals(overfit_run) and len({step for step, _ in curve}) == len(curve)


# ----------------------------------------------------------------------------------------------------------------
# The pieces


def test_evals_are_twice_as_dense_where_the_schedule_decays():
    from toygpt.best_model import eval_due

    assert [s for s in range(1, 1001) if eval_due(s, 1000, 100)] == [100, 200, 300, 400, 500, 600, 700, 750, 800, 850,
                                                                      900, 950, 1000]
    assert [s for s in range(1, 41) if eval_due(s, 40, 4)] == [4, 8, 12, 16, 20, 24, 28, 30, 32, 34, 36, 38, 40]
    assert [s for s in range(1, 5) if eval_due(s, 4, 1)] == [1, 2, 3, 4]


def test_the_best_round_trips_exactly_with_tied_weights(tmp_path, config):
    from modeling_toygpt import ToyGPTForCausalLM
    from toygpt.best_model import BestModel, best_path, prune

    torch.manual_seed(0)
    model = ToyGPTForCausalLM(config)
    best = BestModel()
    assert best.offer(3, {"val_loss": 2.5}, model)
    assert not best.offer(4, {"val_loss": 2.5}, model)  # only a lower loss replaces it
    assert best.weights["transformer.wte.weight"].device.type == "cpu"
    assert len(best.weights) == len(model.state_dict()) - 1  # the tied head once
    best.save(tmp_path, 4)
    best.save(tmp_path, 6)  # unchanged: a hard link of the previous file
    assert os.path.samefile(best_path(tmp_path, 4), best_path(tmp_path, 6))
    prune(tmp_path, 6)
    assert not best_path(tmp_path, 4).exists()
    loaded = BestModel.load(tmp_path, 6)
    assert (loaded.step, loaded.result) == (3, {"val_loss": 2.5})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    loaded.load_into(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.weights.items())
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    assert BestModel.load(tmp_path, 8).step is None  # no best for that checkpoint: none yet
