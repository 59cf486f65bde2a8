"""The training loop train.py runs, and its helpers: one step, the schedule's fit to a time budget, checkpoints,
evals, the final model directory.

    final = training.train(TrainingConfig(input="input.txt", max_steps=500))   # prepare() resolves and checks it

The run streams the text through toygpt/stream.py, trains the corpus vocabulary where that is exact and saves time
(toygpt/corpus_vocab.py), with the config's optimizer and schedule (toygpt/optim.py), evaluates periodically (val
loss, perplexity, bits per character over evaluation.validation_windows, denser where the schedule decays) and keeps
the best eval's weights (toygpt/best_model.py), writes resumable checkpoints to OUTPUT/checkpoint/ and finally swaps in
OUTPUT atomically: the save_pretrained model directory (the best eval's weights, --no-keep-best: the last), tokenizer,
metrics.jsonl, training_args.json, loss_curve.png and a README.md card.

--time-budget-min: the schedule is fitted to the wall clock. After the first FIT_STEPS optimizer steps (inside the
warmup for the presets, so the learning rate does not jump) the total step count is set to
`steps so far + remaining budget / seconds per step so far`, and refitted the same way every --eval-every steps
(the average then includes eval time and any change in CPU contention). Training stops when the budget is spent
even if the estimate was optimistic; the final checkpoint, eval and save come after the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from modeling_toygpt import ToyGPTForCausalLM
from toygpt import model_card
from toygpt.checkpoint import (CHECKPOINT_DIR, latest_checkpoint, load_checkpoint, read_trainer_state, restore_rng,
                               rng_state, save_checkpoint)
from toygpt.corpus_vocab import CorpusVocab, choose
from toygpt.distributed import Processes
from toygpt.best_model import BestModel, best_path, eval_due, prune
from toygpt.weight_average import set_updates, update, updates, weight_average
from toygpt.evaluation import autocast, evaluate, validation_windows
from toygpt.model_dir import OutputDir, write_model_files
from toygpt.defaults import EPOCH_RULES
from toygpt.optim import build_optimizer, build_scheduler, fit_total_steps, set_weight_decay
from toygpt.stream import TrainWindows, ValWindows
from toygpt.errors import ToyGPTError
from toygpt import progress
from toygpt import regularization
from toygpt import sources
from toygpt.run_log import MetricsLog, plot_loss_curve, read_metrics
from toygpt.train_config import (TrainError, TrainingConfig, autocast_dtype, discard_failed_start, prepare,
                                start_output_dir)
from toygpt.tracking import RUNS_DIR, check_report_to, open_trackers
from toygpt.training_loss import CausalLMLoss, clip_gradients

FIT_STEPS = 10  # optimizer steps timed before the schedule is first fitted to --time-budget-min
BATCH_HASH_ENV = "TOYGPT_LOG_BATCH_HASH"  # debug: each rank prints a hash of its first batch (DDP test)


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


def restore_run(checkpoint_dir: Path, model, optimizer, stream, config: TrainingConfig, processes: Processes,
                average=None):
    """(RunState, scheduler) continuing `checkpoint_dir` exactly: weights, optimizer, schedule, stream and RNGs, and
    `average` (the weights' moving average) where the checkpoint holds one; else it starts from the weights now."""
    saved = load_checkpoint(checkpoint_dir, model, optimizer, processes.rank, processes.world_size,
                            None if average is None else average.module)
    if average is not None:
        set_updates(average, saved.get("ema_updates", 0))
        if not saved.get("ema_updates") and processes.is_main:
            print(f"--resume: {checkpoint_dir} holds no moving average of the weights (--ema-decay was 0, or it was "
                  "written before there was one); it starts from the weights at this step", file=sys.stderr)
    state = RunState(total_steps=saved["total_steps"], step=saved["step"], budget_fitted=saved["budget_fitted"],
                     elapsed_before=saved["elapsed_s"], tokens_seen=saved["tokens_seen"], start_step=saved["step"],
                     last_checkpoint_step=saved["step"])
    if not state.budget_fitted or config.max_steps != saved["args"]["max_steps"]:
        state.total_steps = config.max_steps  # a new --max-steps extends (or cuts) the schedule
    try:
        stream.load_state_dict(saved["rank_state"]["stream"])
    except ValueError as err:  # the input changed in a way the recorded hash did not catch (older checkpoints)
        raise TrainError(f"--resume: {err}") from None
    scheduler = build_scheduler(optimizer, state.total_steps, state.step, **schedule_args(config))
    if state.total_steps == saved["total_steps"]:
        scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved["rank_rng"], saved["rank_state"]["python_random"])
    return state, scheduler


