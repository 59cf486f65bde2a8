"""train.py's command line, and every check of it that comes before any work.

`prepare(args)` claims --output-dir (model_dir.OutputDir: lock, finish an interrupted save, never the user's files),
resolves every flag (the preset's training defaults; on --resume the checkpoint's arguments, refusing flags that
would change the run), checks the device, the training data (sources.resolve_source) and --init-from, and returns what
the run needs. Everything that can be wrong with a command line is reported from here, as a TrainError.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

import torch

from toygpt import sources
from toygpt import init_from
from toygpt.checkpoint import CHECKPOINT_DIR, latest_checkpoint, read_trainer_state
from configuration_toygpt import PRESETS, ToyGPTConfig
from toygpt.corpus_vocab import VOCAB_MODES
from toygpt.model_dir import OutputDir
from toygpt.optim import OPTIMIZERS, SCHEDULES

# Training defaults per preset (the architecture lives in configuration_toygpt.PRESETS); every one has a flag.
TRAINING_DEFAULTS = {
    # tiny: tuned for minutes on 2 CPU cores (bench/quality.py probes, README), where the run is step-bound: small
    # batches (1024 tokens) give more optimizer steps; Muon for the matrices with warmup-stable-decay, and the tied
    # embedding at twice their learning rate, learned most per minute. The final eval (4 x eval_batches x batch_size
    # windows) covers the whole tiny Shakespeare validation split while each periodic eval stays a few seconds;
    # max_steps only bounds a --time-budget-min run.
    "tiny": dict(
        batch_size=4, grad_accum=1, optimizer="muon", schedule="wsd", lr=4e-3, embedding_lr=8e-3, min_lr=4e-4,
        warmup_steps=20, max_steps=20000, weight_decay=0.1, grad_clip=1.0, eval_every=100, eval_batches=9,
        checkpoint_every=200,
    ),
    "gpt2": dict(
        batch_size=16, grad_accum=32, optimizer="adamw", schedule="cosine", lr=6e-4, embedding_lr=None, min_lr=6e-5,
        warmup_steps=700, max_steps=20000, weight_decay=0.1, grad_clip=1.0, eval_every=500, eval_batches=40,
        checkpoint_every=1000,
    ),
}
# --init-from: a pretrained model is fine-tuned gently (nanoGPT's finetune_shakespeare: a small, decaying lr), with
# AdamW for every weight (Muon's learning rates above are for training from scratch).
FINE_TUNING_DEFAULTS = dict(optimizer="adamw", schedule="cosine", lr=6e-5, embedding_lr=None, min_lr=6e-6)
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
FLOAT_FLAGS = ("lr", "embedding_lr", "min_lr", "weight_decay", "grad_clip", "dropout", "time_budget_min")
# What --resume cannot change: the shapes of the checkpoint's tensors, and the data stream it continues.
RESUME_FIXED_FLAGS = ("preset", "n_layer", "n_head", "n_embd", "block_size", "seed", "input", "dataset",
                      "dataset_config", "split", "text_column", "vocab", "init_from", "init_revision")
# Recorded per run (training_args.json), recomputed on --resume rather than taken from the checkpoint.
DATA_RECORDS = ("input_path", "input_sha256", "data_description", "data_source", "data_fingerprint")


class TrainError(ValueError):
    """A bad command line or output directory, reported before any work starts."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments and everything checked before any work


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--input", help="training text: a UTF-8 text file, a directory or quoted glob of text files, or a directory of "
        f"parquet/jsonl/csv/arrow files (default: {sources.DEFAULT_INPUT} if present, else the default corpus)")
    add("--dataset", help="a Hub dataset to stream instead of --input, as owner/name (HF_ENDPOINT, HF_TOKEN respected)")
    add("--dataset-config", help="the dataset's config (subset), if it has several")
    add("--split", help="dataset split to train on (default: train); held out: its 'validation' split, else a fixed "
        "tenth of its rows")
    add("--text-column", help="dataset column holding the text (default: text)")
    add("--output-dir", default="out/toygpt", help="model directory to write (default: out/toygpt)")
    add("--preset", choices=sorted(PRESETS), help="architecture + training defaults (default: tiny)")
    add("--init-from", metavar="ID_OR_DIR", help="start from a checkpoint instead of random weights: a Hub repo id "
        "(openai-community/gpt2 or a larger sibling), a GPT2LMHeadModel dir or a ToyGPT dir; the architecture comes "
        "from it (--block-size may crop its context; --dropout is free; the preset gives training defaults only)")
    add("--init-revision", help="with a Hub --init-from: the branch, tag or commit to start from (default: main)")
    # Architecture (None: the preset's value; on --resume the checkpoint's).
    add("--n-layer", type=int)
    add("--n-head", type=int)
    add("--n-embd", type=int)
    add("--block-size", type=int, help="context length in tokens")
    add("--dropout", type=float)
    # Optimisation.
    add("--batch-size", type=int, help="windows per micro-batch, per process")
    add("--grad-accum", type=int, help="micro-batches per optimizer step")
    add("--vocab", choices=VOCAB_MODES, help="train the rows of the token ids the training split uses plus one shared row "
        "(corpus; exact, faster), all 50257 (full), or auto: corpus when it uses under half of them (default)")
    add("--optimizer", choices=OPTIMIZERS, help="adamw, or muon for the blocks' matrices (AdamW for the rest)")
    add("--schedule", choices=SCHEDULES, help="warmup + cosine decay, or warmup-stable-decay (wsd)")
    add("--lr", type=float, help="peak learning rate")
    add("--embedding-lr", type=float, help="peak learning rate of the tied token embedding / head (default: --lr)")
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
        **(FINE_TUNING_DEFAULTS if resolved.get("init_from") else {}),
        "seed": 1337, "device": "auto", "dtype": "auto", "compile": False, "input": None, "time_budget_min": None,
        "dataset": None, "dataset_config": None, "split": "train", "text_column": "text", "vocab": "auto",
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
    if args.embedding_lr is None:
        args.embedding_lr = args.lr
    for name in ("lr", "embedding_lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps"):
        if getattr(args, name) < 0:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if args.min_lr > args.lr:
        raise TrainError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr}).")
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        raise TrainError(f"--time-budget-min must be positive, got {args.time_budget_min}.")
    return args


