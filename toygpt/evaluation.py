"""Evaluation: validation loss, perplexity and bits per character over the same held-out windows, for every caller.

train.py (periodic and final evals), quantize.py (fp32 against int8) and the benches call `evaluate`:

    result = evaluate(CausalLMLoss(model), stream.val_windows(path, block_size), batch_size=8)
    result["val_loss"], result["val_perplexity"], result["val_bits_per_char"], result["val_tokens"]

Bits per character = summed loss (nats) / characters of the target tokens / ln 2, so models with different
tokenizers compare. The head runs in chunks of rows (training_loss.CausalLMLoss), so evaluating costs no more memory
than a training step at the same batch and context. Across DDP ranks each rank takes every world_size-th batch and
the sums are added up through distributed.Processes, on the training device.
"""

from __future__ import annotations

import contextlib
import math

import torch

from toygpt.distributed import Processes


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast for `amp_dtype` on `device`, or nothing for plain float32."""
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)


def metrics_from_sums(loss_sum: float, tokens: int, chars: int) -> dict:
    loss = loss_sum / tokens
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_bits_per_char": loss_sum / chars / math.log(2),
        "val_tokens": int(tokens),
    }


@torch.no_grad()
def evaluate(loss_model, val, batch_size: int, max_batches: int | None = None, amp_dtype=None,
             processes: Processes | None = None) -> dict:
    """Mean loss over the first max_batches * batch_size windows of `val` (all if None): a stream.ValWindows.

    `loss_model` is a training_loss.CausalLMLoss (or anything with its forward(x, y, reduction="sum")); it is put
    in eval mode for the pass and back in its previous mode after.
    """
    processes = processes or Processes(device=next(loss_model.parameters()).device)
    windows, chars = val.windows, val.target_chars  # (N, block_size + 1) windows; characters of their targets
    n = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    sums = torch.zeros(3, dtype=torch.float64, device=processes.device)  # summed loss, tokens, characters
    was_training = loss_model.training
    loss_model.eval()
    for start in range(processes.rank * batch_size, n, batch_size * processes.world_size):
        batch = windows[start:min(start + batch_size, n)].to(processes.device)
        with autocast(processes.device, amp_dtype):
            sums[0] += loss_model(batch[:, :-1], batch[:, 1:], reduction="sum").double()
        sums[1] += batch[:, 1:].numel()
        sums[2] += int(chars[start:start + len(batch)].sum())
    loss_model.train(was_training)
    loss_sum, tokens, n_chars = processes.all_reduce_sum(sums).tolist()
    return metrics_from_sums(loss_sum, tokens, n_chars)