def forward_backward(step_model, batches, grad_accum: int, processes: Processes, amp_dtype) -> float:
    """The gradients of one optimizer step over --grad-accum micro-batches; returns the mean training loss (over every
    rank)."""
    loss_sum = torch.zeros((), device=processes.device)
    for micro in range(grad_accum):
        batch = next(batches).to(processes.device, non_blocking=True)  # (batch_size, block_size + 1)
        last_micro = micro == grad_accum - 1
        # DDP all-reduces gradients on the last micro-batch only.
        sync = step_model.no_sync() if processes.distributed and not last_micro else contextlib.nullcontext()
        with sync:
            with autocast(processes.device, amp_dtype):
                # Every window position has its target (no token lost to the usual shift).
                loss = step_model(batch[:, :-1], batch[:, 1:])
            (loss / grad_accum).backward()
        loss_sum += loss.detach()
    return processes.all_reduce_sum(loss_sum).item() / grad_accum / processes.world_size


def refuse_non_finite(train_loss: float, state: RunState, lr: float, out_dir: Path) -> None:
    """A loss that is not finite stops the run before the optimizer applies it: the last checkpoint stays good."""
    if math.isfinite(train_loss):
        return
    checkpoints = out_dir / CHECKPOINT_DIR
    kept = (f"The last good checkpoint, step {state.last_checkpoint_step}, is in {checkpoints}: resume it with a "
            "lower learning rate (--resume --lr ...), or start again with a lower --lr."
            if latest_checkpoint(out_dir) else "No checkpoint was written yet: start again with a lower "
            "--lr.")
    raise TrainFailed(f"the training loss is {train_loss} at step {state.step + 1} (learning rate {lr:.3g}): "
                      f"training diverged; nothing of this step was applied. {kept}")


def apply_gradients(loss_model, optimizer, grad_clip: float) -> None:
    """Clip (by the full model's gradient norm, also with the corpus vocabulary), step, zero the gradients."""
    clip_gradients(loss_model.model, list(loss_model.parameters()), grad_clip, loss_model.vocab)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def refit_due(state: RunState, eval_every: int, budget_s: float | None) -> bool:
    """--time-budget-min: fit after FIT_STEPS timed steps, then refit at every eval (the pace then includes evals)."""
    if budget_s is None:
        return False
    return state.step == FIT_STEPS or (state.budget_fitted and state.step % eval_every == 0)


def schedule_args(config: TrainingConfig) -> dict:
    """optim.build_scheduler's keyword arguments from the config."""
    return dict(schedule=config.schedule, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps)


def refit_schedule(state: RunState, optimizer, scheduler, config: TrainingConfig, budget_s: float,
                   processes: Processes):
    """Set total_steps so that the schedule ends when the budget runs out, at the pace timed so far (rank 0's)."""
    run_s = state.run_seconds()
    seconds_left = budget_s - state.elapsed_before - run_s
    fitted = fit_total_steps(step=state.step, steps_timed=state.step - state.start_step, seconds_timed=run_s,
                             seconds_left=seconds_left, max_steps=config.max_steps)
    fitted = processes.from_main(fitted)
    state.budget_fitted = True
    if fitted == state.total_steps:
        return scheduler
    state.total_steps = fitted
    return build_scheduler(optimizer, fitted, state.step, **schedule_args(config))


