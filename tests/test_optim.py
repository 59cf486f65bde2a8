"""optim.py: the warmup + cosine schedule, its resume, and the fit of the step count to a time budget."""

import argparse
import math

import pytest
import torch

import optim


def scheduled_lrs(total_steps, **overrides):
    args = argparse.Namespace(**{"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, **overrides})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=args.lr)
    scheduler = optim.build_scheduler(optimizer, args, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]["lr"]


def test_schedule_is_linear_warmup_then_cosine_to_min_lr():
    lrs, after = scheduled_lrs(110)
    # Warmup: a straight line from 0 to --lr over --warmup-steps steps.
    assert lrs[:11] == pytest.approx([1e-3 * i / 10 for i in range(11)], abs=1e-12)
    # Then a half cosine from --lr down to --min-lr, reached at the last step.
    for i in range(10, 110):
        progress = (i - 10) / 100
        assert lrs[i] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-9)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert after == pytest.approx(1e-4)
    assert min(lrs[10:]) > 1e-4
    # Resuming the schedule mid-way (step=k) continues the same curve.
    args = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    optim.build_scheduler(optimizer, argparse.Namespace(**args), 110)  # sets initial_lr, as a real run does
    optim.build_scheduler(optimizer, argparse.Namespace(**args), 110, step=57)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[57], rel=1e-12)


def test_fit_total_steps():
    fit = optim.fit_total_steps
    # 10 steps in 5 s, 60 s left: 120 more steps.
    assert fit(10, 10, 5.0, 60.0, 10_000) == 130
    assert fit(10, 10, 5.0, 60.0, 50) == 50  # capped by --max-steps
    assert fit(10, 10, 5.0, -3.0, 10_000) == 11  # budget already spent: end the schedule now
