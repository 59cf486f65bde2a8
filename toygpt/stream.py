"""The training stream and the validation windows: a source's tokens packed into windows of block_size+1 tokens.

    train = TrainWindows(source, block_size, seed=1337, rank=0, world_size=1)   # a Source or a path
    for xy in train.batches(batch_size):                          # (batch_size, block_size+1) LongTensor
        x, y = xy[:, :-1], xy[:, 1:]
    state = train.state_dict()                                    # JSON-serialisable; exact resume:
    train2 = TrainWindows(source, block_size, ...); train2.load_state_dict(state)
    val = val_windows(source, block_size, max_windows=64)         # ValWindows(windows, target_chars)

Training: a source's training text comes as a 🤗 `datasets.IterableDataset` over its shards (toygpt/sources.py). Each
epoch (one pass over this rank's shards) takes the shards in a new order drawn from seed + epoch;
`datasets.distributed.split_dataset_by_node` splits them across DDP ranks (whole shards per rank where there are a
multiple of world_size, as text sources always cut, else every world_size-th example: either way ranks see disjoint
text), and tiktoken tokenizes them in a batched `map`. `next_window` packs the tokens into windows of block_size+1
tokens (consecutive windows share one token, so every next-token pair is a target once), which we shuffle with our
own seeded buffer; the stream never ends. A background thread reads and tokenizes a few pieces ahead (tiktoken
releases the GIL), so the training loop mostly just slices and stacks windows. Why our own shuffle buffer: datasets'
`shuffle(buffer_size=...)` does not restore its buffer on resume. Ours is part of `state_dict()`, with the datasets
stream state after the last consumed piece, the leftover tokens, the RNG state and the epoch: a stream restored from
it yields exactly the windows the original would have.

Validation: `val_windows` packs the held-out text with the same `next_window`, in its fixed order, without
shuffling: the same windows at every eval. Each window also has its target character count (the characters of its
last block_size tokens; <|endoftext|> counts none), from which toygpt/evaluation.py computes bits per character.
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from toygpt import bpe
from toygpt.sources import Source, as_source, tokenized, val_token_pieces
from toygpt.text_files import InputError


def next_window(tokens: np.ndarray, next_piece: Callable[[], np.ndarray], block_size: int):
    """The packing of both streams: the next window of block_size+1 tokens from `tokens`, drawing pieces of tokens
    from `next_piece()` while too few, and the tokens left, which start with the window's last token (consecutive
    windows share one, so every next-token pair is a target once)."""
    n = block_size + 1
    while len(tokens) < n:
        tokens = np.concatenate([tokens, next_piece()])
    return tokens[:n].copy(), tokens[block_size:]


# ----------------------------------------------------------------------------------------------------------------
# The training stream


def epoch_dataset(source, shards: list, seed: int, rank: int, world_size: int, epoch: int):
    """This rank's tokenized pieces for one epoch: a datasets IterableDataset over the shards in a seeded order."""
    from datasets.distributed import split_dataset_by_node

    source = as_source(source)
    order = np.random.default_rng(seed + epoch).permutation(len(shards))
    ds = source.train_examples([shards[i] for i in order])
    # strategy "auto": with a multiple of world_size shards (text sources always cut so many), each rank gets whole
    # shards; else (a dataset with fewer parts than ranks) each rank keeps every world_size-th example. test_data.py
    # pins this.
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return tokenized(source, ds)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce_pieces(make_dataset, epoch: int, examples_in_epoch: int, dataset_state, out, stop) -> None:
    """Background thread: (tokens, epoch, examples_in_epoch, datasets state after this piece) for each piece in
    order, epoch after epoch, until `stop`. tiktoken releases the GIL, so tokenizing here overlaps training."""
    try:
        while True:
            dataset = make_dataset(epoch)
            if dataset_state is not None:
                dataset.load_state_dict(dataset_state)
            for example in dataset:
                examples_in_epoch += 1
                tokens = np.asarray(example["ids"], dtype=np.int64)
                if not _put(out, (tokens, epoch, examples_in_epoch, dataset.state_dict()), stop):
                    return
            if examples_in_epoch == 0:
                raise RuntimeError("this rank's shards hold no text")
            epoch, examples_in_epoch, dataset_state = epoch + 1, 0, None
    except BaseException as err:  # hand it to the consumer, which raises it
        _put(out, err, stop)