def checkpoint(out_dir: Path, loss_model, optimizer, scheduler, state: RunState, config: TrainingConfig, stream,
               processes: Processes, best: BestModel | None = None, average=None):
    """Every rank's stream position and RNGs, gathered; rank 0 writes OUTPUT/checkpoint/step-N (the model being
    trained: the compact one with the corpus vocabulary, whose ids the checkpoint records)."""
    vocab = None if loss_model.vocab is None else loss_model.vocab.state_dict()
    trainer_state = {"step": state.step, "total_steps": state.total_steps, "budget_fitted": state.budget_fitted,
                     "elapsed_s": state.elapsed(), "tokens_seen": state.tokens_seen, "args": config.to_record(),
                     "vocab": vocab, "ema_updates": 0 if average is None else updates(average)}
    model = loss_model.model
    rank_state = {"stream": stream.state_dict(), "python_random": list(random.getstate())}
    rank_states, rank_rngs = processes.gather_objects(rank_state), processes.gather_objects(rng_state())
    if processes.is_main:
        if best is not None:  # before the checkpoint, which makes it the one --resume reads (best_model.py)
            best.save(out_dir, state.step)
        save_checkpoint(out_dir, model, optimizer, scheduler, trainer_state, rank_states, rank_rngs,
                        None if average is None else average.module)
        prune(out_dir, state.step)
    processes.barrier()
    state.last_checkpoint_step = state.step


def evaluate_and_log(loss_model, val, batch_size, amp_dtype, processes, metrics, state: RunState,
                     best: BestModel | None = None) -> dict:
    """The validation loss (every window of `val`: evaluation.validation_windows) at this step, logged; offered to
    `best` (rank 0's, None with --no-keep-best), which keeps a CPU copy of the weights if it is the best so far."""
    batches = math.ceil(len(val.windows) / (batch_size * processes.world_size))  # rank 0's share
    with progress.bar(total=batches, desc=f"eval step {state.step}", unit="batch", leave=False,
                      disable=not processes.is_main) as eval_bar:
        result = evaluate(loss_model, val, batch_size, None, amp_dtype, processes, progress=eval_bar)
    metrics.log({"step": state.step, **result, "elapsed_s": state.elapsed()})
    step = state.step
    if processes.is_main:
        is_best = best is not None and best.offer(step, result, loss_model.model)
        tqdm.write(f"step {step}: val loss {result['val_loss']:.4f}, ppl {result['val_perplexity']:.1f}, "
                   f"bits/char {result['val_bits_per_char']:.4f}" + (" (best so far)" if is_best else ""),
                   file=sys.stderr)
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


class TrainFailed(ToyGPTError):
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


def resume_command(output_dir) -> str:
    launcher = "torchrun --nproc_per_node N train.py" if os.environ.get("WORLD_SIZE", "1") != "1" else "python train.py"
    return f"{launcher} --output-dir {output_dir} --resume"


def corpus_vocabulary(config: TrainingConfig, source, resume_from,
                      processes: Processes) -> tuple[CorpusVocab | None, int | None]:
    """--vocab's choice: the corpus vocabulary (the checkpoint's on --resume, else one pass over the training split on
    rank 0, shared with every rank), or None for the full vocabulary; and the training split's tokens where that pass
    counted them (else None)."""
    if resume_from is not None:
        saved = read_trainer_state(resume_from).get("vocab")
        vocab = None if saved is None else CorpusVocab.from_state_dict(saved)
        return vocab, vocab and vocab.train_tokens
    if config.vocab == "full":
        return None, None
    vocab_size = config.model_config().vocab_size
    found = CorpusVocab.of_training_split(source, vocab_size) if processes.is_main else None
    vocab = CorpusVocab.from_state_dict(processes.from_main_object(found and found[0].state_dict()))
    if os.environ.get(BATCH_HASH_ENV):  # debug (DDP test): every rank holds the same ids
        digest = hashlib.sha256(vocab.seen_ids.numpy().tobytes()).hexdigest()[:16]
        print(f"rank {processes.rank} vocab sha256 {digest}", file=sys.stderr, flush=True)
    use = choose(config.vocab, vocab.n_seen / vocab_size, fine_tuning=config.init_from is not None)
    if processes.is_main:
        trained = f"the corpus vocabulary, {vocab.n_seen + 1:,} rows" if use else "the full vocabulary"
        print(f"vocab: the training split uses {vocab.n_seen:,} of the {vocab_size:,} token ids (one pass, "
              f"{found[1]:.1f} s): training {trained}", file=sys.stderr, flush=True)
    return (vocab if use else None), vocab.train_tokens


