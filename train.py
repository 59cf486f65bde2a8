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
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import data
from configuration_toygpt import PRESETS, ToyGPTConfig
from model_dir import atomic_dir, write_model_files
from modeling_toygpt import ToyGPTForCausalLM

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
CHECKPOINT_DIR = "checkpoint"
BATCH_HASH_ENV = "TOYGPT_LOG_BATCH_HASH"  # debug: each rank prints a hash of its first batch (DDP test)


class TrainError(ValueError):
    """A bad command line or output directory, reported before any work starts."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments


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


# ----------------------------------------------------------------------------------------------------------------
# Device, distributed, optimizer, schedule


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


def init_distributed(device_arg: str):
    """(rank, world_size, device): torchrun's env when present (NCCL on GPUs, gloo on CPU), else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def autocast_dtype(dtype_arg: str, device: torch.device):
    """The autocast dtype, or None for plain float32 (master weights are float32 either way)."""
    if dtype_arg == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if dtype_arg == "bfloat16" else None


def build_optimizer(model, args, device) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95), decaying matrices (dim >= 2) only; fused kernels where the device has them."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied lm_head/wte weight appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    fused = device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def build_scheduler(optimizer, args, total_steps: int, step: int = 0):
    """Linear warmup to --lr, cosine decay to --min-lr at total_steps; positioned at `step` (for refits/resume)."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=max(total_steps, args.warmup_steps + 1),
        min_lr=args.min_lr,
        last_epoch=step - 1,
    )


def fit_total_steps(step: int, steps_timed: int, seconds_timed: float, seconds_left: float, max_steps: int) -> int:
    """Total optimizer steps that end the schedule when the budget runs out, at the average pace timed so far."""
    seconds_per_step = seconds_timed / max(steps_timed, 1)
    return max(step + 1, min(max_steps, step + int(max(seconds_left, 0.0) / seconds_per_step)))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for every tensor, JSON for the rest; written to a temp dir and renamed into place.


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted((out_dir / CHECKPOINT_DIR).glob("step-*")) if (out_dir / CHECKPOINT_DIR).is_dir() else []
    complete = [d for d in steps if (d / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def optimizer_to_files(optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors = {f"{idx}.{key}": value.detach().cpu().contiguous()
               for idx, per_param in state["state"].items() for key, value in per_param.items()}
    save_file(tensors, directory / "optimizer.safetensors")
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}, indent=1))


def optimizer_from_files(optimizer, directory: Path) -> None:
    per_param: dict[int, dict] = {}
    for name, tensor in load_file(directory / "optimizer.safetensors").items():
        idx, key = name.split(".", 1)
        per_param.setdefault(int(idx), {})[key] = tensor
    param_groups = json.loads((directory / "optimizer.json").read_text())["param_groups"]
    for group in param_groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, trainer_state: dict, rank_states: list[dict],
                    rank_rngs: list[dict]) -> Path:
    """Write OUTPUT/checkpoint/step-N atomically (temp + rename); older checkpoints go once it is in place."""
    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # what a run killed mid-write or mid-delete left
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{trainer_state['step']:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
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


def load_checkpoint(directory: Path, model, optimizer, rank: int, world_size: int) -> dict:
    """Restore weights and optimizer in place; return trainer_state (the RNG is restored by restore_rng)."""
    state = json.loads((directory / "trainer_state.json").read_text())
    if len(state["ranks"]) != world_size:
        raise TrainError(
            f"{directory} was written by {len(state['ranks'])} process(es); resume it with the same number "
            f"(this run has {world_size})."
        )
    load_model(model, str(directory / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer_from_files(optimizer, directory)
    state["rank_state"] = state["ranks"][rank]
    state["rank_rng"] = {key.split(".", 1)[1]: value for key, value in load_file(directory / "rng.safetensors").items()
                         if key.split(".", 1)[0] == str(rank)}
    return state


def restore_rng(rng: dict, python_state: list) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def gather(obj, world_size: int) -> list:
    """Every rank's `obj`, in rank order (rank 0 writes checkpoints holding all ranks' stream positions)."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