def _stop_and_join(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()  # the producer notices within 0.1 s of finishing the piece it is tokenizing
    if thread is not threading.current_thread():
        thread.join()


class TrainWindows:
    """Endless, shuffled, rank-sharded, exactly resumable stream of (block_size+1,) LongTensor training windows.

    Iterate it (`next(stream)` or `for window in stream`) or call `batches(batch_size)`; both continue from the
    current position. `state_dict()` / `load_state_dict()` capture that position exactly. A background thread
    reads and tokenizes up to `prefetch` pieces ahead; the state only counts what the windows consumed.
    """

    def __init__(
        self,
        source: Source | str | Path,  # from resolve_source, or a path
        block_size: int,
        *,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        prefetch: int = 8,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.source, self.block_size, self.seed = as_source(source), block_size, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, max(1, shuffle_buffer)
        self.prefetch = max(1, prefetch)
        self.shards = self.source.train_shards(world_size)
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.buffer: list[np.ndarray] = []  # the shuffle buffer
        self.tokens = np.zeros(0, dtype=np.int64)  # tokens read but not yet cut into windows
        # Position of the last piece consumed: its epoch, its index in the epoch, the datasets stream state after it.
        self.epoch, self.examples_in_epoch, self.dataset_state = 0, 0, None
        self._pieces: queue.Queue | None = None  # filled by the producer thread, started on first use
        self._stop_producer: weakref.finalize | None = None  # stops and joins that thread

    def _start_producer(self) -> None:
        make_dataset = functools.partial(
            epoch_dataset, self.source, self.shards, self.seed, self.rank, self.world_size
        )
        self._pieces, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        args = (make_dataset, self.epoch, self.examples_in_epoch, self.dataset_state, self._pieces, stop)
        thread = threading.Thread(target=_produce_pieces, args=args, daemon=True, name="TrainWindows-prefetch")
        thread.start()
        # The thread holds no reference to self: stop it with self, or at interpreter exit at the latest (finalize
        # runs at exit too). A daemon thread still inside native tokenizer code when Python finalizes aborts the
        # process ("terminate called without an active exception"), so stopping also waits for it.
        self._stop_producer = weakref.finalize(self, _stop_and_join, stop, thread)

    def close(self) -> None:
        """Stop the prefetch thread and wait for it (it also stops when the stream is garbage-collected)."""
        if self._stop_producer is not None:
            self._stop_producer()
        self._stop_producer, self._pieces = None, None

    def _next_piece_tokens(self) -> np.ndarray:
        if self._pieces is None:
            self._start_producer()
        item = self._pieces.get()
        if isinstance(item, BaseException):
            self.close()  # a later call retries from the last consumed piece
            raise RuntimeError(
                f"reading training text from {self.source.description} failed (rank {self.rank}): {item}"
            ) from item
        tokens, self.epoch, self.examples_in_epoch, self.dataset_state = item
        return tokens

    def _next_packed(self) -> np.ndarray:
        window, self.tokens = next_window(self.tokens, self._next_piece_tokens, self.block_size)
        return window

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        while len(self.buffer) < self.shuffle_buffer:
            self.buffer.append(self._next_packed())
        i = int(self.rng.integers(len(self.buffer)))
        window, self.buffer[i] = self.buffer[i], self._next_packed()
        return torch.from_numpy(window)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Endless (batch_size, block_size+1) LongTensors; x = b[:, :-1], y = b[:, 1:]."""
        while True:
            yield torch.stack([next(self) for _ in range(batch_size)])

    def state_dict(self) -> dict:
        """Everything needed to continue exactly here; JSON-serialisable (ints, lists, strings)."""
        return {
            "source": self.source.description,  # for the reader
            "n_shards": len(self.shards),  # the datasets state below counts in these shards
            "block_size": self.block_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle_buffer": self.shuffle_buffer,
            "epoch": self.epoch,
            "examples_in_epoch": self.examples_in_epoch,
            "dataset": self.dataset_state,  # datasets' IterableDataset.state_dict() after the last consumed piece
            "tokens": self.tokens.tolist(),
            "buffer": [w.tolist() for w in self.buffer],
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        settings = ("block_size", "seed", "rank", "world_size", "shuffle_buffer")  # state_dict's, from attributes
        mine = {"n_shards": len(self.shards), **{key: getattr(self, key) for key in settings}}
        state = {**state, "n_shards": state.get("n_shards", state.get("n_parts"))}  # a dataset's, before 2026-12
        if state["n_shards"] is None:  # a text file's state before 2026-12: its shards follow from the file, which
            del mine["n_shards"]  # the run's data fingerprint (sha256) has already checked
        for key in mine:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"Cannot resume the data stream: {key} was {state.get(key)} in the checkpoint but is {mine[key]} "
                    f"now. Resume with the same input and settings, or start a fresh run."
                )
        self.close()  # the producer restarts from the restored position
        self.epoch, self.examples_in_epoch = state["epoch"], state["examples_in_epoch"]
        self.dataset_state = state["dataset"]
        self.tokens = np.asarray(state["tokens"], dtype=np.int64)
        self.buffer = [np.asarray(w, dtype=np.int64) for w in state["buffer"]]
        self.rng.bit_generator.state = state["rng"]


# ----------------------------------------------------------------------------------------------------------------
# Validation windows


class ValWindows(NamedTuple):
    windows: torch.Tensor  # (N, block_size+1) LongTensor, in the held-out text's order
    target_chars: torch.Tensor  # (N,) characters covered by each window's targets windows[:, 1:]


@functools.lru_cache(maxsize=1)
def _token_char_counts() -> np.ndarray:
    """Characters each token contributes (UTF-8 non-continuation bytes), so partial characters count once.
    <|endoftext|> separates documents and stands for no text: none (predicting it still costs bits)."""
    encoding = bpe.get_encoding()
    counts = np.zeros(encoding.n_vocab, dtype=np.int64)
    for token in range(encoding.n_vocab):
        counts[token] = sum(1 for byte in encoding.decode_single_token_bytes(token) if not 0x80 <= byte < 0xC0)
    counts[bpe.EOT_ID] = 0
    return counts


def val_windows(source: Source | str | Path, block_size: int, max_windows: int | None = None) -> ValWindows:
    """The first `max_windows` (all if None) validation windows, deterministic; streamed from the held-out text of
    `source` (from resolve_source, or a text file's path)."""
    source = as_source(source)
    next_piece = functools.partial(next, val_token_pieces(source))  # StopIteration at the end of the held-out text
    windows, tokens = [], np.zeros(0, dtype=np.int64)
    try:
        while max_windows is None or len(windows) < max_windows:
            window, tokens = next_window(tokens, next_piece, block_size)
            windows.append(window)
    except StopIteration:
        pass
    if not windows:
        n = block_size + 1
        raise InputError(
            f"{source.description}: the held-out text ({source.holdout}) is shorter than block_size+1 = {n} tokens."
        )
    stacked = torch.from_numpy(np.stack(windows))
    target_chars = torch.from_numpy(_token_char_counts()[stacked[:, 1:].numpy()].sum(axis=1))
    return ValWindows(stacked, target_chars)