def training_split_tokens(config: TrainingConfig, source, counted: int | None,
                          processes: Processes) -> tuple[int | None, bool]:
    """The epochs rules' denominator, where a rule decides --weight-decay, and whether it is the whole
    split's: the vocabulary pass's count, else a count (rank 0's, shared) that stops where the rules no longer depend
    on it."""
    undecided = regularization.undecided(config)
    if not undecided or counted is not None:
        return counted, True
    needed = regularization.tokens_worth_counting(config.max_steps, config.step_tokens * processes.world_size,
                                                  undecided)
    counted = processes.from_main(sources.count_train_tokens(source, needed) if processes.is_main else 0)
    return counted, counted < needed


def choose_by_epochs(config: TrainingConfig, names, optimizer, total_steps: int, train_tokens: int,
                     tokens_per_step: int, is_main: bool, counted_all: bool = True) -> TrainingConfig:
    """The epochs rules (regularization.py) for `names`, the fields the run left to them, applied to the optimizer
    and recorded as --weight-decay. A value chosen before (a budget run's earlier fit) changes only where the rule
    now moves it by regularization.MIN_CHANGE or more."""
    epochs = regularization.run_epochs(total_steps, tokens_per_step, train_tokens)
    chosen = {}
    for name in names:
        value, before = regularization.rule_value(name, epochs), getattr(config, name)
        if before is None or abs(value - before) >= regularization.MIN_CHANGE:
            chosen[name] = value
    if not chosen:
        return config
    if "weight_decay" in chosen:
        set_weight_decay(optimizer, chosen["weight_decay"])
    if is_main:
        choices = ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in chosen.items())
        flags = " and ".join(f"--{name.replace('_', '-')}" for name in chosen)
        flags += " sets it" if len(chosen) == 1 else " set them"
        split = f"{train_tokens:,} tokens" if counted_all else f"{train_tokens:,}+ tokens (counted that far) at most"
        tqdm.write(f"{choices}: {total_steps:,} steps of {tokens_per_step:,} tokens read the training split's {split} "
                   f"{epochs:.1f} times (the epochs rules, toygpt/regularization.py; {flags})",
                   file=sys.stderr)
    return replace(config, **chosen)


@dataclass
class Run:
    """What build_run sets up: the model (in its loss), optimizer, schedule, data and state."""

    loss_model: CausalLMLoss
    optimizer: object  # optim.Optimizers
    scheduler: object  # optim.Schedule
    stream: TrainWindows
    val: ValWindows
    state: RunState
    best: BestModel | None  # --keep-best, rank 0: the best eval so far
    average: object  # the weights' moving average (weight_average.py), None with --ema-decay 0
    train_tokens: int | None  # the training split's length, where the epochs rules need it (undecided flags)
    train_tokens_counted_all: bool  # False: a long split's count stopped early (training_split_tokens)


