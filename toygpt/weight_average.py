"""An exponential moving average (EMA) of the weights being trained: what evals, the best model and the model dir see.

At many epochs the weights wander at a high learning rate: on tiny Shakespeare a run's val bits/char moves by up to
0.1 from one eval to the next. Their recent average is a better model than any one of them (README, "Quality").
torch.optim.swa_utils.AveragedModel keeps the average (a copy of the model on its device); its decay warms up as
diffusers' EMAModel does, min(decay, (1 + n) / (10 + n)) after n updates, so the first weights fade fast. Checkpoints
hold it as ema.safetensors (its update count in trainer_state.json), so --resume continues it exactly.

    average = weight_average(model, decay)      # None where decay is 0: the raw weights
    update(average, model)                      # after each optimizer step
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
    """An AveragedModel of `model` (a copy of its weights, on its device), or None where decay is 0."""
    if not decay:
        return None
    average = AveragedModel(model, use_buffers=False)
    average.module.requires_grad_(False)
    average.decay = decay
    return average


@torch.no_grad()
def update(average: AveragedModel, model) -> None:
    """One step of the average: each weight moves 1 - decay_after(n) of the way to `model`'s (the first copies it).
    Not AveragedModel.update_parameters: it copies its update count to the weights' device every call, which on a GPU
    waits for the step's kernels to finish; here the count stays a CPU number. (ToyGPT has no buffers to follow.)"""
    keep = decay_after(updates(average), average.decay)
    torch._foreach_lerp_(list(average.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - keep)
    average.n_averaged += 1


def updates(average: AveragedModel) -> int:
    return int(average.n_averaged)


def set_updates(average: AveragedModel, count: int) -> None:
    average.n_averaged.fill_(count)
