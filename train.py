"""Train ToyGPT on a text file and write a complete, loadable model directory.

    python train.py --preset tiny --time-budget-min 10 --input input.txt --output-dir out/toygpt
    torchrun --standalone --nproc_per_node 2 train.py --preset tiny --max-steps 500   # DistributedDataParallel

The run streams the text through data.py (training on the first 90% of the file by characters, validating on the
last 10%), trains with AdamW and a warmup + cosine schedule, evaluates periodically (val loss, perplexity, bits per
character), writes resumable checkpoints to OUTPUT/checkpoint/ and finally swaps in OUTPUT atomically: the
save_pretrained model directory, tokenizer, metrics.jsonl, training_args.json, loss_curve.png and a README.md card.

--time-budget-min: the schedule is fitted to the wall clock. After the first FIT_STEPS optimizer steps (inside the
warmup for the presets, so the learning rate does not jump) the total step count is set to
`steps so far + remaining budget / seconds per step so far`, and refitted the same way after every periodic eval
(the average then includes eval time and any change in CPU contention). Training stops when the budget is spent
even if the estimate was optimistic; the final eval and save come after the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import math
import random
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import data
import model_card
from checkpoint import (CHECKPOINT_DIR, CheckpointError, latest_checkpoint, load_checkpoint, restore_rng, rng_state,
                        save_checkpoint)
from configuration_toygpt import PRESETS, ToyGPTConfig
from distributed import Processes
from evaluation import autocast, evaluate
from model_dir import OutputDir, OutputDirError, write_model_files
from modeling_toygpt import ToyGPTForCausalLM
from optim import build_optimizer, build_scheduler, fit_total_steps
from run_log import MetricsLog, plot_loss_curve, read_metrics
from training_loss import CausalLMLoss

# Training defaults per preset (the architecture lives in configuration_toygpt.PRESETS); every one has a flag.
TRAINING_DEFAULTS = {
    # tiny: tuned for 10 minutes on 2 CPU cores (bench/quality.py), where the run is step-bound: small batches
    # (1024 tokens) give more optimizer steps; the final eval (4 x eval_batches x batch_size windows) covers the
    # whole tiny Shakespeare validation split while each periodic eval stays a few seconds.
    "tiny": dict(
        batch_size=4, grad_accum=1, lr=2e-3, min_lr=2e-4, warmup_steps=20, max_steps=2000, weight_decay=0.1,
        grad_clip=1.0, eval_every=100, eval_batches=9, checkpoint_every=200,
    ),
    "gpt2": dict(
        batch_size=16, grad_accum=32, lr=6e-4, min_lr=6e-5, warmup_steps=700, max_steps=20000, weight_decay=0.1,
        grad_clip=1.0, eval_every=500, eval_batches=40, checkpoint_every=1000,
    ),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
FLOAT_FLAGS = ("lr", "min_lr", "weight_decay", "grad_clip", "dropout", "time_budget_min")
# What --resume cannot change: the shapes of the checkpoint's tensors, and the data stream it continues.
RESUME_FIXED_FLAGS = ("preset", "n_layer", "n_head", "n_embd", "block_size", "seed", "input", "dataset",
                      "dataset_config", "split", "text_column")
# Recorded per run (training_args.json), recomputed on --resume rather than taken from the checkpoint.
DATA_RECORDS = ("input_path", "input_sha256", "data_description", "data_source", "data_fingerprint")
FIT_STEPS = 10  # optimizer steps timed before the schedule is first fitted to --time-budget-min
FINAL_EVAL_BATCHES = 4  # the final eval reads this many times --eval-batches (the whole split if it is shorter)
BATCH_HASH_ENV = "TOYGPT_LOG_BATCH_HASH"  # debug: each rank prints a hash of its first batch (DDP test)


class TrainError(ValueError):
    """A bad command line or output directory, reported before any work starts."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments and everything checked before any work


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--input", help="training text: a UTF-8 text file, a directory or quoted glob of text files, or a directory of "
        f"parquet/jsonl/csv/arrow files (default: {data.DEFAULT_INPUT} if present, else the default corpus)")
    add("--dataset", help="a Hub dataset to stream instead of --input, as owner/name (HF_ENDPOINT, HF_TOKEN respected)")
    add("--dataset-config", help="the dataset's config (subset), if it has several")
    add("--split", help="dataset split to train on (default: train); held out: its 'validation' split, else a fixed "
        "tenth of its rows")
    add("--text-column", help="dataset column holding the text (default: text)")
    add("--output-dir", default="out/toygpt", help="model directory to write (default: out/toygpt)")
    add("--preset", choices=sorted(PRESETS), help="architecture + training defaults (default: tiny)")
    # Architecture (None: the preset's value; on --resume the checkpoint's).
    add("--n-layer", type=int)
    add("--n-head", type=int)
    add("--n-embd", type=int)
    add("--block-size", type=int, help="context length in tokens")
    add("--dropout", type=float)
    # Optimisation.
    add("--batch-size", type=int, help="windows per micro-batch, per process")
    add("--grad-accum", type=int, help="micro-batches per optimizer step")
    add("--lr", type=float, help="peak learning rate")
    add("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    add("--warmup-steps", type=int)
    add("--max-steps", type=int, help="optimizer steps (with --time-budget-min: an upper bound)")
    add("--time-budget-min", type=float, help="wall-clock budget in minutes; the schedule is fitted to it")
    add("--weight-decay", type=float, help="AdamW weight decay on matrices (dim >= 2) only")
    add("--grad-clip", type=float, help="max gradient norm (0 disables clipping)")
    add("--eval-every", type=int, help="optimizer steps between evals")
    add("--eval-batches", type=int, help="validation batches per periodic eval")
    add("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    add("--seed", type=int, default=None, help="makes CPU runs reproducible (default 1337)")
    add("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
        help="autocast dtype; auto = bfloat16 on CUDA, float32 elsewhere")
    add("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    add("--overwrite", action="store_true", help="replace an existing --output-dir")
    add("--resume", action="store_true", help="continue from --output-dir/checkpoint (flags given override)")
    return p


def resolve_args(args: argparse.Namespace, saved: dict | None = None) -> argparse.Namespace:
    """Fill every unset flag: from the resumed run's saved arguments, else the preset's defaults."""
    resolved = vars(args).copy()
    preset = (saved or {}).get("preset") or resolved["preset"] or "tiny"
    defaults = {
        **{k: PRESETS[preset][k] for k in MODEL_FLAGS},
        **TRAINING_DEFAULTS[preset],
        "seed": 1337, "device": "auto", "dtype": "auto", "compile": False, "input": None, "time_budget_min": None,
        "dataset": None, "dataset_config": None, "split": "train", "text_column": "text",
    }
    for key, value in {**defaults, **(saved or {})}.items():
        if resolved.get(key) is None:
            resolved[key] = value
    resolved["preset"] = preset
    args = argparse.Namespace(**resolved)
    for name in FLOAT_FLAGS:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps", "eval_every",
                "eval_batches", "checkpoint_every")
    for name in positive:
        if getattr(args, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps"):
        if getattr(args, name) < 0:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if args.min_lr > args.lr:
        raise TrainError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr}).")
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        raise TrainError(f"--time-budget-min must be positive, got {args.time_budget_min}.")
    return args


def model_config(args) -> ToyGPTConfig:
    try:
        return ToyGPTConfig.from_preset(args.preset, **{k: getattr(args, k) for k in MODEL_FLAGS})
    except ValueError as err:
        raise TrainError(str(err)) from err


def check_device(device_arg: str) -> None:
    """A --device this machine does not have is a command-line error, reported before any work."""
    if device_arg == "auto":
        return
    try:
        device = torch.device(device_arg)
    except RuntimeError as err:
        raise TrainError(f"--device {device_arg!r} is not a device ({err}); use auto, cpu, cuda, cuda:N or mps.") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device_arg}: no CUDA GPU is available here; use --device cpu (or auto).")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"--device {device_arg}: MPS is not available here; use --device cpu (or auto).")


