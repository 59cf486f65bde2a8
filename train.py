"""Train ToyGPT on a text file (or files, or a dataset) and write a complete, loadable model directory.

The command line only: its flags become a toygpt.train_config.TrainingConfig (same names), toygpt/training.py runs
it (checks first, in train_config.prepare), and errors (toygpt.errors.ToyGPTError) become `train.py: error: ...` with
their exit status: 2 for bad input, 1 for a failure at run time. Building the parser imports neither torch nor
transformers (toygpt/defaults.py holds what it shows), so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from toygpt.defaults import (DEFAULT_INPUT, FINE_TUNING_DEFAULTS, OPTIMIZERS, PRESETS, RUN_DEFAULTS, SCHEDULES,
                             TRAINING_DEFAULTS, VOCAB_MODES)
from toygpt.errors import ToyGPTError
from toygpt.tracking import REPORT_TO

DESCRIPTION = "Train a ToyGPT language model from scratch (or from a GPT-2 checkpoint) and write a model directory."
EPILOG = """examples:
  python train.py --input input.txt --preset tiny --time-budget-min 10 --output-dir out/toygpt
  python train.py --output-dir out/toygpt --resume --max-steps 5000         # continue the last checkpoint
  python train.py --init-from openai-community/gpt2 --input input.txt       # fine-tune GPT-2
  torchrun --standalone --nproc_per_node 2 train.py --preset gpt2 --output-dir out/gpt2   # DDP (NCCL/gloo)