# ----------------------------------------------------------------------------------------------------------------
# Evaluation, metrics, plot, model card


@torch.no_grad()
def evaluate(model, val, batch_size: int, max_batches: int | None, device, amp_dtype, rank=0, world_size=1) -> dict:
    """Mean val loss over (a prefix of) the validation windows; bits/char = loss x tokens / chars / ln 2."""
    model.eval()
    windows, chars = val.windows, val.target_chars  # (N, block_size + 1) windows; characters of their targets
    n = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    totals = torch.zeros(3, dtype=torch.float64)  # summed loss, tokens, characters
    for start in range(rank * batch_size, n, batch_size * world_size):
        batch = windows[start:min(start + batch_size, n)].to(device)
        with autocast(device, amp_dtype):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        totals += torch.tensor([loss.item(), batch[:, 1:].numel(), float(chars[start:start + len(batch)].sum())],
                               dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    loss = (totals[0] / totals[1]).item()
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_bits_per_char": (totals[0] / totals[2]).item() / math.log(2),
        "val_tokens": int(totals[1]),
    }


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a killed run is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def plot_loss_curve(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("ToyGPT training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_model_card(config: ToyGPTConfig, args, final: dict, data_description: str):
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="mit",
        tags=["toygpt", "gpt2", "causal-lm", "text-generation", "custom_code"],
    )
    n_params = final["n_params"]
    body = f"""
# ToyGPT ({args.preset} preset, {n_params / 1e6:.1f}M parameters)

A small GPT-2-style language model trained from scratch with `train.py`, packaged as a transformers remote-code
model (`trust_remote_code=True`).

## Architecture

GPT-2 decoder as nanoGPT writes it: {config.n_layer} layers, {config.n_head} heads, {config.n_embd}-dim embeddings,
context {config.block_size} tokens, learned positions, pre-LayerNorm, GELU MLP (4x), dropout {config.dropout},
LM head tied to the token embedding. Tokenizer: GPT-2 BPE ({config.vocab_size} tokens). {n_params:,} parameters.

## Training data

{data_description}. Training used the first 90% of the file by characters; validation the last 10%, never trained
on.

## Training

AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak LR {args.lr:g} with {args.warmup_steps}
warmup steps and cosine decay to {args.min_lr:g}, gradient clipping {args.grad_clip:g}, batch {args.batch_size} x
{args.grad_accum} accumulation x {final["world_size"]} process(es) of {config.block_size} tokens, seed {args.seed}.
{final["step"]} optimizer steps, {final["tokens_seen"]:,} training tokens, {final["elapsed_s"] / 60:.1f} minutes
on {final["device"]}.

## Results

| metric | value |
|---|---|
| validation loss (nats/token) | {final["val_loss"]:.4f} |
| validation perplexity | {final["val_perplexity"]:.2f} |
| validation bits per character | {final["val_bits_per_char"]:.4f} |
| final training loss | {final["train_loss"]:.4f} |

![loss curve](loss_curve.png)

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = "path/to/this/model"  # a local directory or a Hub repo id
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)  # else it asks before reading config.json
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
inputs = tokenizer("ROMEO:", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=100)  # samples with top-k 50 (generation_config.json)
print(tokenizer.decode(output[0]))
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_output_dir(out_dir: Path, model, args, final: dict, data_description: str) -> None:
    """Atomically replace out_dir by the complete model dir (+ metrics, args, plot, card, latest checkpoint)."""
    records = read_metrics(out_dir / "metrics.jsonl")
    checkpoint = latest_checkpoint(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_model_files(model, tmp)
        with open(tmp / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        (tmp / "training_args.json").write_text(json.dumps(vars(args), indent=2))
        plot_loss_curve(records, tmp / "loss_curve.png")
        build_model_card(model.config, args, final, data_description).save(str(tmp / "README.md"))
        if checkpoint is not None:  # kept for --resume with a larger --max-steps; hard links cost no space
            target = tmp / CHECKPOINT_DIR / checkpoint.name
            shutil.copytree(checkpoint, target, copy_function=_link_or_copy)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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


# ----------------------------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by build_parser()'s namespace; return the final metrics (rank 0's view)."""
    out_dir = Path(args.output_dir)
    checkpoint_dir = None
    if args.resume:
        checkpoint_dir = prepare_output_dir(out_dir, resume=True, overwrite=args.overwrite)
        saved = json.loads((checkpoint_dir / "trainer_state.json").read_text())["args"]
        args = resolve_args(args, {k: v for k, v in saved.items() if k not in ("resume", "overwrite")})
    else:
        args = resolve_args(args)
    config = model_config(args)
    check_device(args.device)
    # Everything that can be wrong with the input or output is reported here, before any work.
    input_path, data_description = data.resolve_input(args.input, args.block_size)
    args.input_path = str(input_path.resolve())  # recorded in training_args.json: quantize.py evaluates on it
    if not args.resume:
        prepare_output_dir(out_dir, resume=False, overwrite=args.overwrite)

    rank, world_size, device = init_distributed(args.device)
    is_main = rank == 0
    amp_dtype = autocast_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if is_main:
        print(f"data: {data_description}", file=sys.stderr, flush=True)
        if not args.resume and out_dir.exists():
            # --overwrite (checked above): drop the old run's checkpoints and metrics, but keep its model files
            # until the new model directory is complete and swapped in atomically at the end.
            shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
    if world_size > 1:
        dist.barrier()

    torch.manual_seed(args.seed)  # same initial weights on every rank
    random.seed(args.seed)
    model = ToyGPTForCausalLM(config).to(device)
    model.train()
    optimizer = build_optimizer(model, args, device)
    stream = data.TrainWindows(input_path, args.block_size, seed=args.seed, rank=rank, world_size=world_size)
    val = data.val_windows(input_path, args.block_size,
                           max_windows=FINAL_EVAL_BATCHES * args.eval_batches * args.batch_size)

    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    step, elapsed_before, tokens_seen = 0, 0.0, 0
    total_steps = args.max_steps
    if checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, model, optimizer, rank, world_size)
        step, total_steps = state["step"], state["total_steps"]
        elapsed_before, tokens_seen = state["elapsed_s"], state["tokens_seen"]
        if not state["budget_fitted"] or args.max_steps != state["args"]["max_steps"]:
            total_steps = args.max_steps  # a new --max-steps extends (or cuts) the schedule
        stream.load_state_dict(state["rank_state"]["stream"])
        scheduler = build_scheduler(optimizer, args, total_steps, step)
        if total_steps == state["total_steps"]:
            scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rank_rng"], state["rank_state"]["python_random"])
        if is_main:
            print(f"resumed from {checkpoint_dir} at step {step}", file=sys.stderr, flush=True)
        budget_fitted = state["budget_fitted"]
    else:
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        scheduler = build_scheduler(optimizer, args, total_steps)
        budget_fitted = False
    metrics_path = out_dir / "metrics.jsonl"
    if is_main:  # drop records a killed run wrote after its last checkpoint
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= step and not r.get("final")]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    eval_model = model  # not DDP-wrapped: eval batches differ per rank and need no gradient sync
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def log(record):
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(elapsed):
        trainer_state = {"step": step, "total_steps": total_steps, "budget_fitted": budget_fitted,
                         "elapsed_s": elapsed, "tokens_seen": tokens_seen, "args": vars(args)}
        rank_state = {"stream": stream.state_dict(), "python_random": list(random.getstate())}
        rank_states, rank_rngs = gather(rank_state, world_size), gather(rng_state(), world_size)
        if is_main:
            save_checkpoint(out_dir, raw_model, optimizer, scheduler, trainer_state, rank_states, rank_rngs)
        if world_size > 1:
            dist.barrier()

    def run_eval(max_batches):
        result = evaluate(eval_model, val, args.batch_size, max_batches, device, amp_dtype, rank, world_size)
        log({"step": step, **result})
        return result

    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world_size
    batches = stream.batches(args.batch_size)
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    start, start_step = time.perf_counter(), step
    train_loss, val_result = float("nan"), None
    last_checkpoint_step = step
    while step < total_steps:
        elapsed = elapsed_before + time.perf_counter() - start
        if budget_s is not None and agree(elapsed >= budget_s, world_size):
            break  # budget spent: final eval and save below
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            batch = next(batches)
            if step == 0 and micro == 0 and os.environ.get(BATCH_HASH_ENV):
                digest = hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]
                print(f"rank {rank} first batch sha256 {digest}", file=sys.stderr, flush=True)
            batch = batch.to(device, non_blocking=True)
            last_micro = micro == args.grad_accum - 1
            # Gradients are all-reduced on the last micro-batch only.
            sync = contextlib.nullcontext() if last_micro or world_size == 1 else model.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    # shift_labels: every window position has its target (no token lost to the usual shift); in
                    # training the model fuses lm_head and the cross-entropy (fp32) in chunks, never building logits.
                    loss = model(input_ids=batch[:, :-1], shift_labels=batch[:, 1:], use_cache=False).loss
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        train_loss = loss_sum.item() / args.grad_accum
        step_s = time.perf_counter() - step_start
        log({"step": step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tokens_per_step / step_s})
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / step_s:,.0f}")

        if step % args.eval_every == 0 and step < total_steps:
            val_result = run_eval(args.eval_batches)
            if is_main:
                tqdm.write(f"step {step}: val loss {val_result['val_loss']:.4f}, "
                           f"ppl {val_result['val_perplexity']:.1f}, bits/char {val_result['val_bits_per_char']:.4f}",
                           file=sys.stderr)
        fit_now = budget_s is not None and (step == FIT_STEPS or (budget_fitted and step % args.eval_every == 0))
        if fit_now:
            run_s = time.perf_counter() - start
            fitted = fit_total_steps(step, step - start_step, run_s, budget_s - elapsed_before - run_s, args.max_steps)
            fitted = agree_int(fitted, world_size)
            if fitted != total_steps:
                total_steps = fitted
                scheduler = build_scheduler(optimizer, args, total_steps, step)
                bar.total = total_steps
                bar.refresh()
            budget_fitted = True
        if step % args.checkpoint_every == 0 and step < total_steps:
            checkpoint(elapsed_before + time.perf_counter() - start)
            last_checkpoint_step = step
    bar.close()
    stream.close()

    elapsed = elapsed_before + time.perf_counter() - start
    val_result = run_eval(FINAL_EVAL_BATCHES * args.eval_batches)
    if last_checkpoint_step != step:
        checkpoint(elapsed)
    final = {
        "final": True, "step": step, "train_loss": train_loss, **val_result, "tokens_seen": tokens_seen,
        "elapsed_s": elapsed, "tokens_per_s": (tokens_seen / elapsed) if elapsed else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "world_size": world_size,
        "device": str(device), "n_params": sum(p.numel() for p in raw_model.parameters()),
    }
    if is_main:
        log(final)
        write_output_dir(out_dir, raw_model, args, final, data_description)
        print(f"final: step {step}, val loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}, "
              f"bits/char {final['val_bits_per_char']:.4f}; wrote {out_dir}", file=sys.stderr, flush=True)
    if world_size > 1:
        dist.barrier()
    return final


def agree(flag: bool, world_size: int) -> bool:
    """Rank 0's decision on every rank (wall clocks differ slightly between processes)."""
    if world_size == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def agree_int(value: int, world_size: int) -> int:
    if world_size == 1:
        return value
    t = torch.tensor([value])
    dist.broadcast(t, 0)
    return int(t.item())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (TrainError, data.InputError, FileExistsError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