def build_run(config: TrainingConfig, source, resume_from, init_model, processes: Processes) -> Run:
    """The model, its loss, optimizer, data and schedule, fresh (seeded) or restored exactly from `resume_from`.

    With the corpus vocabulary the model trained is the compact one (toygpt/corpus_vocab.py); the full one is saved."""
    vocab, train_tokens = corpus_vocabulary(config, source, resume_from, processes)
    train_tokens, counted_all = training_split_tokens(config, source, train_tokens, processes)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    random.seed(config.seed)
    model_config = config.model_config()
    if init_model is not None:  # --init-from: its fp32 weights, not a random init (always the full vocabulary)
        model = init_model
    else:
        model = ToyGPTForCausalLM(model_config if vocab is None else vocab.compact_config(model_config))
    if vocab is not None and resume_from is None:
        vocab.init_compact(model)
    model = model.to(processes.device).train()
    loss_model = CausalLMLoss(model, vocab=None if vocab is None else vocab.to(processes.device))
    weight_decay = config.weight_decay  # None: the rule's first value until the run knows its epochs
    if weight_decay is None:
        weight_decay = regularization.first_value(EPOCH_RULES["weight_decay"])
    optimizer = build_optimizer(model, processes.device, optimizer=config.optimizer, lr=config.lr,
                                weight_decay=weight_decay, embedding_lr=config.embedding_lr)
    stream = TrainWindows(source, config.block_size, seed=config.seed, rank=processes.rank,
                          world_size=processes.world_size)
    val = validation_windows(source, config.block_size, config.eval_batches, config.batch_size)
    average = weight_average(model, config.ema_decay)  # a copy of the initial weights, until the first update
    if resume_from is not None:
        state, scheduler = restore_run(resume_from, model, optimizer, stream, config, processes, average)
        if processes.is_main:
            print(f"resumed from {resume_from} at step {state.step}", file=sys.stderr, flush=True)
    else:
        torch.manual_seed(config.seed + processes.rank)  # dropout differs per rank
        state = RunState(total_steps=config.max_steps)
        scheduler = build_scheduler(optimizer, config.max_steps, **schedule_args(config))
    best = None
    if config.keep_best and processes.is_main:  # the best as the checkpoint left it (best_model.py)
        best = BestModel.load(resume_from.parents[1], state.step) if resume_from is not None else BestModel()
    return Run(loss_model, optimizer, scheduler, stream, val, state, best, average, train_tokens, counted_all)


def train(config: TrainingConfig) -> dict:
    """Run training as `config` says (prepare resolves and checks it first); return the final metrics (rank 0's)."""
    config, source, resume_from, init_model, output = prepare(config)
    existed = output.path.exists()
    try:
        with contextlib.ExitStack() as closing:  # the trackers, however the run ends
            return run(config, source, resume_from, init_model, output, closing)
    except BaseException:
        discard_failed_start(output, existed)
        raise
    finally:
        output.close()


