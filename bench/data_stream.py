"""Data stream speed and memory: TrainWindows against plain tiktoken, and peak RSS for a 1 MB vs a big file.

    OMP_NUM_THREADS=1 flock /tmp/toygpt-cpu.lock python bench/data_stream.py [--input PATH] [--big-mb 1024]

1. Throughput: one epoch of windows from TrainWindows, against the reference of tokenizing the same train text
   with one tiktoken call (no reading, packing, shuffling, datasets). Ratio stream / reference (target >= 0.7).
2. Hot-path cost: the training loop pulls a batch after each step. With a simulated step that releases the GIL
   (as a GPU step or torch's CPU kernels do), the prefetch thread tokenizes during the step: the time the loop
   still spends in `next(batches)` per batch, against the time tokenizing that batch takes (target <= 0.5).
3. Memory: peak RSS (ru_maxrss) of a fresh process that validates the file, computes the split, reads 320 training
   windows and 64 val windows, for a 1 MB and a --big-mb file generated in a temp dir. Ratio big / small
   (target <= 1.2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toygpt import bpe  # noqa: E402
from toygpt import corpus  # noqa: E402
from toygpt import text_files  # noqa: E402
from toygpt.stream import TrainWindows  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

PROBE = """
import resource, sys
from toygpt import sources
from toygpt.stream import TrainWindows, val_windows
path = sys.argv[1]
sources.validate_input(path, 256)
stream = TrainWindows(path, 256)
for _, batch in zip(range(20), stream.batches(16)):
    pass
stream.state_dict()
val_windows(path, 256, max_windows=64)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def throughput(path: Path, block_size: int, batch_size: int, step_ms: float) -> None:
    split = text_files.split_text(path)
    with open(path, "rb") as f:
        train_text = f.read(split.boundary_byte).decode("utf-8")
    encoding = bpe.get_encoding()
    encoding.encode_ordinary("warm up")
    t0 = time.perf_counter()
    n_tokens = len(encoding.encode_ordinary(train_text))
    reference_s = time.perf_counter() - t0
    print(f"reference: tiktoken, one call over the train part: {n_tokens} tokens in {reference_s:.3f} s "
          f"({n_tokens / reference_s / 1e6:.2f} M tokens/s)")

    t0 = time.perf_counter()
    stream = TrainWindows(path, block_size, shuffle_buffer=256)
    next(stream)  # starts the prefetch thread (and imports datasets)
    setup_s = time.perf_counter() - t0
    n_windows = n_tokens // block_size
    t0 = time.perf_counter()
    for _ in range(n_windows):
        next(stream)
    stream_s = time.perf_counter() - t0
    print(f"TrainWindows: {n_windows} windows of {block_size + 1} in {stream_s:.3f} s after {setup_s:.2f} s setup "
          f"({n_windows * block_size / stream_s / 1e6:.2f} M tokens/s); ratio stream / reference = "
          f"{reference_s / stream_s:.2f} (target >= 0.7)")

    batches = stream.batches(batch_size)
    next(batches)
    n_batches = 40
    waited = 0.0
    for _ in range(n_batches):
        time.sleep(step_ms / 1000)  # a training step that releases the GIL
        t0 = time.perf_counter()
        next(batches)
        waited += time.perf_counter() - t0
    per_batch_tokenize = reference_s / n_tokens * batch_size * block_size
    print(f"hot path with a {step_ms:.0f} ms step: {waited / n_batches * 1e3:.2f} ms per ({batch_size}, "
          f"{block_size + 1}) batch in next(); tokenizing a batch takes {per_batch_tokenize * 1e3:.2f} ms; "
          f"ratio = {waited / n_batches / per_batch_tokenize:.2f} (target <= 0.5)")
    stream.close()


def write_text(path: Path, n_bytes: int, seed_text: str) -> Path:
    block = seed_text.encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(n_bytes // len(block) + 1):
            f.write(block)
    return path


def peak_rss_kb(path: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], cwd=REPO, capture_output=True, text=True, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    return int(out.stdout.split()[-1])


def memory(seed_text: str, big_mb: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        small = write_text(Path(tmp) / "small.txt", 1 << 20, seed_text)
        big = write_text(Path(tmp) / "big.txt", big_mb << 20, seed_text)
        rss = {}
        for path in (small, big):
            t0 = time.perf_counter()
            rss[path] = peak_rss_kb(path)
            print(f"peak RSS {path.stat().st_size / 1e6:8.1f} MB file: {rss[path] / 1024:.1f} MiB "
                  f"({time.perf_counter() - t0:.1f} s)")
        print(f"ratio big / small = {rss[big] / rss[small]:.3f} (target <= 1.2)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, default=SHARED if SHARED.is_file() else None)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--step-ms", type=float, default=30.0)
    parser.add_argument("--big-mb", type=int, default=1024)
    args = parser.parse_args(argv)
    path = args.input or corpus.default_corpus_path()
    print(f"input: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    throughput(path, args.block_size, args.batch_size, args.step_ms)
    memory(path.read_text(encoding="utf-8")[:200_000], args.big_mb)


if __name__ == "__main__":
    main()
