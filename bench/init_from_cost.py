"""What fine-tuning from GPT-2 small costs on this machine: `train.py --init-from` at each context x batch.

    flock -x /tmp/toygpt-cpu.lock python bench/init_from_cost.py [--input FILE] [--shapes 256x4,1024x1] [--steps 16]
                                                                 [--threads 2]

The cost depends on the model's shape alone, and the real GPT-2 weights cannot be downloaded offline, so a
GPT2LMHeadModel with GPT-2 small's config (124M parameters) and seeded random weights is saved to a temp dir, and
train.py starts from it as the README's recipe does (--init-from DIR, LR 6e-5 -> 6e-6, 20 warmup steps, fp32), for
--steps optimizer steps per shape, with one small eval at the end. From each run's metrics.jsonl it prints tokens/s of
the median step and over every step (the first, with its one-off costs, included), hours per million tokens at the
median, and the run's peak RSS. No targets: the README's fine-tuning section quotes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toygpt.run_log import read_metrics  # noqa: E402

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RECIPE = ["--lr", "6e-5", "--min-lr", "6e-6", "--warmup-steps", "20", "--eval-every", "1000", "--eval-batches", "1"]


def run_shape(gpt2_dir: Path, text: Path, block_size: int, batch_size: int, steps: int, threads: int,
              work: Path) -> dict:
    out = work / f"run-{block_size}x{batch_size}"
    cmd = [sys.executable, str(REPO / "train.py"), "--init-from", str(gpt2_dir), "--input", str(text),
           "--output-dir", str(out), "--block-size", str(block_size), "--batch-size", str(batch_size),
           "--max-steps", str(steps), *RECIPE]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = read_metrics(out / "metrics.jsonl")
    per_step = [r["tokens_per_s"] for r in records if "train_loss" in r and not r.get("final")]
    final = next(r for r in records if r.get("final"))
    median = statistics.median(per_step)
    return {"median": median, "all": final["tokens_per_s"], "steps": len(per_step),
            "hours_per_million": 1e6 / median / 3600, "peak_rss_gb": final["peak_rss_mb"] / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, default=SHAKESPEARE, help=f"training text (default: {SHAKESPEARE})")
    p.add_argument("--shapes", default="256x4,1024x1", help="context x batch pairs (default: 256x4,1024x1)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per shape (default 16)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.input.is_file():
        p.error(f"{args.input} not found: pass --input FILE (any UTF-8 text of a few hundred KB).")
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, GPT-2 small's shape (random weights), fp32")
    with tempfile.TemporaryDirectory(prefix="toygpt-init-from-cost-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(work / "gpt2-small-random")
        print(f"{'context x batch':>16} {'median tok/s':>13} {'all steps':>16} {'h / M tokens':>13} {'peak RSS':>9}")
        for block_size, batch_size in shapes:
            r = run_shape(work / "gpt2-small-random", args.input, block_size, batch_size, args.steps, args.threads,
                          work)
            print(f"{f'{block_size} x {batch_size}':>16} {r['median']:>13,.0f} {r['all']:>7,.0f} ({r['steps']} st.)"
                  f" {r['hours_per_million']:>13.1f} {r['peak_rss_gb']:>6.1f} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
