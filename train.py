"""Train ToyGPT on a text file (or files, or a dataset) and write a complete, loadable model directory.

    python train.py --preset tiny --time-budget-min 10 --input input.txt --output-dir out/toygpt
    torchrun --standalone --nproc_per_node 2 train.py --preset tiny --max-steps 500   # DistributedDataParallel

The command line only: its flags become a toygpt.train_config.TrainingConfig (same names), toygpt/training.py runs
it (checks first, in train_config.prepare), and errors become `train.py: error: ...` with exit status 2 (bad input)
or 1 (a failure at run time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from configuration_toygpt import PRESETS
from toygpt import sources
from toygpt.checkpoint import CHECKPOINT_DIR, CheckpointError
from toygpt.corpus_vocab import VOCAB_MODES
from toygpt.model_dir import OutputDirError
from toygpt.optim import OPTIMIZERS, SCHEDULES
from toygpt.text_files import InputError
from toygpt.train_config import TrainError, TrainingConfig
from toygpt.training import TrainFailed, resume_command, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
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
    add("--eval-every", type=int, help="optimizer steps between evals (half that in the last 30%% of the steps, "
        "where the learning rate decays)")
    add("--eval-batches", type=int, help="validation batches per eval: every eval, the best and the final figures read "
        "the first eval-batches x batch-size held-out windows (default: the whole held-out split, up to 1M tokens)")
    add("--keep-best", action=argparse.BooleanOptionalAction, default=None, help="write the weights of the eval with "
        "the lowest val loss as the model, not the last step's (default: on; kept on the CPU and beside checkpoints)")
    add("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    add("--seed", type=int, default=None, help="makes CPU runs reproducible (default 1337)")
    add("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
        help="autocast dtype; auto = bfloat16 on CUDA, float32 elsewhere")
    add("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    add("--overwrite", action="store_true", help="replace an existing --output-dir")
    add("--resume", action="store_true", help="continue from --output-dir/checkpoint (flags given override)")
    return p


def main(argv=None) -> int:
    config = TrainingConfig(**vars(build_parser().parse_args(argv)))
    try:
        train(config)
    except (TrainError, InputError, CheckpointError, OutputDirError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except TrainFailed as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, permissions, ...: what failed, not a traceback
        print(f"train.py: error: {err.strerror or err} ({err.filename or 'while training'}); the last checkpoint, if "
              f"any, is in {Path(config.output_dir) / CHECKPOINT_DIR}: fix the cause and "
              f"{resume_command(config.output_dir)}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
