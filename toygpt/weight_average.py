"""An exponential moving average (EMA) of the weights being trained: what evals, the best model and the model dir see.

At many epochs the weights wander at a high learning rate: on tiny Shakespeare a run's val bits/char moves by up to
0.1 from one eval to the next. Their recent average is a better model than any one of them (README, "Quality").
torch.optim.swa_utils.AveragedModel keeps the average (a copy of the model on its device); its decay warms up as
diffusers' EMAModel does, min(decay, (1 + n) / (10 + n)) after n updates, so the first weights fade fast. Checkpoints
hold it as ema.safetensors (its update count in trainer_state.json), so --resume continues it exactly.

    average = weight_average(model, decay)      # None where decay is 0: the raw weights
    average.update_parameters(model)            # after each optimizer step
    average.module                              # the averaged model: evaluate it, keep it, save it
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

EMA_FILE = "ema.safetensors"
WARM_UP_STEPS = 10  # (1 + n) / (10 + n): diffusers' EMAModel warm-up


def decay_after(updates: int, decay: float) -> float:
    """The weight the average keeps at its update number `updates` (0 for the first: it copies the weights)."""
    return min(decay, (1 + updates) / (WARM_UP_STEPS + updates)) if updates else 0.0


def weight_average(model, decay: float) -> AveragedModel | None:
    """An AveragedModel of `model` (its parameters; buffers are not trained), or None where decay is 0."""
    if not decay:
        return None

    @torch.no_grad()
    def ema(averaged: list[torch.Tensor], current: list[torch.Tensor], _) -> None:
        # the count from the CPU buffer, not the device copy passed in: reading that would sync a GPU every step
        torch._foreach_lerp_(averaged, current, 1.0 - decay_after(updates(average), decay))

    average = AveragedModel(model, multi_avg_fn=ema, use_buffers=False)
    average.module.requires_grad_(False)
    return average


def updates(average: AveragedModel) -> int:
    return int(average.n_averaged)


def set_updates(average: AveragedModel, count: int) -> None:
    average.n_averaged.fill_(count)
