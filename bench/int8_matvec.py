"""Batch-1 int8 matrix-vector kernels over the 124M `gpt2` shape's 49 weight matrices (random int8), cycled so that no
weight stays in cache: ms per token, in one run, contenders taking turns.

    flock -x /tmp/toygpt-cpu.lock python bench/int8_matvec.py [--threads 1] [--repeats 10]

ToyGPT's block kernel (int8_toygpt: q8_0's per-32 fp16 weight scales, int16 activations; what an int8 dir runs),
torch._int_mm at 1 and 2 activation rows (the kernel of version-2 int8 dirs before it; 2 rows is what a second
activation pass would cost), torch.ops.aten._weight_int8pack_mm with bf16 activations (weight-only int8), and a
per-32-block dot product (q8_0's rounding) written as torch ops and compiled by inductor.
"""

from __future__ import annotations

import argparse
import sys
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from int8_toygpt import BlockInt8Kernel, block_kernel_library  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (out, in); the head last


def block_matvec(xq, x_scale, wq, w_scale):
    """q8_0-style: int32 sums per block of 32, each block scaled by its weight and activation scales."""
    n, k = wq.shape
    part = (wq.view(n, k // 32, 32).to(torch.int32) * xq.view(1, k // 32, 32).to(torch.int32)).sum(-1)  # (N, K/32)
    return (part.float() * w_scale.float() * x_scale).sum(-1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for shape in SHAPES]
    block_scales = [torch.rand(n, k // 32, generator=g).half() for n, k in SHAPES]
    row_scales = [torch.rand(n, generator=g).bfloat16() for n, _ in SHAPES]
    x = {rows: {k: torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=g) for k in (768, 3072)}
         for rows in (1, 2)}
    x_bf16 = {k: torch.randn(1, k, generator=g).bfloat16() for k in (768, 3072)}
    x_blocks = {k: torch.rand(k // 32, generator=g) for k in (768, 3072)}
    compiled = torch.compile(block_matvec, dynamic=False)
    library, problem = block_kernel_library()
    block = BlockInt8Kernel() if library else None
    packed = [block.pack(w, s, None) for w, s in zip(weights, block_scales)] if block else []
    x_float = {k: torch.randn(1, k, generator=g) for k in (768, 3072)}
    runs = {
        "ToyGPT block kernel (int8_toygpt)": lambda: [block.linear(x_float[p[4]], p) for p in packed],
        "torch._int_mm, 1 row": lambda: [torch._int_mm(x[1][w.shape[1]], w.t()) for w in weights],
        "torch._int_mm, 2 rows": lambda: [torch._int_mm(x[2][w.shape[1]], w.t()) for w in weights],
        "_weight_int8pack_mm, bf16 activations": lambda: [
            torch.ops.aten._weight_int8pack_mm(x_bf16[w.shape[1]], w, s) for w, s in zip(weights, row_scales)],
        "per-32 blocks, inductor": lambda: [
            compiled(x[1][w.shape[1]][0], x_blocks[w.shape[1]], w, s) for w, s in zip(weights, block_scales)],
    }
    if block is None:
        print(f"skipping ToyGPT's block kernel: {problem}")
        del runs["ToyGPT block kernel (int8_toygpt)"]
    for run in runs.values():
        run()  # warm-up (compiles)
    seconds = {name: 0.0 for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name] += time.perf_counter() - start
    megabytes = sum(n * k for n, k in SHAPES) / 1e6
    print(f"124M shape, {megabytes:.0f} MB of int8 weights a token, {args.threads} thread(s), torch {torch.__version__}")
    for name, total in seconds.items():
        ms = total / args.repeats * 1e3
        print(f"  {name:<40} {ms:8.2f} ms/token  {megabytes / ms:6.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
