"""Experiment trackers a training run reports to besides metrics.jsonl (`train.py --report-to`, Trainer's names).

- tensorboard: event files in the output dir's `runs/`, which push_to_hub.py uploads; the Hub shows them as the
  repo's training metrics. Readable offline by TensorBoard itself (`tensorboard --logdir OUT/runs`).
- trackio: Hugging Face's local-first tracker; logs to its local store (TRACKIO_DIR), needs no account
  (`trackio show --project toygpt`).
- wandb: only where the user has it installed and configured; it is not a dependency.

Every tracker gets exactly the records written to metrics.jsonl (run_log.MetricsLog feeds them): each numeric field
under its metrics.jsonl name, at the record's optimizer step. On `--resume` the run continues: TensorBoard purges
the steps a killed run logged after its checkpoint (as metrics.jsonl drops them); trackio and wandb reopen the run by
name, and keep those steps beside the resumed run's (they have no purge). A run extended after it finished (--resume
--max-steps more, from its final checkpoint) loses its final record in metrics.jsonl and in TensorBoard alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from toygpt.errors import UsageError

REPORT_TO = ("none", "all", "tensorboard", "trackio", "wandb")
TRACKERS = ("tensorboard", "trackio", "wandb")
PROJECT = "toygpt"  # trackio's and wandb's project name
RUNS_DIR = "runs"  # TensorBoard's event files, in the output dir (the Hub reads a model repo's runs/)


class TrackingError(UsageError):
    """A tracker was asked for that cannot run here; the message says how to install or configure it."""


class Tracker(Protocol):
    name: str

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def scalars_of(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record, by their names there (the step is the x axis, not a scalar)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, resume_step: int | None, kept: list[dict] = ()):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier writer logged at this step and after, as a resumed
        # metrics.jsonl drops the records a killed run wrote after its last checkpoint, and the final record of a run
        # that ended at this step. What metrics.jsonl keeps at this step is logged again.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)
        for record in kept:
            if record["step"] == resume_step:
                self.log(scalars_of(record), resume_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it reported

    def close(self) -> None:
        self.writer.close()


class TrackioTracker:
    name = "trackio"

    def __init__(self, run_name: str, config: dict):
        import trackio

        self.trackio = trackio
        # No system metrics thread and no embedded dashboard: the run logs what metrics.jsonl holds, nothing else.
        trackio.init(project=PROJECT, name=run_name, config=config, resume="allow", embed=False,
                     auto_log_cpu=False, auto_log_gpu=False)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_name: str, config: dict, out_dir: Path):
        import wandb

        self.run = wandb.init(project=PROJECT, name=run_name, id=run_name, resume="allow", config=config,
                              dir=str(out_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def installed(name: str) -> bool:
    module = "tensorboard" if name == "tensorboard" else name  # torch's SummaryWriter needs the tensorboard package
    return importlib.util.find_spec(module) is not None


def check_report_to(report_to: list[str]) -> list[str]:
    """The trackers `report_to` names (Trainer's meaning: "none", "all" = every installed one); TrackingError if a
    named one is not installed. Called before any work, so a missing package never costs a run."""
    unknown = sorted(set(report_to) - set(REPORT_TO))
    if unknown:
        raise TrackingError(f"--report-to: unknown {', '.join(unknown)}; choose from {', '.join(REPORT_TO)}.")
    if "none" in report_to:
        if len(report_to) > 1:
            raise TrackingError("--report-to none cannot be combined with a tracker; name the trackers alone.")
        return []
    if "all" in report_to:
        return [name for name in TRACKERS if installed(name)]
    missing = [name for name in report_to if not installed(name)]
    if missing:
        name = missing[0]
        hint = " then `wandb login` (or WANDB_MODE=offline)" if name == "wandb" else ""
        raise TrackingError(f"--report-to {name}: the {name} package is not installed; `pip install {name}`{hint}, "
                            "or choose another tracker (--report-to none to log metrics.jsonl only).")
    return list(dict.fromkeys(report_to))


def open_trackers(names: list[str], out_dir: Path, run_name: str, config: dict,
                  resume_step: int | None, kept: list[dict] = ()) -> list[Tracker]:
    """The trackers of a run writing `out_dir`; `resume_step` is the checkpoint's step on --resume, else None, and
    `kept` the records metrics.jsonl keeps then (MetricsLog.keep_until)."""
    trackers = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out_dir / RUNS_DIR, resume_step, kept))
        elif name == "trackio":
            trackers.append(TrackioTracker(run_name, config))
        elif name == "wandb":
            trackers.append(WandbTracker(run_name, config, out_dir))
    return trackers
