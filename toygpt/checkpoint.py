"""Resumable training checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

OUTPUT/checkpoint/step-NNNNNNNN/ holds
    config.json, model.safetensors        the model being trained
    optimizer.safetensors, optimizer.json  the optimizer's per-parameter tensors and its param groups
    rng.safetensors                        every rank's torch (and CUDA) RNG state
    ema.safetensors                        the weights' moving average, where the run keeps one (weight_average.py)
    trainer_state.json                     step, schedule, budget, every rank's data-stream position, the args
Each is written into a temp dir that is renamed into place once complete (trainer_state.json last), with the user's
umask, then older checkpoints are deleted (one is kept). Nothing is pickled: loading works with torch.load disabled.
Loading checks every file first: a damaged or edited one is a CheckpointError that names it and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from toygpt.errors import UsageError
from toygpt.file_modes import give_umask, make_temp_dir
from toygpt.optim import Optimizers
from toygpt.weight_average import EMA_FILE

CHECKPOINT_DIR = "checkpoint"
# trainer_state.json's fields that a resume reads, as JSON types (anything else in it is passed through)
TRAINER_STATE_FIELDS = {"step": "an integer", "total_steps": "an integer", "budget_fitted": "true or false",
                        "elapsed_s": "a number", "tokens_seen": "an integer", "args": "an object",
                        "scheduler": "a list", "ranks": "a list"}
JSON_TYPES = {"an integer": int, "true or false": bool, "a number": (int, float), "an object": dict, "a list": list}
ARCHITECTURE = ("vocab_size", "block_size", "n_embd", "n_layer", "n_head")  # config.json fields the shapes follow


class CheckpointError(UsageError):
    """A checkpoint that this run cannot continue; the message says why and what to do."""


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints under out_dir/checkpoint (those whose trainer_state.json exists), oldest first."""
    root = out_dir / CHECKPOINT_DIR
    steps = sorted(root.glob("step-*")) if root.is_dir() else []
    return [d for d in steps if (d / "trainer_state.json").is_file()]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under out_dir/checkpoint, or None."""
    complete = complete_checkpoints(out_dir)
    return complete[-1] if complete else None


def damaged(directory: Path, file: str, problem: str) -> CheckpointError:
    """The error for a checkpoint that cannot be resumed: the file, the problem, and the previous complete checkpoint
    to resume from instead where one is kept."""
    out_dir = directory.parent.parent
    earlier = [d for d in complete_checkpoints(out_dir) if d.name < directory.name]
    if earlier and directory.parent.name == CHECKPOINT_DIR:
        aside = out_dir / f"{directory.name}.damaged"
        fix = (f"The previous checkpoint, {earlier[-1]}, is complete: move this one out of the way "
               f"(mv {directory} {aside}) and --resume again continues from {earlier[-1].name}.")
    else:
        fix = "No earlier checkpoint is kept: restore the file from a copy, or start the run again (--overwrite)."
    return CheckpointError(f"{directory / file} {problem}, so this checkpoint cannot be resumed. {fix}")


@contextlib.contextmanager
def reading(directory: Path, file: str):
    """A file of the checkpoint that is missing or not a whole safetensors file is reported by `damaged`."""
    try:
        yield directory / file
    except FileNotFoundError:
        raise damaged(directory, file, "is missing") from None
    except SafetensorError as err:
        raise damaged(directory, file, f"is cut short or damaged ({err})") from None


def optimizer_to_files(optimizer: Optimizers, directory: Path) -> None:
    """optimizer.safetensors (every per-parameter tensor, as "k.param.name" for the k-th optimizer of the
    optim.Optimizers) and optimizer.json (their param groups)."""
    tensors, groups = {}, []
    for k, state in enumerate(optimizer.state_dict()["optimizers"]):
        tensors.update({f"{k}.{idx}.{key}": value.detach().cpu().contiguous()
                        for idx, per_param in state["state"].items() for key, value in per_param.items()})
        groups.append(state["param_groups"])
    save_file(tensors, directory / "optimizer.safetensors")
    (directory / "optimizer.json").write_text(json.dumps({"optimizers": groups}, indent=1))


def optimizer_from_files(optimizer: Optimizers, directory: Path) -> None:
    with reading(directory, "optimizer.safetensors") as path:
        tensors = load_file(path)
    groups = read_json(directory, "optimizer.json")
    try:
        per_param: list[dict[int, dict]] = [{} for _ in groups["optimizers"]]
        for name, tensor in tensors.items():
            k, idx, key = name.split(".", 2)
            per_param[int(k)].setdefault(int(idx), {})[key] = tensor
        optimizer.load_state_dict({"optimizers": [{"state": state, "param_groups": param_groups}
                                                  for state, param_groups in zip(per_param, groups["optimizers"])]})
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise damaged(directory, "optimizer.json", f"does not match this run's optimizer ({err})") from None


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


def save_checkpoint(out_dir: Path, model, optimizer: Optimizers, scheduler, trainer_state: dict,
                    rank_states: list[dict], rank_rngs: list[dict], averaged_model=None) -> Path:
    """Write OUTPUT/checkpoint/step-N atomically (temp + rename) with the user's umask; older checkpoints go once it
    is in place. A full disk is an OSError that says so, with the space needed; the previous checkpoint stays.
    `averaged_model`: the weights' moving average (its update count is the caller's, in trainer_state)."""
    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # what a run killed mid-write or mid-delete left
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{trainer_state['step']:08d}"
    tmp = make_temp_dir(root, ".tmp-")
    try:
        model.config.to_json_file(tmp / "config.json")
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied lm_head/wte weight
        if averaged_model is not None:
            save_model(averaged_model, str(tmp / EMA_FILE))
        optimizer_to_files(optimizer, tmp)
        save_file({f"{rank}.{key}": value for rank, rngs in enumerate(rank_rngs) for key, value in rngs.items()},
                  tmp / "rng.safetensors")
        state = {**trainer_state, "scheduler": scheduler.state_dict(), "ranks": rank_states}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))  # written last: marks completeness
        give_umask(tmp)  # safetensors writes 0600 files
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if os_error_code(err) == errno.ENOSPC:
            raise disk_full(root, trainer_state["step"], model, optimizer) from None
        raise
    for old in root.glob("step-*"):
        if old != final:
            _discard(old)
    return final


def os_error_code(err: BaseException) -> int | None:
    """The errno of an OSError, or of the I/O error a SafetensorError reports in its text ("os error 28")."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os error (\d+)", str(err)) if isinstance(err, SafetensorError) else None
    return int(found.group(1)) if found else None


