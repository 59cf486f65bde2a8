"""Where an int8 copy's greedy continuations leave fp32's: agreement by what is rounded, for trained model dirs.

    flock -x /tmp/toygpt-cpu.lock python bench/int8_agreement.py MODEL_DIR [MODEL_DIR ...] [--input FILE]
                                                                 [--prompts 20] [--continuation-tokens 64]

For each fp32 model dir (train.py's), on the held-out windows of --input (default: the text it was trained on), with
the fp32 model itself as the reference, in one run:
- greedy: quantize.py's int8 model (int8 weights, dynamic int8 activations), bench/quantize.py's measure: --prompts
  prompts x --continuation-tokens new tokens, share of positions with fp32's token (information only: issue 19
  retired its target; quality is judged by bench/quantize.py's llama.cpp-style KLD, same top token, PPL ratio);
- teacher-forced: over the first 16 held-out windows, the share of positions where int8's most likely next token is
  fp32's; every position sees the real text, so one difference does not carry into the next;
- weights only: greedy agreement when only the weights are rounded the way quantize.py rounds them (per row,
  symmetric, scale = row max / levels) at 8, 9 and 10 bits, activations left fp32: how much is the weights' precision.
No targets here: it explains bench/quantize.py's greedy figure.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toygpt import quantization  # noqa: E402
from toygpt.stream import val_windows  # noqa: E402
from generate import greedy_agreement  # noqa: E402  (bench/generate.py, as bench/quantize.py measures it)

TEACHER_FORCED_WINDOWS = 16
WEIGHT_BITS = (8, 9, 10)


def rounded_weights(model, bits: int):
    """A copy of fp32 `model` whose Linear and embedding weights are rounded per row to 2**(bits-1) - 1 levels each
    side (at 8 bits, exactly quantization.quantize_rows' values), still fp32."""
    levels = 2 ** (bits - 1) - 1
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and name != "lm_head":  # lm_head is wte, tied
                weight = module.weight
                scale = (weight.abs().amax(dim=1, keepdim=True) / levels).clamp(min=1e-12)
                weight.copy_(torch.round(weight / scale) * scale)
    return rounded


@torch.no_grad()
def teacher_forced_agreement(reference, other, windows) -> float:
    inputs = windows[:TEACHER_FORCED_WINDOWS, :-1]  # (n, block_size)
    return (reference(inputs).logits.argmax(-1) == other(inputs).logits.argmax(-1)).float().mean().item()


def measure(model_dir: Path, text: str | None, prompts: int, continuation: int) -> dict:
    fp32 = quantization.load_fp32_model(model_dir).eval()
    text = text or quantization.training_input(model_dir)
    if text is None:
        raise ValueError(f"{model_dir} records no training text that still exists; pass --input FILE.")
    windows = val_windows(text, fp32.config.block_size).windows
    int8 = quantization.quantize_int8(fp32)
    figures = {
        "greedy": greedy_agreement(fp32, int8, windows, prompts, continuation),
        "teacher-forced": teacher_forced_agreement(fp32, int8, windows),
    }
    for bits in WEIGHT_BITS:
        figures[f"weights {bits}-bit"] = greedy_agreement(fp32, rounded_weights(fp32, bits), windows, prompts,
                                                          continuation)
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dirs", nargs="+", type=Path, help="fp32 model dirs written by train.py")
    p.add_argument("--input", help="held-out text (default: each dir's training text, from training_args.json)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--continuation-tokens", type=int, default=64)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; agreement with each dir's fp32 model")
    for model_dir in args.model_dirs:
        try:
            figures = measure(model_dir, args.input, args.prompts, args.continuation_tokens)
        except (ValueError, OSError) as err:  # quantization.QuantizeError, InputError, a missing file
            print(f"int8_agreement.py: error: {err}", file=sys.stderr)
            return 2
        print(f"{model_dir}:  " + "   ".join(f"{name} {value:.1%}" for name, value in figures.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
