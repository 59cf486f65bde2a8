"""Dropout by the epochs a run buys: how the tiny preset trains many epochs of a small corpus without memorising it.

A short run sees its training split once or twice and needs no regularisation; a long one (more minutes, a faster
machine, a GPU) sees it many times, and past a few epochs memorises it: train loss keeps falling while validation
loss rises. The presets whose TRAINING_DEFAULTS leave `dropout` None (tiny) choose it from

    epochs = total steps x tokens per step (all processes) / tokens in the training split

by `dropout_for_epochs` (EPOCH_DROPOUT, measured on tiny Shakespeare: README, "Quality"), a piecewise-linear,
non-decreasing rule: more epochs never get less dropout. A --max-steps run decides before its first step; a
--time-budget-min run once its schedule is first fitted to the budget (training.FIT_STEPS steps, inside the warmup),
which is when it knows its step count. The choice is recorded as --dropout (training_args.json, checkpoints, the model
config), so --resume keeps it.
"""

from __future__ import annotations

import bisect

from torch import nn

from modeling_toygpt import CausalSelfAttention
from toygpt.defaults import EPOCH_DROPOUT


def run_epochs(total_steps: int, tokens_per_step: int, train_tokens: int) -> float:
    """How many times the run reads its training split."""
    return total_steps * tokens_per_step / max(train_tokens, 1)


def dropout_for_epochs(epochs: float, points=EPOCH_DROPOUT) -> float:
    """The rule: linear between the (epochs, dropout) points, flat outside them."""
    xs = [x for x, _ in points]
    i = bisect.bisect_right(xs, epochs)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return round(y0 + (y1 - y0) * (epochs - x0) / (x1 - x0), 3)


def tokens_worth_counting(max_steps: int, tokens_per_step: int, points=EPOCH_DROPOUT) -> int:
    """A split with at least this many tokens gets the rule's first dropout however long the run (max_steps bounds
    it): counting its tokens may stop there."""
    no_dropout_until = max(x for x, y in points if y == points[0][1])
    return int(max_steps * tokens_per_step / no_dropout_until) + 1


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of a ToyGPT model (nn.Dropout layers and attention's dropout_p) and its config, in place."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, CausalSelfAttention):  # its dropout_p, a number
            module.dropout = p