def autocast_dtype(dtype_arg: str, device: torch.device):
    """The autocast dtype, or None for plain float32 (master weights are float32 either way)."""
    if dtype_arg == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if dtype_arg == "bfloat16" else None


def check_resume_flags(args: argparse.Namespace, saved: dict) -> None:
    """--resume continues the checkpoint's model and data: flags that would change them are refused, named."""
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the checkpoint has {saved.get(name)})"
               for name in RESUME_FIXED_FLAGS
               if getattr(args, name, None) is not None and getattr(args, name) != saved.get(name)]
    if changed:
        raise TrainError(
            f"--resume continues the checkpoint's run, which these flags would change: {'; '.join(changed)}. "
            "Drop them to resume, or start a new run (another --output-dir, or --overwrite)."
        )


def prepare(args: argparse.Namespace):
    """Claim --output-dir (lock, finish an interrupted save), resolve every flag (from the checkpoint on --resume) and
    check flags, data and output: everything that can be wrong is reported here, before any work.

    Returns the resolved args (with the data records of DATA_RECORDS), the checked data source, the checkpoint to
    resume from or None, and the claimed output dir (locked on rank 0 until it is closed)."""
    given_input = args.input or (data.DEFAULT_INPUT if data.DEFAULT_INPUT.is_file() else None)
    output = OutputDir(args.output_dir, inputs=[given_input], replace=args.overwrite or args.resume,
                       lock=os.environ.get("RANK", "0") == "0", log=lambda message: print(message, file=sys.stderr),
                       exists_hint=", --resume to continue its checkpoint, or choose another --output-dir")
    try:
        resume_from, saved = None, {}
        if args.resume:
            resume_from = latest_checkpoint(output.path)
            if resume_from is None:
                raise TrainError(f"--resume: no checkpoint in {output.path / CHECKPOINT_DIR}; start the run without "
                                 "--resume.")
            saved = json.loads((resume_from / "trainer_state.json").read_text())["args"]
            check_resume_flags(args, saved)
        args = resolve_args(args, {k: v for k, v in saved.items() if k not in ("resume", "overwrite", *DATA_RECORDS)}
                            if args.resume else None)
        model_config(args)
        check_device(args.device)
        source, args.data_description = data.resolve_source(
            input=args.input, dataset=args.dataset, dataset_config=args.dataset_config, split=args.split,
            text_column=args.text_column, block_size=args.block_size,
            dataset_revision=saved.get("data_source", {}).get("dataset_revision"))  # a resumed run keeps its commit
        args.data_source, args.data_fingerprint = source.spec(), source.fingerprint()
        output.refuse_inputs([args.data_source.get("input")])
        # quantize.py evaluates on the text a model was trained on, where that is one file
        args.input_path = args.data_source["input"] if args.data_fingerprint["type"] == "file" else None
        args.input_sha256 = args.data_fingerprint.get("sha256")
        if args.resume and saved.get("data_fingerprint", args.data_fingerprint) != args.data_fingerprint:
            raise TrainError(
                f"--resume: the training data ({args.data_description}) has changed since the checkpoint was written, "
                "and the checkpoint continues a stream over the old data. Restore it to resume, or start a new run on "
                "the new data (another --output-dir, or --overwrite)."
            )
    except BaseException:
        output.close()
        raise
    return args, source, resume_from, output


