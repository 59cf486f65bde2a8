"""A training run's record: metrics.jsonl (one JSON object per line) and the loss curve drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from toygpt.tracking import scalars_of


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a killed run is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:  # absent (a dir convert_gpt2.py wrote) or unreadable: no records
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            pass
    return records


class MetricsLog:
    """Appends records to metrics.jsonl and feeds each one to the run's trackers (toygpt/tracking.py: TensorBoard,
    trackio, wandb), so every sink holds the same records; does nothing on ranks other than 0 (`enabled=False`)."""

    def __init__(self, path: Path, enabled: bool = True, trackers=()):
        self.path, self.enabled, self.trackers = path, enabled, list(trackers) if enabled else []

    def keep_until(self, step: int) -> list[dict]:
        """Drop the records a killed run wrote after its last checkpoint (and any final record): resume continues.
        Returns the records kept."""
        if not self.enabled:
            return []
        kept = [r for r in read_metrics(self.path) if r["step"] <= step and not r.get("final")]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            scalars = scalars_of(record)
            for tracker in self.trackers:
                tracker.log(scalars, record["step"])

    def close(self) -> None:
        """Close the trackers (their files complete, their runs finished)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def validation_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(step, val loss) of each eval, one point per step: every eval reads the same windows (one definition), and the
    final record repeats the saved model's figure, which is one of them."""
    return sorted({r["step"]: r["val_loss"] for r in records if "val_loss" in r and not r.get("final")}.items())


def plot_loss_curve(records: list[dict], path: Path) -> None:
    """Training and validation loss against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r and not r.get("final")]
    val = validation_curve(records)
    best = next((r["best_step"] for r in reversed(records) if r.get("final") and "best_step" in r), None)
    averaged = any(r.get("final") and r.get("ema_decay") for r in records)  # the evals read the moving average
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (the weights' moving average)" if averaged else "validation",
                markersize=3)
    if best is not None and best in dict(val):
        ax.plot([best], [dict(val)[best]], "*", markersize=12, label=f"saved: the best eval (step {best})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("ToyGPT training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