def run(config: TrainingConfig, source, resume_from: Path | None, init_model, output: OutputDir,
        closing: contextlib.ExitStack) -> dict:
    """The training loop, from the checked config to the written model directory."""
    processes = Processes.launch(config.device)
    device, amp_dtype, out_dir = processes.device, autocast_dtype(config.dtype, processes.device), output.path
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if processes.is_main:
        print(f"data: {config.data.description}", file=sys.stderr, flush=True)
        start_output_dir(output, resuming=resume_from is not None)
    processes.barrier()
    r = build_run(config, source, resume_from, init_model, processes)
    config = replace(config, vocab_used="full" if r.loss_model.vocab is None else "corpus")
    loss_model, optimizer, scheduler, state = r.loss_model, r.optimizer, r.scheduler, r.state
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=processes.is_main)
    kept = metrics.keep_until(state.step)
    if processes.is_main:  # a resumed run continues its trackers' run from the checkpoint's step
        metrics.trackers = open_trackers(check_report_to(config.report_to), out_dir, config.run_name,
                                         config.to_record(), None if resume_from is None else state.step, kept)
    closing.callback(metrics.close)

    # Evals use loss_model as is (its weights' moving average where there is one): their batches differ per rank, no
    # gradient sync.
    eval_model = loss_model if r.average is None else CausalLMLoss(r.average.module, vocab=loss_model.vocab)
    step_model = torch.compile(loss_model) if config.compile else loss_model
    if processes.distributed:
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = r.stream.batches(config.batch_size)
    if os.environ.get(BATCH_HASH_ENV) and state.step == 0:
        batches = log_first_batch(batches, processes.rank)
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    tokens_per_step = config.step_tokens * processes.world_size
    # The epochs rules decide what the run leaves to them: a --max-steps run now, a budget run at each fit of its
    # step count (a resumed run keeps what its checkpoint recorded: the fields are set by then).
    by_rules = regularization.undecided(config)
    if by_rules and budget_s is None:
        config = choose_by_epochs(config, by_rules, optimizer, state.total_steps, r.train_tokens,
                                  tokens_per_step, processes.is_main, r.train_tokens_counted_all)

    bar = progress.TrainProgress(state.step, state.total_steps, budget_s, state.elapsed_before,
                                 enabled=processes.is_main)
    last_eval = None  # (step, result) of the latest eval
    with ctrl_c_requests_a_stop() as stop, contextlib.closing(bar):
        while state.step < state.total_steps:
            if processes.from_main(stop.is_set() or (budget_s is not None and state.elapsed() >= budget_s)):
                break  # Ctrl-C, or the budget is spent: final checkpoint (and eval and save) below
            step_start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            state.train_loss = forward_backward(step_model, batches, config.grad_accum, processes, amp_dtype)
            refuse_non_finite(state.train_loss, state, lr, out_dir)
            apply_gradients(loss_model, optimizer, config.grad_clip)
            scheduler.step()
            if r.average is not None:
                update(r.average, loss_model.model)
            state.step += 1
            state.tokens_seen += tokens_per_step
            tokens_per_s = tokens_per_step / (time.perf_counter() - step_start)
            metrics.log({"step": state.step, "train_loss": state.train_loss, "lr": lr, "tokens_per_s": tokens_per_s})
            bar.update(state.step, state.total_steps, state.budget_fitted or budget_s is None, state.elapsed(),
                       loss=f"{state.train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if eval_due(state.step, state.total_steps, config.eval_every) and state.step < state.total_steps:
                last_eval = state.step, evaluate_and_log(eval_model, r.val, config.batch_size, amp_dtype, processes,
                                                         metrics, state, r.best)
            if refit_due(state, config.eval_every, budget_s):
                scheduler = refit_schedule(state, optimizer, scheduler, config, budget_s, processes)
                if by_rules:  # the step count the rules go by is the latest fit's, not the first 10 steps' guess
                    config = choose_by_epochs(config, by_rules, optimizer, state.total_steps,
                                              r.train_tokens, tokens_per_step, processes.is_main,
                                              r.train_tokens_counted_all)
            if state.step % config.checkpoint_every == 0 and state.step < state.total_steps:
                checkpoint(out_dir, loss_model, optimizer, scheduler, state, config, r.stream, processes, r.best,
                           r.average)
        if not stop.is_set():
            bar.finish()
    r.stream.close()

    elapsed = state.elapsed()
    if state.last_checkpoint_step != state.step:  # saved before the final eval: a failing eval loses no step
        checkpoint(out_dir, loss_model, optimizer, scheduler, state, config, r.stream, processes, r.best, r.average)
    if stop.is_set():
        raise TrainFailed(f"interrupted by Ctrl-C at step {state.step}; its checkpoint is in "
                          f"{out_dir / CHECKPOINT_DIR}. Continue with: {resume_command(config.output_dir)}")
    if last_eval is None or last_eval[0] != state.step:  # the last weights' eval (once: a budget may stop at an eval)
        last_eval = state.step, evaluate_and_log(eval_model, r.val, config.batch_size, amp_dtype, processes, metrics,
                                                 state, r.best)
    result = keep_the_best(r.best, r.average, loss_model, last_eval[1], out_dir, state.step)
    final = finish(output, loss_model, config, state, result, elapsed, processes, metrics)
    processes.barrier()
    return final


def keep_the_best(best: BestModel | None, average, loss_model, last: dict, out_dir: Path, step: int) -> dict:
    """The eval of the model to save: the best's, whose weights go back into the model (the last eval's with
    --no-keep-best, and on ranks other than 0, which write nothing). Its step and the last weights' val loss are
    recorded beside it. The final eval's weights can be the best: the last checkpoint's best file is rewritten.
    With a moving average, every eval was the average's: the last one's weights are the average now."""
    if best is None:
        if average is not None:
            loss_model.model.load_state_dict(average.module.state_dict())
        return last
    best.save(out_dir, step)  # what --resume with a larger --max-steps continues from
    if best.step != step or average is not None:
        best.load_into(loss_model.model)
    return {**best.result, "best_step": best.step, "last_val_loss": last["val_loss"],
            "last_val_bits_per_char": last["val_bits_per_char"]}


def finish(output: OutputDir, loss_model, config: TrainingConfig, state: RunState, result: dict, elapsed: float,
           processes, metrics) -> dict:
    """The final record; rank 0 logs it and writes the model directory (the full-vocabulary model)."""
    vocab = loss_model.vocab
    model = loss_model.model if vocab is None else vocab.expand(loss_model.model, config.model_config())
    final = {
        "final": True, "step": state.step, "train_loss": state.train_loss, **result,
        "tokens_seen": state.tokens_seen, "elapsed_s": elapsed,
        "tokens_per_s": (state.tokens_seen / elapsed) if elapsed else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "world_size": processes.world_size, "device": str(processes.device),
        "n_params": sum(p.numel() for p in model.parameters()),
        **({"ema_decay": config.ema_decay} if config.ema_decay else {}),  # the weights are a moving average
    }
    if processes.is_main:
        metrics.log(final)
        metrics.close()  # the trackers' files complete before they are carried into the model dir
        write_output_dir(output, model, config, final)
        weights = "the weights' moving average" if config.ema_decay else "the weights"
        saved = (f"{weights} of the best eval, step {final['best_step']} (the last step's val loss "
                 f"{final['last_val_loss']:.4f})" if "best_step" in final else f"{weights} of the last step")
        print(f"final: step {state.step}, val loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}, "
              f"bits/char {final['val_bits_per_char']:.4f}; wrote {config.output_dir}: {saved}", file=sys.stderr,
              flush=True)
    return final


# ----------------------------------------------------------------------------------------------------------------
# The model directory


def write_output_dir(output: OutputDir, model, config: TrainingConfig, final: dict) -> None:
    """Atomically replace the output dir by the complete model dir (+ metrics, config, plot, card, latest checkpoint);
    what else the user keeps in it stays."""
    records = read_metrics(output.path / "metrics.jsonl")
    checkpoint_dir = latest_checkpoint(output.path)
    with output.write() as tmp, progress.bar(total=4, desc="save", unit="part") as save_bar:
        with progress.quiet_library_bars():  # "Writing model shards": the save bar is ours
            write_model_files(model, tmp)
        save_bar.update()
        with open(tmp / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        config.save(tmp)
        if (output.path / RUNS_DIR).is_dir():  # TensorBoard's event files: push_to_hub.py uploads them
            shutil.copytree(output.path / RUNS_DIR, tmp / RUNS_DIR, copy_function=_link_or_copy)
        save_bar.update()
        plot_loss_curve(records, tmp / "loss_curve.png")
        save_bar.update()
        model_card.training_card(model.config.to_dict(), config, final).save(str(tmp / "README.md"))
        save_bar.update()
        if checkpoint_dir is not None:  # kept for --resume with a larger --max-steps; hard links cost no space
            shutil.copytree(checkpoint_dir, tmp / CHECKPOINT_DIR / checkpoint_dir.name, copy_function=_link_or_copy)
            best = best_path(output.path, int(checkpoint_dir.name.split("-")[1]))
            if best.is_file():
                _link_or_copy(best, tmp / CHECKPOINT_DIR / best.name)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