def start_output_dir(output: OutputDir, resuming: bool) -> None:
    """--overwrite drops the old run's checkpoints and metrics, but keeps its model files until the new model
    directory is complete and swapped in atomically at the end."""
    out_dir = output.path
    if output.replaces and not resuming:
        print(f"--overwrite: replacing the run in {out_dir}: its checkpoint and metrics now; its model files when the "
              "new ones are complete.", file=sys.stderr, flush=True)
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# The run: its state, one step, the schedule fit, checkpoints, evals


@dataclass
class RunState:
    """What the training loop advances, and what a checkpoint saves and restores."""

    total_steps: int
    step: int = 0
    budget_fitted: bool = False  # --time-budget-min: total_steps has been fitted to the wall clock
    elapsed_before: float = 0.0  # training seconds spent by the processes this run resumed from
    tokens_seen: int = 0
    train_loss: float = float("nan")
    start_step: int = 0  # the step this process started at
    last_checkpoint_step: int = 0
    started: float = field(default_factory=time.perf_counter)

    def run_seconds(self) -> float:
        """Seconds this process has trained."""
        return time.perf_counter() - self.started

    def elapsed(self) -> float:
        """Seconds the whole run has trained, resumed parts included."""
        return self.elapsed_before + self.run_seconds()


def restore_run(checkpoint_dir: Path, model, optimizer, stream, args, processes: Processes):
    """(RunState, scheduler) continuing `checkpoint_dir` exactly: weights, optimizer, schedule, stream and RNGs."""
    saved = load_checkpoint(checkpoint_dir, model, optimizer, processes.rank, processes.world_size)
    state = RunState(total_steps=saved["total_steps"], step=saved["step"], budget_fitted=saved["budget_fitted"],
                     elapsed_before=saved["elapsed_s"], tokens_seen=saved["tokens_seen"], start_step=saved["step"],
                     last_checkpoint_step=saved["step"])
    if not state.budget_fitted or args.max_steps != saved["args"]["max_steps"]:
        state.total_steps = args.max_steps  # a new --max-steps extends (or cuts) the schedule
    try:
        stream.load_state_dict(saved["rank_state"]["stream"])
    except ValueError as err:  # the input changed in a way the recorded hash did not catch (older checkpoints)
        raise TrainError(f"--resume: {err}") from None
    scheduler = build_scheduler(optimizer, args, state.total_steps, state.step)
    if state.total_steps == saved["total_steps"]:
        scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved["rank_rng"], saved["rank_state"]["python_random"])
    return state, scheduler


