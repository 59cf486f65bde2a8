"""ToyGPT's own progress (tqdm bars on stderr), and the libraries' bars silenced where ToyGPT already reports the step.

    with progress.bar(total=n, desc="eval") as b: ...            # any wait over ~2 s gets one
    with progress.quiet_library_bars(): model.save_pretrained(d)  # no "Writing model shards" under our own report

On a terminal a bar redraws in place. In a log (stderr is a file or a pipe: CI, nohup, `make demo | tee`) tqdm still
writes every redraw, so there a bar redraws at most every LOG_INTERVAL_S: the log shows progress without a line per
step. A bar always draws when it starts and when it closes.
"""

from __future__ import annotations

import contextlib
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 10.0  # the least time between two redraws of a bar when stderr is not a terminal


def bar(**kwargs) -> tqdm:
    """A tqdm bar on stderr, redrawn at a pace that suits a terminal or a log."""
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if tty else LOG_INTERVAL_S)
    if not tty:  # a nested bar (an eval inside training) moves the cursor up on a terminal: no escape codes in logs
        kwargs.setdefault("position", 0)
    return tqdm(file=sys.stderr, dynamic_ncols=tty, **kwargs)


# With a time budget the bar counts the budget's seconds: its total is the real horizon from the first step, while the
# step count is an estimate until the schedule is fitted (after a few steps) and is shown beside it.
BUDGET_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of budget [{elapsed}<{remaining}{postfix}]"


class TrainProgress:
    """The training bar: optimizer steps, or with --time-budget-min seconds of the budget. A run that ends (its steps
    done or its budget spent) shows 100%; one stopped early (Ctrl-C, an error) shows where it stopped."""

    def __init__(self, step: int, total_steps: int, budget_s: float | None, elapsed_s: float, enabled: bool):
        self.budget_s = budget_s
        if budget_s is None:
            self.bar = bar(total=total_steps, initial=step, desc="train", unit="step", disable=not enabled)
        else:
            self.bar = bar(total=budget_s, initial=min(elapsed_s, budget_s), desc="train", unit="s",
                           bar_format=BUDGET_FORMAT, disable=not enabled)

    def update(self, step: int, total_steps: int, fitted: bool, elapsed_s: float, **postfix) -> None:
        """After an optimizer step: `fitted` says whether total_steps is the budget's fit or still the upper bound."""
        if self.budget_s is None:
            self.bar.total = total_steps
            self.bar.update(step - self.bar.n)
        else:
            self.bar.update(min(elapsed_s, self.budget_s) - self.bar.n)
            postfix = {"step": f"{step}/{total_steps}" if fitted else f"{step}", **postfix}
        self.bar.set_postfix(postfix, refresh=False)

    def finish(self) -> None:
        """The run reached its end: the bar shows 100% (a fitted schedule can end a little before its budget)."""
        self.bar.update(self.bar.total - self.bar.n)
        self.close()

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def quiet_library_bars():
    """transformers' ("Loading weights", "Writing model shards") and huggingface_hub's bars off for the block, where
    ToyGPT reports the step itself; each library's previous setting is restored after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    hub_was_on = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            transformers_logging.enable_progress_bar()
        if hub_was_on:
            enable_progress_bars()
