"""Resumable training checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

OUTPUT/checkpoint/step-NNNNNNNN/ holds
    config.json, model.safetensors        the model being trained
    optimizer.safetensors, optimizer.json  the optimizer's per-parameter tensors and its param groups
    rng.safetensors                        every rank's torch (and CUDA) RNG state
    trainer_state.json                     step, schedule, budget, every rank's data-stream position, the args
Each is written into a temp dir that is renamed into place once complete (trainer_state.json last), then older
checkpoints are deleted. Nothing is pickled: loading works with torch.load disabled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from toygpt.file_modes import make_temp_dir

CHECKPOINT_DIR = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that this run cannot continue; the message says why and what to do."""


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under out_dir/checkpoint (one whose trainer_state.json exists), or None."""
    steps = sorted((out_dir / CHECKPOINT_DIR).glob("step-*")) if (out_dir / CHECKPOINT_DIR).is_dir() else []
    complete = [d for d in steps if (d / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def optimizer_to_files(optimizer, directory: Path) -> None:
    """optimizer.safetensors (every per-parameter tensor, as "k.param.name" for the k-th optimizer of an
    optim.Optimizers) and optimizer.json (their param groups)."""
    tensors, groups = {}, []
    for k, one in enumerate(getattr(optimizer, "optimizers", [optimizer])):
        state = one.state_dict()
        tensors.update({f"{k}.{idx}.{key}": value.detach().cpu().contiguous()
                        for idx, per_param in state["state"].items() for key, value in per_param.items()})
        groups.append(state["param_groups"])
    save_file(tensors, directory / "optimizer.safetensors")
    (directory / "optimizer.json").write_text(json.dumps({"optimizers": groups}, indent=1))


def optimizer_from_files(optimizer, directory: Path) -> None:
    optimizers = getattr(optimizer, "optimizers", [optimizer])
    per_param: list[dict[int, dict]] = [{} for _ in optimizers]
    for name, tensor in load_file(directory / "optimizer.safetensors").items():
        k, idx, key = name.split(".", 2)
        per_param[int(k)].setdefault(int(idx), {})[key] = tensor
    groups = json.loads((directory / "optimizer.json").read_text())["optimizers"]
    for one, state, param_groups in zip(optimizers, per_param, groups):
        for group in param_groups:  # JSON made these tuples lists
            for key in ("betas", "ns_coefficients"):
                if key in group:
                    group[key] = tuple(group[key])
        one.load_state_dict({"state": state, "param_groups": param_groups})


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(rng: dict, python_state: list) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, trainer_state: dict, rank_states: list[dict],
                    rank_rngs: list[dict]) -> Path:
    """Write OUTPUT/checkpoint/step-N atomically (temp + rename); older checkpoints go once it is in place."""
    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # what a run killed mid-write or mid-delete left
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{trainer_state['step']:08d}"
    tmp = make_temp_dir(root, ".tmp-")
    try:
        model.config.to_json_file(tmp / "config.json")
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied lm_head/wte weight
        optimizer_to_files(optimizer, tmp)
        save_file({f"{rank}.{key}": value for rank, rngs in enumerate(rank_rngs) for key, value in rngs.items()},
                  tmp / "rng.safetensors")
        state = {**trainer_state, "scheduler": scheduler.state_dict(), "ranks": rank_states}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))  # written last: marks completeness
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.glob("step-*"):
        if old != final:
            _discard(old)
    return final


def _discard(directory: Path) -> None:
    """Delete a checkpoint, renamed out of step-* first: a kill mid-delete never leaves a broken step-* behind."""
    trash = directory.with_name(f".tmp-old-{directory.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_trainer_state(directory: Path) -> dict:
    """A checkpoint's trainer_state.json: step, schedule, budget, the run's args, its corpus vocabulary, every rank's
    stream position."""
    return json.loads((directory / "trainer_state.json").read_text())


def load_checkpoint(directory: Path, model, optimizer, rank: int, world_size: int) -> dict:
    """Restore weights and optimizer in place; return trainer_state with this rank's `rank_state` and `rank_rng`."""
    state = read_trainer_state(directory)
    if len(state["ranks"]) != world_size:
        raise CheckpointError(
            f"{directory} was written by {len(state['ranks'])} process(es); resume it with the same number "
            f"(this run has {world_size})."
        )
    load_model(model, str(directory / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer_from_files(optimizer, directory)
    state["rank_state"] = state["ranks"][rank]
    state["rank_rng"] = {key.split(".", 1)[1]: value for key, value in load_file(directory / "rng.safetensors").items()
                         if key.split(".", 1)[0] == str(rank)}
    return state
