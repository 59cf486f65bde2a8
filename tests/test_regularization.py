"""toygpt/regularization.py and train.py's epochs rules (issue 18.2): the tiny preset's weight decay follows the epochs
a run trains, never falls as the run gets longer (a faster machine, a longer budget), is recorded as --weight-decay,
reaches the optimizer, and --resume keeps it; the preset trains without dropout however long the run.

Faster machines are simulated with step counts, as the issue asks: on tiny Shakespeare's training split, the tiny
preset's 10-minute run on the development machine (about 2,000 steps) and those of machines 2x, 4x and 8x faster.
"""

import json

import pytest
import torch

from conftest import one_thread, small_config
from test_train import TINY, metrics, run_train
from toygpt import regularization
from toygpt.defaults import EPOCH_RULES, FINE_TUNING_DEFAULTS, TRAINING_DEFAULTS

TINY_SHAKESPEARE_TRAIN_TOKENS = 301_966  # its training split in GPT-2 tokens (the vocab pass counts them)
TINY_STEP_TOKENS = 4 * 256  # the tiny preset's batch x context


@pytest.mark.parametrize("name", sorted(EPOCH_RULES))
def test_more_steps_never_get_less_regularisation(name):
    rule = EPOCH_RULES[name]
    steps = [600, 2_000, 4_000, 8_000, 16_000]  # 3 and 10 minutes here, 10 on machines 2x, 4x, 8x faster
    epochs = [regularization.run_epochs(n, TINY_STEP_TOKENS, TINY_SHAKESPEARE_TRAIN_TOKENS) for n in steps]
    assert epochs == pytest.approx([2.03, 6.78, 13.56, 27.13, 54.26], abs=0.01)
    values = [regularization.by_epochs(e, rule) for e in epochs]
    assert values == sorted(values) and values[-1] > values[0], values
    # Over a fine grid: non-decreasing, continuous (no step larger than the steepest segment allows), within [0, 1).
    grid = [i / 10 for i in range(0, 1000)]
    values = [regularization.by_epochs(e, rule) for e in grid]
    assert all(a <= b for a, b in zip(values, values[1:]))
    steepest = max((y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(rule, rule[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) <= steepest * 0.1 + 1e-3
    assert 0.0 <= min(values) and max(values) < 1.0
    for x, y in rule:  # the points are the rule
        assert regularization.by_epochs(x, rule) == pytest.approx(y)
    assert regularization.by_epochs(0.0, rule) == regularization.first_value(rule)
    assert TRAINING_DEFAULTS["tiny"][name] is None  # the tiny preset uses the rule


def test_the_tiny_preset_trains_without_dropout():
    # With the moving average none beat every dropout measured at 13.6-54.3 epochs (toygpt/defaults.py), and its
    # random masks cost a CPU 1.6x the step: no rule chooses one, and a run gets the architecture's 0.0.
    from toygpt.train_config import TrainingConfig

    assert "dropout" not in EPOCH_RULES and "dropout" not in TRAINING_DEFAULTS["tiny"]
    assert TrainingConfig(preset="tiny").resolved().dropout == 0.0
    assert TrainingConfig(preset="tiny", dropout=0.1).resolved().dropout == 0.1  # --dropout still sets it


def test_short_runs_keep_the_defaults_that_were_measured_there():
    assert regularization.by_epochs(1.0, EPOCH_RULES["weight_decay"]) == 0.1  # what every run had before the rule
    assert "dropout" not in TRAINING_DEFAULTS["gpt2"]  # gpt2 keeps its architecture's 0.0
    assert TRAINING_DEFAULTS["gpt2"]["weight_decay"] == FINE_TUNING_DEFAULTS["weight_decay"] == 0.1


def test_counting_stops_where_the_rules_no_longer_depend_on_it():
    names = tuple(EPOCH_RULES)
    needed = regularization.tokens_worth_counting(20_000, TINY_STEP_TOKENS, names)
    # A split that long trains at most each rule's first-value epochs, however long the run; half of it does not.
    for name in names:
        rule = EPOCH_RULES[name]
        assert regularization.by_epochs(regularization.run_epochs(20_000, TINY_STEP_TOKENS, needed), rule) == \
            regularization.first_value(rule)
    assert any(regularization.by_epochs(regularization.run_epochs(20_000, TINY_STEP_TOKENS, needed // 2),
                                        EPOCH_RULES[name]) != regularization.first_value(EPOCH_RULES[name])
               for name in names)


# ----------------------------------------------------------------------------------------------------------------
# train.py: real runs on 6 kB of Shakespeare (about 1,500 training tokens), 128 tokens a step

LONG_STEPS = 120  # about 10 epochs of that text: weight decay 0.3 by the rule (from 6.8 epochs)


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


def decayed_groups(out):
    """The weight decay of every parameter group that decays, as the run's last checkpoint saved its optimizer."""
    directory = next((out / "checkpoint").glob("step-*"))
    groups = json.loads((directory / "optimizer.json").read_text())["optimizers"]
    return {group["weight_decay"] for optimizer in groups for group in optimizer if group["weight_decay"] != 0.0}


def test_a_longer_run_gets_more_regularisation_recorded_everywhere_and_resume_keeps_it(tmp_path, small_text, capsys):
    short_proc, short, state = rule_run(tmp_path / "short", small_text, 15)
    # The full vocabulary has no vocabulary pass: the run counts the split itself.
    long_proc, long, long_state = rule_run(tmp_path / "long", small_text, LONG_STEPS, "--vocab", "full")
    train_tokens = state["vocab"]["train_tokens"]
    assert 1_000 < train_tokens < 2_000 and long_state["vocab"] is None
    for proc, args, steps in ((short_proc, short, 15), (long_proc, long, LONG_STEPS)):
        epochs = regularization.run_epochs(steps, 128, train_tokens)
        for name in EPOCH_RULES:
            assert args[name] == regularization.rule_value(name, epochs)
        assert (f"weight decay {args['weight_decay']:g}: {steps} steps of 128 tokens "
                f"read the training split's {train_tokens:,} tokens {epochs:.1f} times") in proc.stderr
    assert short["weight_decay"] == 0.1 < long["weight_decay"] == 0.3 == long_state["args"]["weight_decay"]
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    assert config["dropout"] == short["dropout"] == long["dropout"] == 0.0  # no rule for dropout
    # The optimizer trained with the chosen weight decay (Muon's matrices and AdamW's embeddings; gains/biases 0).
    assert decayed_groups(tmp_path / "short") == {0.1} and decayed_groups(tmp_path / "long") == {long["weight_decay"]}
    # --resume to the long run's steps keeps the recorded choices (the rules do not decide again mid-run), though
    # that many steps from the start get more; train.main() in this process, the runs above being real ones.
    import train

    with one_thread():
        code = train.main(["--output-dir", str(tmp_path / "short"), "--resume", "--max-steps", str(LONG_STEPS),
                           "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    resumed = json.loads((tmp_path / "short" / "training_args.json").read_text())
    assert (resumed["dropout"], resumed["weight_decay"]) == (0.0, 0.1) and decayed_groups(tmp_path / "short") == {0.1}
    assert "epochs rule" not in err and metrics(tmp_path / "short")[-1]["step"] == LONG_STEPS


def test_a_count_that_stops_early_is_printed_as_a_floor(tmp_path, small_text, capsys):
    """--vocab full has no vocabulary pass: the run counts the split itself, only as far as the rules it leaves
    undecided need (the weight-decay rule's, 4 steps: 257 tokens), and says that the count is a floor
    and the epochs a ceiling; train.main() in this process."""
    import re

    import train

    with one_thread():
        code = train.main(["--input", str(small_text), "--output-dir", str(tmp_path / "out"), *map(str, TINY),
                           "--max-steps", "4", "--vocab", "full", "--eval-every", "1000",
                           "--eval-batches", "1", "--checkpoint-every", "1000", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    line = re.search(r"weight decay 0.1: 4 steps of 128 tokens read the training split's ([\d,]+)\+ tokens \(counted "
                     r"that far\) at most ([\d.]+) times \(the epochs rules, toygpt/regularization.py; --weight-decay "
                     r"sets it\)", err)
    assert line, err[-3000:]
    counted = int(line[1].replace(",", ""))
    assert counted >= regularization.tokens_worth_counting(4, 128, ["weight_decay"])
    assert float(line[2]) == round(regularization.run_epochs(4, 128, counted), 1)
    args = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert (args["dropout"], args["weight_decay"]) == (0.0, 0.1)


def test_a_later_fit_decides_again_where_the_rule_moves_enough(capsys):
    """A budget run's first fit guesses its step count from 10 steps; each later fit decides again from its own count
    (the development machine's 30-minute run first fitted 8,437 steps and ran 4,437). Moves under MIN_CHANGE are left
    alone."""
    from modeling_toygpt import ToyGPTForCausalLM
    from toygpt.optim import build_optimizer
    from toygpt.train_config import TrainingConfig
    from toygpt.training import choose_by_epochs

    model = ToyGPTForCausalLM(small_config()).train()
    optimizer = build_optimizer(model, torch.device("cpu"), optimizer="muon", lr=4e-3, weight_decay=0.1)

    def choose(config, steps):
        return choose_by_epochs(config, list(EPOCH_RULES), optimizer, steps, TINY_SHAKESPEARE_TRAIN_TOKENS,
                                TINY_STEP_TOKENS, is_main=True)

    def decays():
        return {group["weight_decay"] for group in optimizer.param_groups if group["weight_decay"] != 0.0}

    def rule(steps):
        return regularization.rule_value("weight_decay", regularization.run_epochs(
            steps, TINY_STEP_TOKENS, TINY_SHAKESPEARE_TRAIN_TOKENS))

    first = choose(TrainingConfig(), 2_100)  # 7.1 epochs
    assert first.weight_decay == 0.3 and decays() == {0.3}
    assert "weight decay 0.3: 2,100 steps" in capsys.readouterr().err
    # 1,000 steps (3.4 epochs): the rule moves by 0.14
    later = choose(first, 1_000)
    assert later.weight_decay == rule(1_000) and first.weight_decay - later.weight_decay >= regularization.MIN_CHANGE
    assert decays() == {later.weight_decay}
    err = capsys.readouterr().err
    assert f"weight decay {later.weight_decay:g}: 1,000 steps" in err and "--weight-decay sets it" in err
    # 1,050 steps: the rule moves by less than MIN_CHANGE: nothing changes, nothing is printed.
    assert 0 < abs(rule(1_050) - later.weight_decay) < regularization.MIN_CHANGE
    assert choose(later, 1_050) is later and capsys.readouterr().err == "" and decays() == {later.weight_decay}
    shorter = choose(later, 500)  # 1.7 epochs: back at the rule's first value
    assert shorter.weight_decay == 0.1 and decays() == {0.1}


def test_a_budget_run_follows_its_latest_fit(tmp_path, small_text, capsys, monkeypatch):
    """The fits of a real budget run (train.main() in this process) with the pace faked: the first fit says
    LONG_STEPS (about 10 epochs of the 6 kB text), the refit at step 20 says 30 (2.5 epochs); the run ends at 30 with
    the rule's value for 30 steps, in the optimizer and the record."""
    import train
    from toygpt import training

    real_refit, fits = training.refit_schedule, iter([LONG_STEPS, 30])

    def faked_refit(state, *args, **kwargs):
        scheduler = real_refit(state, *args, **kwargs)
        state.total_steps = next(fits)
        return scheduler

    monkeypatch.setattr(training, "refit_schedule", faked_refit)
    out = tmp_path / "out"
    with one_thread():
        code = train.main(["--input", str(small_text), "--output-dir", str(out), *map(str, TINY), "--max-steps",
                           "100000", "--time-budget-min", "30", "--eval-every", "20", "--eval-batches", "1",
                           "--checkpoint-every", "1000", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    state = json.loads(next((out / "checkpoint").glob("step-*/trainer_state.json")).read_text())
    train_tokens, args = state["vocab"]["train_tokens"], json.loads((out / "training_args.json").read_text())
    assert state["step"] == 30 and metrics(out)[-1]["step"] == 30
    at_first_fit = {name: regularization.rule_value(name, regularization.run_epochs(LONG_STEPS, 128, train_tokens))
                    for name in EPOCH_RULES}
    at_end = {name: regularization.rule_value(name, regularization.run_epochs(30, 128, train_tokens))
              for name in EPOCH_RULES}
    assert at_first_fit["weight_decay"] > at_end["weight_decay"] + regularization.MIN_CHANGE
    assert f"weight decay {at_first_fit['weight_decay']:g}: {LONG_STEPS} steps" in err
    assert f"weight decay {at_end['weight_decay']:g}: 30 steps" in err
    assert {name: args[name] for name in EPOCH_RULES} == at_end == {name: state["args"][name] for name in EPOCH_RULES}
    assert json.loads((out / "config.json").read_text())["dropout"] == args["dropout"] == 0.0
    assert decayed_groups(out) == {at_end["weight_decay"]}