then: python quantize.py out/toygpt out/toygpt-int8"""


def preset_default(name: str) -> str:
    """Each preset's value of `name` (and --init-from's, where it sets one): "default: tiny 0.004, gpt2 0.0006"."""
    def show(value):
        if value is None:  # the presets' unset defaults
            return "by the epochs the run trains (README)" if name == "weight_decay" else "= --lr"
        return format(value, "g") if isinstance(value, float) else str(value)

    per_preset = {preset: show({**PRESETS[preset], **TRAINING_DEFAULTS[preset]}[name])
                  for preset in sorted(PRESETS, reverse=True)}
    values = ", ".join(f"{preset} {value}" for preset, value in per_preset.items())
    if len(set(per_preset.values())) == 1:  # every preset's: one value
        values = next(iter(per_preset.values()))
    tuned = f"; with --init-from {show(FINE_TUNING_DEFAULTS[name])}" if name in FINE_TUNING_DEFAULTS else ""
    return f"default: {values}{tuned}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--input", help="training text: a UTF-8 text file, a directory or quoted glob of text files, or a directory of "
        f"parquet/jsonl/csv/arrow files (default: {DEFAULT_INPUT} if present, else the default corpus)")
    add("--dataset", help="a Hub dataset to stream instead of --input, as owner/name (HF_ENDPOINT, HF_TOKEN respected)")
    add("--dataset-config", help="the dataset's config (subset), if it has several")
    add("--split", help=f"dataset split to train on (default: {RUN_DEFAULTS['split']}); held out: its 'validation' split, else a fixed "
        "tenth of its rows")
    add("--text-column", help=f"dataset column holding the text (default: {RUN_DEFAULTS['text_column']})")
    add("--output-dir", default="out/toygpt", help="model directory to write (default: out/toygpt)")
    add("--preset", choices=sorted(PRESETS), help="architecture + training defaults: tiny trains in minutes on a CPU, gpt2 is GPT-2 small "
        "(124M) (default: tiny)")
    add("--init-from", metavar="ID_OR_DIR", help="start from a checkpoint instead of random weights: a Hub repo id "
        "(openai-community/gpt2 or a larger sibling), a GPT2LMHeadModel dir or a ToyGPT dir; the architecture comes "
        "from it (--block-size may crop its context; --dropout is free; the preset gives training defaults only)")
    add("--init-revision", help="with a Hub --init-from: the branch, tag or commit to start from (default: main)")
    # Architecture (None: the preset's value; on --resume the checkpoint's).
    add("--n-layer", type=int, help=f"transformer blocks ({preset_default('n_layer')})")
    add("--n-head", type=int, help=f"attention heads ({preset_default('n_head')})")
    add("--n-embd", type=int, help=f"embedding width ({preset_default('n_embd')})")
    add("--block-size", type=int, help=f"context length in tokens ({preset_default('block_size')})")
    add("--dropout", type=float, help=f"dropout probability ({preset_default('dropout')})")
    # Optimisation.
    add("--batch-size", type=int, help=f"windows per micro-batch, per process ({preset_default('batch_size')})")
    add("--grad-accum", type=int, help=f"micro-batches per optimizer step ({preset_default('grad_accum')})")
    add("--vocab", choices=VOCAB_MODES, help="train the rows of the token ids the training split uses plus one shared row "
        f"(corpus; exact, faster), all 50257 (full), or auto: corpus when it uses under half of them (default: "
        f"{RUN_DEFAULTS['vocab']})")
    add("--optimizer", choices=OPTIMIZERS, help="adamw, or muon for the blocks' matrices (AdamW for the rest) "
        f"({preset_default('optimizer')})")
    add("--schedule", choices=SCHEDULES, help=f"warmup + cosine decay, or warmup-stable-decay (wsd) ({preset_default('schedule')})")
    add("--lr", type=float, help=f"peak learning rate ({preset_default('lr')})")
    add("--embedding-lr", type=float, help="peak learning rate of the tied token embedding / head "
        f"({preset_default('embedding_lr')})")
    add("--min-lr", type=float, help=f"learning rate at the end of the decay ({preset_default('min_lr')})")
    add("--warmup-steps", type=int, help=f"linear warmup steps ({preset_default('warmup_steps')})")
    add("--max-steps", type=int, help="optimizer steps (with --time-budget-min: an upper bound) "
        f"({preset_default('max_steps')})")
    add("--time-budget-min", type=float, help="wall-clock budget in minutes; the schedule is fitted to it "
        "(default: none, --max-steps steps)")
    add("--weight-decay", type=float, help=f"weight decay on matrices and embeddings (dim >= 2), never gains/biases "
        f"({preset_default('weight_decay')})")
    add("--grad-clip", type=float, help=f"max gradient norm, 0 disables clipping ({preset_default('grad_clip')})")
    add("--eval-every", type=int, help="optimizer steps between evals, half that in the last 30%% of the steps where "
        f"the learning rate decays ({preset_default('eval_every')})")
    add("--eval-batches", type=int, help="validation batches per eval: every eval, the best and the final figures read "
        "the first eval-batches x batch-size held-out windows (default: the whole held-out split, up to 1M tokens)")
    add("--keep-best", action=argparse.BooleanOptionalAction, default=None, help="write the weights of the eval with "
        "the lowest val loss as the model, not the last step's (default: on; kept on the CPU and beside checkpoints)")
    add("--ema-decay", type=float, help="evals, the best model and the model dir use an exponential moving average of "
        "the weights, decaying at most by this per step (diffusers' EMAModel warm-up: (1+n)/(10+n) after n steps); "
        f"0: the trained weights themselves ({preset_default('ema_decay')})")
    add("--checkpoint-every", type=int, help=f"optimizer steps between checkpoints ({preset_default('checkpoint_every')})")
    add("--seed", type=int, default=None, help=f"makes CPU runs reproducible (default: {RUN_DEFAULTS['seed']})")
    add("--device", default=None, help=f"auto, cpu, cuda, cuda:N, mps (default: {RUN_DEFAULTS['device']})")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
        help=f"autocast dtype; auto = bfloat16 on CUDA, float32 elsewhere (default: {RUN_DEFAULTS['dtype']})")
    add("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: no)")
    add("--report-to", nargs="+", choices=REPORT_TO, metavar="TRACKER",
        help="also log metrics.jsonl's records to: tensorboard (event files in OUTPUT/runs, which the Hub shows), "
        "trackio (local, TRACKIO_DIR), wandb (if installed and logged in), all (every installed one), or none "
        f"(default: {' '.join(RUN_DEFAULTS['report_to'])})")
    add("--run-name", help="the trackers' name for this run (default: the output dir's name and the start time; "
        "--resume keeps the run's)")
    add("--overwrite", action="store_true", help="replace an existing --output-dir")
    add("--resume", action="store_true", help="continue from --output-dir/checkpoint (flags given override; default: "
        "start a new run)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # while starting or saving (the loop itself stops at a step and says so)
        from toygpt.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(Path(args.output_dir).resolve())
        left = (f"continue from its last checkpoint with: python train.py --output-dir {args.output_dir} --resume"
                if checkpoint else f"{args.output_dir} is as it was; run the command again")
        print(f"train.py: error: interrupted (Ctrl-C); {left}", file=sys.stderr)
        return 130


def run(args) -> int:
    import torch  # after parsing: --help and usage errors stay instant

    from toygpt import summary
    from toygpt.checkpoint import CHECKPOINT_DIR
    from toygpt.train_config import TrainingConfig
    from toygpt.training import resume_command, train

    config = TrainingConfig(**vars(args))
    try:
        final = train(config)
    except OSError as err:  # disk full, permissions, ...: what failed, not a traceback
        print(f"train.py: error: {err.strerror or err} ({err.filename or 'while training'}); the last checkpoint, if "
              f"any, is in {Path(config.output_dir) / CHECKPOINT_DIR}: fix the cause and "
              f"{resume_command(config.output_dir)}", file=sys.stderr)
        return 1
    except ToyGPTError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(summary.training_summary(config.output_dir, final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
