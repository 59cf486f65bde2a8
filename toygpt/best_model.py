"""Keep the best model, not the last: the weights of the evaluation with the lowest validation loss (transformers'
load_best_model_at_end with metric_for_best_model = the eval loss), and the eval schedule that looks for it.

A run that overfits, or whose loss swings at a high learning rate, can end worse than it was: train.py writes the
best evaluated weights as the model dir (--no-keep-best: the last). The best is held on the CPU (a state_dict copy,
tied weights once) and, for --resume, written beside each checkpoint as OUTPUT/checkpoint/best-for-step-N.safetensors
(safetensors, its step and eval as metadata; temp file + rename, before the checkpoint of step N): a run killed
between the two still has the previous checkpoint's file, so --resume keeps the best exactly.

    best = BestModel()
    best.offer(step, result, model)          # after every eval: True if it is the best so far (copied)
    best.save(out_dir, checkpoint_step)      # before each checkpoint; prune(out_dir, step) after it
    best = BestModel.load(out_dir, step)     # --resume
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toygpt.checkpoint import CHECKPOINT_DIR
from toygpt.file_modes import umask_mode

# Where the learning rate decays (WSD's decay phase, the last 30% of the steps; cosine's tail), the validation loss
# moves most and the best is usually found: evals there come this many times as often.
TAIL_FRACTION = 0.3
TAIL_DENSITY = 2


def eval_due(step: int, total_steps: int, eval_every: int) -> bool:
    """Is step an eval step: every eval_every steps, TAIL_DENSITY times as often in the last TAIL_FRACTION of the
    total steps (with --time-budget-min, the fitted total: the schedule and its evals fit the budget)."""
    in_tail = step > (1 - TAIL_FRACTION) * total_steps
    return step % (max(1, eval_every // TAIL_DENSITY) if in_tail else eval_every) == 0


def best_path(out_dir: Path, checkpoint_step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"best-for-step-{checkpoint_step:08d}.safetensors"


def cpu_copy(model) -> dict[str, torch.Tensor]:
    """The model's state_dict on the CPU, a tensor shared by several names (the tied head) copied once."""
    copies, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        copies[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return copies


@dataclass
class BestModel:
    """The best eval so far: its step, its figures (evaluation.evaluate's dict) and a CPU copy of its weights."""

    step: int | None = None
    result: dict | None = None
    weights: dict | None = None
    written_step: int | None = None  # the `step` of the file last written (a later checkpoint links it)

    def offer(self, step: int, result: dict, model) -> bool:
        """Keep `model` if its val loss is below the best's (the first eval's always is); return whether it was."""
        if self.result is not None and not result["val_loss"] < self.result["val_loss"]:
            return False
        self.step, self.result, self.weights = step, dict(result), cpu_copy(model)
        return True

    def load_into(self, model) -> None:
        """Put the best weights into `model` (same architecture: the model being trained)."""
        missing, unexpected = model.load_state_dict(self.weights, strict=False)
        tied = set(model.state_dict()) - set(self.weights)  # the names cpu_copy skipped as shared
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"the best weights do not fit the model (missing {missing}, unexpected {unexpected})")

    def save(self, out_dir: Path, checkpoint_step: int) -> None:
        """Write best-for-step-N for the checkpoint of step N about to be written (nothing if there is no best yet);
        an unchanged best is hard-linked from the previous file, where the filesystem allows."""
        if self.weights is None:
            return
        path = best_path(out_dir, checkpoint_step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.unlink(missing_ok=True)
        previous = None if self.written_step is None else best_path(out_dir, self.written_step)
        try:
            if previous is not None and previous.is_file() and self._file_step(previous) == self.step:
                os.link(previous, tmp)
            else:
                metadata = {"step": str(self.step), "result": json.dumps(self.result)}
                save_file(self.weights, str(tmp), metadata=metadata)
                os.chmod(tmp, umask_mode(0o666))  # safetensors writes 0600
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.written_step = checkpoint_step

    @staticmethod
    def _file_step(path: Path) -> int:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])

    @classmethod
    def load(cls, out_dir: Path, checkpoint_step: int) -> BestModel:
        """The best as the checkpoint of `checkpoint_step` left it (none yet: an empty BestModel)."""
        path = best_path(out_dir, checkpoint_step)
        if not path.is_file():
            return cls()
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            weights = {name: f.get_tensor(name) for name in f.keys()}
        return cls(int(metadata["step"]), json.loads(metadata["result"]), weights, written_step=checkpoint_step)


def prune(out_dir: Path, checkpoint_step: int) -> None:
    """After the checkpoint of step N is complete, the best files of other checkpoints go."""
    for path in (Path(out_dir) / CHECKPOINT_DIR).glob("best-for-step-*.safetensors"):
        if path != best_path(out_dir, checkpoint_step):
            path.unlink(missing_ok=True)
