"""Evaluation: validation loss, perplexity and bits per character over the same held-out windows, for every caller.

"The validation loss" has one definition: `evaluate` over `validation_windows`, the held-out split's windows in its
fixed order, all of them up to VAL_MAX_TOKENS target tokens, or the first eval_batches x batch_size of them where a
run states that subset (train.py --eval-batches, recorded in training_args.json). train.py's periodic evals, the eval
that picks the best model, the final figures, the card and quantize.py (fp32 against int8) all read these windows:

    result = evaluate(CausalLMLoss(model), validation_windows(path, block_size), batch_size=8)
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
from toygpt.stream import ValWindows, val_windows

# The held-out split is read whole up to this many target tokens (tiny Shakespeare's is ~36k; nanoGPT's OpenWebText
# evals read 2.4M): beyond it, the first windows are the validation set, so an eval stays minutes on a large dataset.
VAL_MAX_TOKENS = 2**20


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


def validation_windows(source, block_size: int, eval_batches: int | None = None,
                       batch_size: int | None = None) -> ValWindows:
    """The validation set: the held-out split's first windows (stream.val_windows), all of them up to VAL_MAX_TOKENS
    target tokens, or the first eval_batches x batch_size where a run states that subset. `source`: a
    sources.resolve_source source or a text file's path."""
    max_windows = max(1, VAL_MAX_TOKENS // block_size)
    if eval_batches is not None:
        max_windows = min(max_windows, eval_batches * batch_size)
    return val_windows(source, block_size, max_windows=max_windows)


@torch.no_grad()
def evaluate(loss_model, val, batch_size: int, max_batches: int | None = None, amp_dtype=None,
             processes: Processes | None = None, progress=None) -> dict:
    """Mean loss over the first max_batches * batch_size windows of `val` (all if None): a stream.ValWindows.
    `progress` (a tqdm bar, or None) is updated by one after each of this rank's batches.

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
        if progress is not None:
            progress.update()
    loss_model.train(was_training)
    loss_sum, tokens, n_chars = processes.all_reduce_sum(sums).tolist()
    return metrics_from_sums(loss_sum, tokens, n_chars)