def train_step(step_model, optimizer, batches, args, processes: Processes, amp_dtype, state: RunState, lr) -> float:
    """One optimizer step over --grad-accum micro-batches; returns the mean training loss (over every rank).

    A loss that is not finite stops the run before the optimizer applies it: the last checkpoint stays good."""
    loss_sum = torch.zeros((), device=processes.device)
    for micro in range(args.grad_accum):
        batch = next(batches).to(processes.device, non_blocking=True)  # (batch_size, block_size + 1)
        last_micro = micro == args.grad_accum - 1
        # DDP all-reduces gradients on the last micro-batch only.
        sync = step_model.no_sync() if processes.distributed and not last_micro else contextlib.nullcontext()
        with sync:
            with autocast(processes.device, amp_dtype):
                # Every window position has its target (no token lost to the usual shift).
                loss = step_model(batch[:, :-1], batch[:, 1:])
            (loss / args.grad_accum).backward()
        loss_sum += loss.detach()
    train_loss = processes.all_reduce_sum(loss_sum).item() / args.grad_accum / processes.world_size
    if not math.isfinite(train_loss):
        checkpoints = Path(args.output_dir) / CHECKPOINT_DIR
        kept = (f"The last good checkpoint, step {state.last_checkpoint_step}, is in {checkpoints}: resume it with a "
                "lower learning rate (--resume --lr ...), or start again with a lower --lr."
                if latest_checkpoint(Path(args.output_dir)) else "No checkpoint was written yet: start again with a "
                "lower --lr.")
        raise TrainFailed(f"the training loss is {train_loss} at step {state.step + 1} (learning rate {lr:.3g}): "
                          f"training diverged; nothing of this step was applied. {kept}")
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return train_loss


def refit_due(state: RunState, args, budget_s: float | None) -> bool:
    """--time-budget-min: fit after FIT_STEPS timed steps, then refit at every eval (the pace then includes evals)."""
    if budget_s is None:
        return False
    return state.step == FIT_STEPS or (state.budget_fitted and state.step % args.eval_every == 0)


def refit_schedule(state: RunState, optimizer, scheduler, args, budget_s: float, processes: Processes):
    """Set total_steps so that the schedule ends when the budget runs out, at the pace timed so far (rank 0's)."""
    run_s = state.run_seconds()
    seconds_left = budget_s - state.elapsed_before - run_s
    fitted = fit_total_steps(state.step, state.step - state.start_step, run_s, seconds_left, args.max_steps)
    fitted = processes.from_main(fitted)
    state.budget_fitted = True
    if fitted == state.total_steps:
        return scheduler
    state.total_steps = fitted
    return build_scheduler(optimizer, args, fitted, state.step)


def checkpoint(out_dir: Path, model, optimizer, scheduler, state: RunState, args, stream, processes: Processes):
    """Every rank's stream position and RNGs, gathered; rank 0 writes OUTPUT/checkpoint/step-N."""
    trainer_state = {"step": state.step, "total_steps": state.total_steps, "budget_fitted": state.budget_fitted,
                     "elapsed_s": state.elapsed(), "tokens_seen": state.tokens_seen, "args": vars(args)}
    rank_state = {"stream": stream.state_dict(), "python_random": list(random.getstate())}
    rank_states, rank_rngs = processes.gather_objects(rank_state), processes.gather_objects(rng_state())
    if processes.is_main:
        save_checkpoint(out_dir, model, optimizer, scheduler, trainer_state, rank_states, rank_rngs)
    processes.barrier()
    state.last_checkpoint_step = state.step


