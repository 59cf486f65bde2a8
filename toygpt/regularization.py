"""Weight decay by the epochs a run buys: how the tiny preset trains many epochs of a small corpus without memorising
it (with the moving average of its weights, toygpt/weight_average.py, and keeping the best eval, best_model.py).

A short run sees its training split once or twice and needs little regularisation; a long one (more minutes, a faster
machine, a GPU) sees it many times, and past a few epochs memorises it: train loss keeps falling while validation
loss rises. The presets whose TRAINING_DEFAULTS leave `weight_decay` None (tiny) choose it from

    epochs = total steps x tokens per step (all processes) / tokens in the training split

by EPOCH_RULES (toygpt/defaults.py, measured on tiny Shakespeare: README, "Quality"), each a piecewise-linear,
non-decreasing rule: more epochs never get less regularisation. A --max-steps run decides before its first step; a
--time-budget-min run once its schedule is first fitted to the budget (training.FIT_STEPS steps, inside the warmup,
which run at the rule's first value), which is when it knows its step count, and again at every later fit: the first
fit is a guess from FIT_STEPS steps and a machine's pace drifts (on the development machine a 30-minute run first
fitted 8,437 steps and ran 4,437), so the rules go by the latest fit's count. A value changes only where the rule
moves it by MIN_CHANGE or more. The choices are recorded as --weight-decay (training_args.json, checkpoints), so
--resume keeps them. (Dropout had a rule until the moving average made none the best: toygpt/defaults.py.)
"""

from __future__ import annotations

import bisect

from toygpt.defaults import EPOCH_RULES


# Smaller moves are left alone: 0.02 of weight decay is within the measured noise of a run (README, "Quality").
MIN_CHANGE = 0.02


def run_epochs(total_steps: int, tokens_per_step: int, train_tokens: int) -> float:
    """How many times the run reads its training split."""
    return total_steps * tokens_per_step / max(train_tokens, 1)


def by_epochs(epochs: float, points) -> float:
    """A rule's value: linear between its (epochs, value) points, flat outside them."""
    xs = [x for x, _ in points]
    i = bisect.bisect_right(xs, epochs)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return round(y0 + (y1 - y0) * (epochs - x0) / (x1 - x0), 3)


def rule_value(name: str, epochs: float) -> float:
    """What the rule EPOCH_RULES[name] chooses for a run of `epochs`."""
    return by_epochs(epochs, EPOCH_RULES[name])


def first_value(points) -> float:
    """A rule's value for a run too short to have chosen yet (and for every run of fewer epochs than its first point)."""
    return points[0][1]


def undecided(config) -> list[str]:
    """The fields of EPOCH_RULES that `config` (a TrainingConfig) leaves to the rules: those still None."""
    return [name for name in EPOCH_RULES if getattr(config, name) is None]


def tokens_worth_counting(max_steps: int, tokens_per_step: int, names=tuple(EPOCH_RULES)) -> int:
    """A split with at least this many tokens gets the first value of each rule in `names` however long the run
    (max_steps bounds it): counting its tokens may stop there."""
    flat_until = min(max(x for x, y in EPOCH_RULES[name] if y == first_value(EPOCH_RULES[name])) for name in names)
    return int(max_steps * tokens_per_step / flat_until) + 1
