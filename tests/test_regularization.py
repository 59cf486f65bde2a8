"""toygpt/regularization.py and train.py's epochs rule (issue 18.2): the tiny preset's dropout follows the epochs a run
trains, never falls as the run gets longer (a faster machine, a longer budget), is recorded as --dropout, and
--resume keeps it.

Faster machines are simulated with step counts, as the issue asks: on tiny Shakespeare's training split, the tiny
preset's 10-minute run on the development machine (about 2,000 steps) and those of machines 2x, 4x and 8x faster.
"""

import json

import pytest
import torch

from conftest import one_thread, small_config
from test_train import TINY, metrics, run_train
from toygpt import regularization
from toygpt.defaults import EPOCH_DROPOUT, TRAINING_DEFAULTS

TINY_SHAKESPEARE_TRAIN_TOKENS = 301_966  # its training split in GPT-2 tokens (the vocab pass counts them)
TINY_STEP_TOKENS = 4 * 256  # the tiny preset's batch x context


def test_more_steps_never_get_less_dropout():
    steps = [2_000, 4_000, 8_000, 16_000]  # 10 minutes here, and on machines 2x, 4x, 8x faster
    epochs = [regularization.run_epochs(n, TINY_STEP_TOKENS, TINY_SHAKESPEARE_TRAIN_TOKENS) for n in steps]
    assert epochs == pytest.approx([6.78, 13.56, 27.13, 54.26], abs=0.01)
    dropouts = [regularization.dropout_for_epochs(e) for e in epochs]
    assert dropouts == sorted(dropouts) and dropouts[-1] > dropouts[0], dropouts
    # Over a fine grid: non-decreasing, continuous (no step larger than the steepest segment allows), within [0, 1).
    grid = [i / 10 for i in range(0, 1000)]
    values = [regularization.dropout_for_epochs(e) for e in grid]
    assert all(a <= b for a, b in zip(values, values[1:]))
    steepest = max((y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(EPOCH_DROPOUT, EPOCH_DROPOUT[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) <= steepest * 0.1 + 1e-3
    assert 0.0 <= min(values) and max(values) < 1.0


def test_one_epoch_needs_no_dropout_and_the_points_are_the_rule():
    assert regularization.dropout_for_epochs(0.5) == regularization.dropout_for_epochs(1.0) == 0.0
    for x, y in EPOCH_DROPOUT:
        assert regularization.dropout_for_epochs(x) == pytest.approx(y)
    assert TRAINING_DEFAULTS["tiny"]["dropout"] is None  # the tiny preset uses the rule
    assert "dropout" not in TRAINING_DEFAULTS["gpt2"]  # gpt2 keeps its architecture's 0.0


def test_set_dropout_reaches_every_dropout_of_the_model():
    from modeling_toygpt import ToyGPTForCausalLM

    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(dropout=0.0)).train()
    ids = torch.randint(0, 100, (2, 16))
    assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout: training mode is deterministic
    regularization.set_dropout(model, 0.3)
    assert model.config.dropout == 0.3
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 + 2 * model.config.n_layer and set(dropouts) == {0.3}
    assert all(block.attn.dropout == 0.3 for block in model.transformer.h)
    assert not torch.equal(model(ids).logits, model(ids).logits)
    assert torch.equal(model.eval()(ids).logits, model(ids).logits)  # evals never drop


def test_counting_stops_where_the_rule_no_longer_depends_on_it():
    needed = regularization.tokens_worth_counting(20_000, TINY_STEP_TOKENS)
    # A split that long trains at most the rule's no-dropout epochs, however long the run.
    assert regularization.dropout_for_epochs(regularization.run_epochs(20_000, TINY_STEP_TOKENS, needed)) == 0.0
    assert regularization.dropout_for_epochs(regularization.run_epochs(20_000, TINY_STEP_TOKENS, needed // 2)) > 0.0


# ----------------------------------------------------------------------------------------------------------------
# train.py: real runs on 6 kB of Shakespeare (about 1,500 training tokens), 128 tokens a step


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, shakespeare_path):
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    return path


def rule_run(out, text, steps, *flags):
    proc = run_train("--input", text, "--output-dir", out, *TINY, "--max-steps", steps, "--eval-every", 1000,
                     "--eval-batches", 1, "--checkpoint-every", 1000, "--report-to", "none", *flags)
    args = json.loads((out / "training_args.json").read_text())
    state = json.loads(next((out / "checkpoint").glob("step-*/trainer_state.json")).read_text())
    return proc, args, state


def test_a_longer_run_gets_more_dropout_recorded_everywhere_and_resume_keeps_it(tmp_path, small_text, capsys):
    short_proc, short, state = rule_run(tmp_path / "short", small_text, 15)
    # The full vocabulary has no vocabulary pass: the run counts the split itself.
    long_proc, long, long_state = rule_run(tmp_path / "long", small_text, 120, "--vocab", "full")
    train_tokens = state["vocab"]["train_tokens"]
    assert 1_000 < train_tokens < 2_000 and long_state["vocab"] is None
    for proc, args, steps in ((short_proc, short, 15), (long_proc, long, 120)):
        epochs = regularization.run_epochs(steps, 128, train_tokens)
        assert args["dropout"] == regularization.dropout_for_epochs(epochs)
        assert f"read the training split's {train_tokens:,} tokens {epochs:.1f} times" in proc.stderr
    assert short["dropout"] == 0.0 < long["dropout"]
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    assert config["dropout"] == long["dropout"] == long_state["args"]["dropout"]
    # --resume to 8x the steps keeps the recorded choice (the rule does not decide again mid-run), though 120 steps
    # from the start would get dropout; train.main() in this process, the runs above being real ones.
    assert regularization.dropout_for_epochs(regularization.run_epochs(120, 128, train_tokens)) > 0.0
    import train

    with one_thread():
        code = train.main(["--output-dir", str(tmp_path / "short"), "--resume", "--max-steps", "120", "--report-to",
                           "none"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert json.loads((tmp_path / "short" / "training_args.json").read_text())["dropout"] == 0.0
    assert "epochs rule" not in err and metrics(tmp_path / "short")[-1]["step"] == 120


def test_a_count_that_stops_early_is_printed_as_a_floor(tmp_path, small_text, capsys):
    """--vocab full has no vocabulary pass: the run counts the split itself, only as far as the rule needs (4 steps:
    65 tokens), and says that the count is a floor and the epochs a ceiling; train.main() in this process."""
    import re

    import train

    with one_thread():
        code = train.main(["--input", str(small_text), "--output-dir", str(tmp_path / "out"), *map(str, TINY),
                           "--max-steps", "4", "--vocab", "full", "--eval-every", "1000", "--eval-batches", "1",
                           "--checkpoint-every", "1000", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    line = re.search(r"dropout 0: 4 steps of 128 tokens read the training split's ([\d,]+)\+ tokens \(counted that "
                     r"far\) at most ([\d.]+) times", err)
    assert line, err[-3000:]
    counted = int(line[1].replace(",", ""))
    assert counted >= regularization.tokens_worth_counting(4, 128)
    assert float(line[2]) == round(regularization.run_epochs(4, 128, counted), 1)