def evaluate_and_log(loss_model, val, args, max_batches, amp_dtype, processes, metrics, step) -> dict:
    result = evaluate(loss_model, val, args.batch_size, max_batches, amp_dtype, processes)
    metrics.log({"step": step, **result})
    if processes.is_main:
        tqdm.write(f"step {step}: val loss {result['val_loss']:.4f}, ppl {result['val_perplexity']:.1f}, "
                   f"bits/char {result['val_bits_per_char']:.4f}", file=sys.stderr)
    return result


def log_first_batch(batches, rank: int):
    """Debug (BATCH_HASH_ENV): print a hash of this rank's first batch, then pass every batch on."""
    first = next(batches)
    print(f"rank {rank} first batch sha256 {hashlib.sha256(first.numpy().tobytes()).hexdigest()[:16]}",
          file=sys.stderr, flush=True)
    yield first
    yield from batches


# ----------------------------------------------------------------------------------------------------------------
# Training


class TrainFailed(RuntimeError):
    """A run that stopped at run time (diverged, interrupted); the message says what was kept and what to do."""


@contextlib.contextmanager
def ctrl_c_requests_a_stop():
    """The first Ctrl-C sets the yielded event (the loop stops at the next step, saves a checkpoint and says how to
    resume); a second one interrupts at once. Outside the main thread (no signals there), the event never fires."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)
        print("\nCtrl-C: stopping after this step (Ctrl-C again to stop at once, without a checkpoint)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_command(args) -> str:
    launcher = "torchrun --nproc_per_node N train.py" if os.environ.get("WORLD_SIZE", "1") != "1" else "python train.py"
    return f"{launcher} --output-dir {args.output_dir} --resume"


def build_run(args, source, resume_from, processes: Processes):
    """The model, optimizer, data and schedule, fresh (seeded) or restored exactly from `resume_from`."""
    torch.manual_seed(args.seed)  # same initial weights on every rank
    random.seed(args.seed)
    model = ToyGPTForCausalLM(model_config(args)).to(processes.device).train()
    optimizer = build_optimizer(model, args, processes.device)
    stream = data.TrainWindows(source, args.block_size, seed=args.seed, rank=processes.rank,
                               world_size=processes.world_size)
    val = data.val_windows(source, args.block_size, max_windows=FINAL_EVAL_BATCHES * args.eval_batches * args.batch_size)
    if resume_from is not None:
        state, scheduler = restore_run(resume_from, model, optimizer, stream, args, processes)
        if processes.is_main:
            print(f"resumed from {resume_from} at step {state.step}", file=sys.stderr, flush=True)
    else:
        torch.manual_seed(args.seed + processes.rank)  # dropout differs per rank
        state, scheduler = RunState(total_steps=args.max_steps), build_scheduler(optimizer, args, args.max_steps)
    return model, optimizer, scheduler, stream, val, state


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by build_parser()'s namespace; return the final metrics (rank 0's view)."""
    args, source, resume_from, output = prepare(args)
    try:
        return run(args, source, resume_from, output)
    finally:
        output.close()


