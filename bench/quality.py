"""Validation bits/char that `train.py --preset tiny` reaches on tiny Shakespeare in a fixed wall-clock budget.

    flock -x /tmp/toygpt-cpu.lock python bench/quality.py [--time-budget-min 10] [--input FILE] [--output-dir DIR]
                                                          [--target-bpc X] [train.py flags ...]

Runs train.py in a subprocess (so its peak RSS is its own), every eval over the whole held-out split (so each one
measures what the final eval does), then reads its metrics.jsonl and prints val loss, perplexity, bits per
character, peak RSS, training tokens/s, steps, the bits/char against the 2.20 target, the wall-clock minute at which
validation first reached --target-bpc (if given), and 300 characters sampled from the model (top-k 50, seed 0).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET_BITS_PER_CHAR = 2.20
EVERY_WINDOW = 10_000  # --eval-batches: more than the split holds, so each eval reads all of it
SAMPLE_CHARS = 300


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--time-budget-min", type=float, default=10.0, help="train.py's wall-clock budget (default 10)")
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT, help=f"text file (default: {DEFAULT_INPUT})")
    p.add_argument("--output-dir", type=Path, help="keep the trained model here (default: a temp dir, removed)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--target-bpc", type=float, help="report the wall-clock minute validation first reached this")
    args, extra = p.parse_known_args(argv)  # anything else goes to train.py as is (e.g. --dtype bfloat16)
    if not args.input.is_file():
        p.error(f"{args.input} not found: put tiny Shakespeare there (char-rnn's data/tinyshakespeare/input.txt) "
                "or pass --input FILE.")

    with tempfile.TemporaryDirectory(prefix="toygpt-quality-") as tmp:
        out = args.output_dir or Path(tmp) / "model"
        cmd = [sys.executable, str(REPO / "train.py"), "--preset", args.preset, "--time-budget-min",
               str(args.time_budget_min), "--input", str(args.input), "--output-dir", str(out), "--overwrite",
               "--eval-batches", str(EVERY_WINDOW), *extra]
        print("$ " + " ".join(cmd), flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=REPO).returncode
        wall = time.perf_counter() - start
        if code != 0:
            print(f"quality.py: train.py exited with {code}", file=sys.stderr)
            return code
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        sample = sample_text(out)
    final = next(r for r in reversed(records) if r.get("final"))
    # ru_maxrss of waited-for children (KiB on Linux); train.py's own record is the same process's figure.
    rss_mb = final.get("peak_rss_mb") or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    bpc = final["val_bits_per_char"]
    print(f"preset {args.preset}, budget {args.time_budget_min:g} min, {final['n_params'] / 1e6:.1f}M params, "
          f"input {args.input}")
    print(f"val loss        {final['val_loss']:.4f} nats/token ({final['val_tokens']:,} val tokens)")
    print(f"perplexity      {final['val_perplexity']:.2f}")
    print(f"bits per char   {bpc:.4f}")
    print(f"peak RSS        {rss_mb:,.0f} MB")
    print(f"tokens/s        {final['tokens_per_s']:,.0f} (training, {final['tokens_seen']:,} tokens)")
    print(f"steps           {final['step']} in {final['elapsed_s']:.0f} s of training ({wall:.0f} s wall in all)")
    print(f"bits/char / target {TARGET_BITS_PER_CHAR}: {bpc / TARGET_BITS_PER_CHAR:.3f}x "
          f"({'met' if bpc <= TARGET_BITS_PER_CHAR else 'not met'})")
    if args.target_bpc is not None:
        reached = [r for r in records if "val_bits_per_char" in r and r["val_bits_per_char"] <= args.target_bpc]
        when = (f"at minute {reached[0]['elapsed_s'] / 60:.2f} of training (step {reached[0]['step']})" if reached
                else "never")
        print(f"reached {args.target_bpc} bits/char {when}")
    print(f"\n{SAMPLE_CHARS} characters sampled (top-k 50, seed 0, prompt \"\\n\"):\n{sample}")
    return 0


def sample_text(model_dir: Path) -> str:
    """SAMPLE_CHARS characters the trained model writes after a newline, top-k 50 sampling, seed 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    torch.manual_seed(0)
    ids = tokenizer("\n", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, top_k=50, max_new_tokens=model.config.block_size - ids.shape[1],
                             pad_token_id=tokenizer.eos_token_id)  # a context's worth of tokens: > 300 characters
    return tokenizer.decode(out[0, ids.shape[1]:])[:SAMPLE_CHARS]


if __name__ == "__main__":
    sys.exit(main())
