"""The optimizer and the learning-rate schedule train.py uses, and the fit of the schedule to a time budget."""

from __future__ import annotations

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def build_optimizer(model, args, device) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95), decaying matrices (dim >= 2) only; fused kernels where the device has them."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied lm_head/wte weight appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    fused = device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def build_scheduler(optimizer, args, total_steps: int, step: int = 0):
    """Linear warmup to --lr, cosine decay to --min-lr at total_steps; positioned at `step` (for refits/resume)."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=max(total_steps, args.warmup_steps + 1),
        min_lr=args.min_lr,
        last_epoch=step - 1,
    )


def fit_total_steps(step: int, steps_timed: int, seconds_timed: float, seconds_left: float, max_steps: int) -> int:
    """Total optimizer steps that end the schedule when the budget runs out, at the average pace timed so far."""
    seconds_per_step = seconds_timed / max(steps_timed, 1)
    return max(step + 1, min(max_steps, step + int(max(seconds_left, 0.0) / seconds_per_step)))