def model_config(args) -> ToyGPTConfig:
    flags = {k: getattr(args, k) for k in MODEL_FLAGS}
    try:
        if getattr(args, "init_config", None):  # --init-from: the checkpoint's config (recorded), with these flags
            return ToyGPTConfig(**{**args.init_config, **flags})
        return ToyGPTConfig.from_preset(args.preset, **flags)
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


def find_start(args: argparse.Namespace) -> init_from.InitModel:
    """--init-from: find the checkpoint (its config.json only: a wrong id or an unreachable Hub fails here, fast), take
    the architecture from it and record where it came from; flags that contradict it are refused, named."""
    if args.vocab == "corpus":
        raise TrainError("--vocab corpus is exact only from random weights (every never-seen token row equal); with "
                         "--init-from drop --vocab (or pass --vocab full).")
    try:
        start = init_from.find_init_model(args.init_from, args.init_revision)
    except init_from.InitFromError as err:
        raise TrainError(f"--init-from: {err}") from None
    conflicts = init_from.architecture_conflicts(start.config, args.n_layer, args.n_head, args.n_embd, args.block_size)
    if conflicts:
        raise TrainError(f"--init-from {args.init_from} fixes the architecture, which these flags contradict: "
                         f"{'; '.join(conflicts)}. Drop them (a --block-size up to the checkpoint's is fine).")
    c = start.config
    args.n_layer, args.n_head, args.n_embd = c.n_layer, c.n_head, c.n_embd
    args.block_size = args.block_size or c.block_size
    args.dropout = c.dropout if args.dropout is None else args.dropout
    args.vocab = "full"  # the checkpoint's never-seen rows differ: only the full vocabulary is exact
    vars(args).update(start.record())
    return start


def prepare(args: argparse.Namespace):
    """Claim --output-dir (lock, finish an interrupted save), resolve every flag (from the checkpoint on --resume) and
    check flags, data and output: everything that can be wrong is reported here, before any work.

    Returns the resolved args (with the data records of DATA_RECORDS), the checked data source, the checkpoint to
    resume from or None, the --init-from model (fp32, loaded) or None, and the claimed output dir (locked on rank 0
    until it is closed)."""
    given_input = args.input or (sources.DEFAULT_INPUT if sources.DEFAULT_INPUT.is_file() else None)
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
            saved = read_trainer_state(resume_from)["args"]
            check_resume_flags(args, saved)
        # --init-from: its architecture before the preset fills the rest; on --resume the checkpoint holds the weights
        start = find_start(args) if args.init_from is not None and not args.resume else None
        args = resolve_args(args, {k: v for k, v in saved.items() if k not in ("resume", "overwrite", *DATA_RECORDS)}
                            if args.resume else None)
        model_config(args)
        check_device(args.device)
        source, args.data_description = sources.resolve_source(
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
        # The weights last, once every cheaper check has passed: a download, and a damaged file shows only here.
        init_model = None
        if start is not None:
            try:
                init_model = start.load(args.block_size, args.dropout)
            except init_from.InitFromError as err:
                raise TrainError(f"--init-from: {err}") from None
    except BaseException:
        output.close()
        raise
    return args, source, resume_from, init_model, output


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