def disk_full(root: Path, step: int, model, optimizer: Optimizers) -> OSError:
    """ENOSPC saying how much the checkpoint needs, how much is free and that the previous checkpoint is intact."""
    tensors = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}  # tied weights once
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(
        t.numel() * t.element_size() for state in optimizer.state_dict()["optimizers"]
        for per_param in state["state"].values() for t in per_param.values())
    kept = latest_checkpoint(root.parent)
    return OSError(errno.ENOSPC, f"No space left on device: the checkpoint of step {step} needs about "
                   f"{needed / 2**20:.1f} MiB, {shutil.disk_usage(root).free / 2**20:.1f} MiB are free; "
                   + (f"the previous checkpoint, {kept.name}, is intact" if kept else "no checkpoint was kept yet"),
                   str(root))


def _discard(directory: Path) -> None:
    """Delete a checkpoint, renamed out of step-* first: a kill mid-delete never leaves a broken step-* behind."""
    trash = directory.with_name(f".tmp-old-{directory.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_json(directory: Path, file: str):
    try:
        return json.loads((directory / file).read_text())
    except FileNotFoundError:
        raise damaged(directory, file, "is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(directory, file, f"is not valid JSON (cut short or edited: {err})") from None


def read_trainer_state(directory: Path) -> dict:
    """A checkpoint's trainer_state.json, its fields checked: step, schedule, budget, the run's args, its corpus
    vocabulary, every rank's stream position."""
    state = read_json(directory, "trainer_state.json")
    if not isinstance(state, dict):
        raise damaged(directory, "trainer_state.json", "is not a JSON object")
    for key, kind in TRAINER_STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, JSON_TYPES[kind]) or (kind != "true or false" and isinstance(value, bool)):
            raise damaged(directory, "trainer_state.json", f"has {json.dumps(key)}: {json.dumps(value)[:40]}, "
                          f"which is not {kind}")
    return state


def check_model(directory: Path, model) -> None:
    """config.json and the tensors' shapes in model.safetensors agree with the model this run built."""
    saved = read_json(directory, "config.json")
    differ = [f"{key} {saved.get(key)} (the run's model has {getattr(model.config, key)})" for key in ARCHITECTURE
              if saved.get(key) != getattr(model.config, key)]
    if differ:
        raise damaged(directory, "config.json", f"does not match the model that trainer_state.json's args build: "
                      f"{', '.join(differ)}; was one of them edited?")
    live = model.state_dict()
    with reading(directory, "model.safetensors") as path, safe_open(path, "pt") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    wrong = [f"{key} {shape} (the run's model has {list(live[key].shape) if key in live else 'no such tensor'})"
             for key, shape in shapes.items() if key not in live or list(live[key].shape) != shape]
    if wrong:
        raise damaged(directory, "model.safetensors", f"holds tensors this run's model does not: {wrong[0]}"
                      + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""))


def load_checkpoint(directory: Path, model, optimizer: Optimizers, rank: int, world_size: int,
                    averaged_model=None) -> dict:
    """Restore weights and optimizer in place (and `averaged_model`, where the checkpoint holds a moving average:
    trainer_state's "ema_updates" says whether it does); return trainer_state with this rank's `rank_state` and
    `rank_rng`. A damaged or edited checkpoint is a CheckpointError naming the file."""
    state = read_trainer_state(directory)
    if len(state["ranks"]) != world_size:
        raise CheckpointError(
            f"{directory} was written by {len(state['ranks'])} process(es); resume it with the same number "
            f"(this run has {world_size})."
        )
    check_model(directory, model)
    with reading(directory, "model.safetensors") as path:
        load_model(model, str(path), device=str(next(model.parameters()).device))
    optimizer_from_files(optimizer, directory)
    if averaged_model is not None and state.get("ema_updates"):
        with reading(directory, EMA_FILE) as path:
            load_model(averaged_model, str(path), device=str(next(averaged_model.parameters()).device))
    with reading(directory, "rng.safetensors") as path:
        rngs = load_file(path)
    state["rank_state"] = state["ranks"][rank]
    state["rank_rng"] = {key.split(".", 1)[1]: value for key, value in rngs.items()
                         if key.split(".", 1)[0] == str(rank)}
    return state
