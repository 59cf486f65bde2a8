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
import random
import resource
import shutil
import sys
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
from model_dir import atomic_dir, write_model_files
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
    add("--input", help=f"UTF-8 text file (default: {data.DEFAULT_INPUT} if present, else the default corpus)")
    add("--output-dir", default="out/toygpt", help="model directory to write (default: out/toygpt)")
    add("--preset", choices=sorted(PRESETS), default="tiny", help="architecture + training defaults")
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
    preset = resolved["preset"] if saved is None else saved.get("preset", resolved["preset"])
    defaults = {
        **{k: PRESETS[preset][k] for k in MODEL_FLAGS},
        **TRAINING_DEFAULTS[preset],
        "seed": 1337, "device": "auto", "dtype": "auto", "compile": False, "input": None, "time_budget_min": None,
    }
    for key, value in {**defaults, **(saved or {})}.items():
        if resolved.get(key) is None:
            resolved[key] = value
    resolved["preset"] = preset
    args = argparse.Namespace(**resolved)
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


def prepare_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check out_dir before any work; return the checkpoint to resume from (None for a fresh run)."""
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise TrainError(f"--resume: no checkpoint in {out_dir / CHECKPOINT_DIR}; start the run without --resume.")
        return checkpoint
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"--output-dir {out_dir} is a file, not a directory; choose another --output-dir.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise TrainError(
            f"{out_dir} already exists; pass --overwrite to replace it, --resume to continue its checkpoint, "
            "or choose another --output-dir."
        )
    return None


def prepare(args: argparse.Namespace) -> tuple[argparse.Namespace, Path | None]:
    """Resolve every flag (from the checkpoint on --resume) and check flags, input and output before any work.

    Returns the resolved args (with input_path and data_description) and the checkpoint to resume from, or None."""
    out_dir = Path(args.output_dir)
    resume_from = prepare_output_dir(out_dir, resume=args.resume, overwrite=args.overwrite)
    saved = None
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())["args"]
        saved = {k: v for k, v in saved.items() if k not in ("resume", "overwrite", "input_path", "data_description")}
    args = resolve_args(args, saved)
    model_config(args)
    check_device(args.device)
    input_path, args.data_description = data.resolve_input(args.input, args.block_size)
    args.input_path = str(input_path.resolve())  # recorded in training_args.json: quantize.py evaluates on it
    return args, resume_from


def start_output_dir(out_dir: Path, resuming: bool) -> None:
    """--overwrite drops the old run's checkpoints and metrics, but keeps its model files until the new model
    directory is complete and swapped in atomically at the end."""
    if not resuming and out_dir.exists():
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
    stream.load_state_dict(saved["rank_state"]["stream"])
    scheduler = build_scheduler(optimizer, args, state.total_steps, state.step)
    if state.total_steps == saved["total_steps"]:
        scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved["rank_rng"], saved["rank_state"]["python_random"])
    return state, scheduler


def train_step(step_model, optimizer, batches, args, processes: Processes, amp_dtype) -> float:
    """One optimizer step over --grad-accum micro-batches; returns the mean training loss."""
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
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / args.grad_accum


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


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by build_parser()'s namespace; return the final metrics (rank 0's view)."""
    args, resume_from = prepare(args)
    processes = Processes.launch(args.device)
    device, amp_dtype, out_dir = processes.device, autocast_dtype(args.dtype, processes.device), Path(args.output_dir)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if processes.is_main:
        print(f"data: {args.data_description}", file=sys.stderr, flush=True)
        start_output_dir(out_dir, resuming=resume_from is not None)
    processes.barrier()

    torch.manual_seed(args.seed)  # same initial weights on every rank
    random.seed(args.seed)
    model = ToyGPTForCausalLM(model_config(args)).to(device).train()
    optimizer = build_optimizer(model, args, device)
    stream = data.TrainWindows(args.input_path, args.block_size, seed=args.seed, rank=processes.rank,
                               world_size=processes.world_size)
    val = data.val_windows(args.input_path, args.block_size,
                           max_windows=FINAL_EVAL_BATCHES * args.eval_batches * args.batch_size)
    if resume_from is not None:
        state, scheduler = restore_run(resume_from, model, optimizer, stream, args, processes)
        if processes.is_main:
            print(f"resumed from {resume_from} at step {state.step}", file=sys.stderr, flush=True)
    else:
        torch.manual_seed(args.seed + processes.rank)  # dropout differs per rank
        state, scheduler = RunState(total_steps=args.max_steps), build_scheduler(optimizer, args, args.max_steps)
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
    while state.step < state.total_steps:
        if budget_s is not None and processes.from_main(state.elapsed() >= budget_s):
            break  # budget spent: final checkpoint, eval and save below
        step_start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        state.train_loss = train_step(step_model, optimizer, batches, args, processes, amp_dtype)
        scheduler.step()
        state.step += 1
        state.tokens_seen += tokens_per_step
        tokens_per_s = tokens_per_step / (time.perf_counter() - step_start)
        metrics.log({"step": state.step, "train_loss": state.train_loss, "lr": lr, "tokens_per_s": tokens_per_s})
        bar.update(1)
        bar.set_postfix(loss=f"{state.train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if state.step % args.eval_every == 0 and state.step < state.total_steps:
            result = evaluate_and_log(loss_model, val, args, args.eval_batches, amp_dtype, processes, metrics,
                                      state.step)
            if processes.is_main:
                tqdm.write(f"step {state.step}: val loss {result['val_loss']:.4f}, ppl {result['val_perplexity']:.1f}, "
                           f"bits/char {result['val_bits_per_char']:.4f}", file=sys.stderr)
        if refit_due(state, args, budget_s):
            scheduler = refit_schedule(state, optimizer, scheduler, args, budget_s, processes)
            bar.total = state.total_steps
        if state.step % args.checkpoint_every == 0 and state.step < state.total_steps:
            checkpoint(out_dir, model, optimizer, scheduler, state, args, stream, processes)
    bar.close()
    stream.close()

    elapsed = state.elapsed()
    if state.last_checkpoint_step != state.step:  # saved before the final eval: a failing eval loses no step
        checkpoint(out_dir, model, optimizer, scheduler, state, args, stream, processes)
    result = evaluate_and_log(loss_model, val, args, FINAL_EVAL_BATCHES * args.eval_batches, amp_dtype, processes,
                              metrics, state.step)
    final = finish(out_dir, model, args, state, result, elapsed, processes, metrics)
    processes.barrier()
    return final


def finish(out_dir: Path, model, args, state: RunState, result: dict, elapsed: float, processes, metrics) -> dict:
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
        write_output_dir(out_dir, model, args, final)
        print(f"final: step {state.step}, val loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}, "
              f"bits/char {final['val_bits_per_char']:.4f}; wrote {out_dir}", file=sys.stderr, flush=True)
    return final


# ----------------------------------------------------------------------------------------------------------------
# The model directory


def write_output_dir(out_dir: Path, model, args, final: dict) -> None:
    """Atomically replace out_dir by the complete model dir (+ metrics, args, plot, card, latest checkpoint)."""
    records = read_metrics(out_dir / "metrics.jsonl")
    checkpoint_dir = latest_checkpoint(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
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
    except (TrainError, data.InputError, CheckpointError, FileExistsError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