def run(args, source, resume_from: Path | None, output: OutputDir) -> dict:
    """The training loop, from the checked arguments to the written model directory."""
    processes = Processes.launch(args.device)
    device, amp_dtype, out_dir = processes.device, autocast_dtype(args.dtype, processes.device), output.path
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if processes.is_main:
        print(f"data: {args.data_description}", file=sys.stderr, flush=True)
        start_output_dir(output, resuming=resume_from is not None)
    processes.barrier()
    model, optimizer, scheduler, stream, val, state = build_run(args, source, resume_from, processes)
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=processes.is_main)
    metrics.keep_until(state.step)

    loss_model = CausalLMLoss(model)  # evals use it as is: their batches differ per rank, no gradient sync
    step_model = torch.compile(loss_model) if args.compile else loss_model
    if processes.distributed:
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = stream.batches(args.batch_size)
    if os.environ.get(BATCH_HASH_ENV) and state.step == 0:
        batches = log_first_batch(batches, processes.rank)
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * processes.world_size
    bar = tqdm(total=state.total_steps, initial=state.step, disable=not processes.is_main, desc="train",
               dynamic_ncols=True)
    with ctrl_c_requests_a_stop() as stop, bar:
        while state.step < state.total_steps:
            if processes.from_main(stop.is_set() or (budget_s is not None and state.elapsed() >= budget_s)):
                break  # Ctrl-C, or the budget is spent: final checkpoint (and eval and save) below
            step_start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            state.train_loss = train_step(step_model, optimizer, batches, args, processes, amp_dtype, state, lr)
            scheduler.step()
            state.step += 1
            state.tokens_seen += tokens_per_step
            tokens_per_s = tokens_per_step / (time.perf_counter() - step_start)
            metrics.log({"step": state.step, "train_loss": state.train_loss, "lr": lr, "tokens_per_s": tokens_per_s})
            bar.update(1)
            bar.set_postfix(loss=f"{state.train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if state.step % args.eval_every == 0 and state.step < state.total_steps:
                evaluate_and_log(loss_model, val, args, args.eval_batches, amp_dtype, processes, metrics, state.step)
            if refit_due(state, args, budget_s):
                scheduler = refit_schedule(state, optimizer, scheduler, args, budget_s, processes)
                bar.total = state.total_steps
            if state.step % args.checkpoint_every == 0 and state.step < state.total_steps:
                checkpoint(out_dir, model, optimizer, scheduler, state, args, stream, processes)
    stream.close()

    elapsed = state.elapsed()
    if state.last_checkpoint_step != state.step:  # saved before the final eval: a failing eval loses no step
        checkpoint(out_dir, model, optimizer, scheduler, state, args, stream, processes)
    if stop.is_set():
        raise TrainFailed(f"interrupted by Ctrl-C at step {state.step}; its checkpoint is in "
                          f"{out_dir / CHECKPOINT_DIR}. Continue with: {resume_command(args)}")
    result = evaluate_and_log(loss_model, val, args, FINAL_EVAL_BATCHES * args.eval_batches, amp_dtype, processes,
                              metrics, state.step)
    final = finish(output, model, args, state, result, elapsed, processes, metrics)
    processes.barrier()
    return final


def finish(output: OutputDir, model, args, state: RunState, result: dict, elapsed: float, processes, metrics) -> dict:
    """The final record; rank 0 logs it and writes the model directory."""
    final = {
        "final": True, "step": state.step, "train_loss": state.train_loss, **result,
        "tokens_seen": state.tokens_seen, "elapsed_s": elapsed,
        "tokens_per_s": (state.tokens_seen / elapsed) if elapsed else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "world_size": processes.world_size, "device": str(processes.device),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if processes.is_main:
        metrics.log(final)
        write_output_dir(output, model, args, final)
        print(f"final: step {state.step}, val loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}, "
              f"bits/char {final['val_bits_per_char']:.4f}; wrote {args.output_dir}", file=sys.stderr, flush=True)
    return final


# ----------------------------------------------------------------------------------------------------------------
# The model directory


def write_output_dir(output: OutputDir, model, args, final: dict) -> None:
    """Atomically replace the output dir by the complete model dir (+ metrics, args, plot, card, latest checkpoint);
    what else the user keeps in it stays."""
    records = read_metrics(output.path / "metrics.jsonl")
    checkpoint_dir = latest_checkpoint(output.path)
    with output.write() as tmp:
        write_model_files(model, tmp)
        with open(tmp / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        (tmp / "training_args.json").write_text(json.dumps(vars(args), indent=2))
        plot_loss_curve(records, tmp / "loss_curve.png")
        model_card.training_card(model.config.to_dict(), vars(args), final).save(str(tmp / "README.md"))
        if checkpoint_dir is not None:  # kept for --resume with a larger --max-steps; hard links cost no space
            shutil.copytree(checkpoint_dir, tmp / CHECKPOINT_DIR / checkpoint_dir.name, copy_function=_link_or_copy)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (TrainError, data.InputError, CheckpointError, OutputDirError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except TrainFailed as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, permissions, ...: what failed, not a traceback
        print(f"train.py: error: {err.strerror or err} ({err.filename or 'while training'}); the last checkpoint, if "
              f"any, is in {Path(args.output_dir) / CHECKPOINT_DIR}: fix the cause and {resume_command(args)}",
              file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
