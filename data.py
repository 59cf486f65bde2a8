"""The training data: input.txt -> GPT-2 BPE tokens -> windows of block_size+1 tokens, streamed.

Public API (train.py uses these names):

    path, description = resolve_input(args.input, block_size)    # validated; InputError says what to fix
    train = TrainWindows(path, block_size, seed=1337, rank=0, world_size=1)
    for xy in train.batches(batch_size):                          # (batch_size, block_size+1) LongTensor
        x, y = xy[:, :-1], xy[:, 1:]
    state = train.state_dict()                                    # JSON-serialisable; exact resume:
    train2 = TrainWindows(path, block_size, ...); train2.load_state_dict(state)
    val = val_windows(path, block_size, max_windows=64)           # ValWindows(windows, target_chars)

The split is nanoGPT's: with `text` the whole file decoded as UTF-8 (newlines untranslated),
`n = len(text); train = text[:int(n * 0.9)]; val = text[int(n * 0.9):]`. We find the character count and the
byte offset of that boundary by streaming the file in chunks, so memory does not grow with the file size.

Training stream: the train bytes are cut into shards (byte ranges of 64 KiB - 4 MiB, cut at line ends), read as
~16 KiB text pieces by a 🤗 `datasets.IterableDataset` over a generator (what `IterableDataset.from_generator`
builds), split across DDP ranks by `datasets.distributed.split_dataset_by_node` (whole shards per rank, so ranks
see disjoint text), and tokenized with tiktoken in a batched `map`. Pieces are cut where the GPT-2 pre-tokenizer
splits anyway, so the tokens are exactly those of tokenizing the train text in one go. We pack the token stream
into windows of block_size+1 tokens (consecutive windows share one token, so every next-token pair is a target
once) and shuffle them with our own seeded buffer. Each epoch (one pass over this rank's shards) visits the
shards in a new order drawn from seed + epoch; the stream never ends. A background thread reads and tokenizes a
few pieces ahead (tiktoken releases the GIL), so the training loop mostly just slices and stacks windows.
Why our own shuffle buffer: datasets' `shuffle(buffer_size=...)` does not restore its buffer on resume. Ours is
part of `state_dict()`, with the datasets stream state after the last consumed piece, the leftover tokens, the
RNG state and the epoch: a stream restored from it yields exactly the windows the original would have.

Validation: `val_windows` packs the val part the same way, in file order, without shuffling: the same windows at
every eval. Each window also has its target character count (the characters of its last block_size tokens), from
which evaluation.py computes bits per character.

Input: `resolve_input` takes the given path, else ./input.txt, else the default corpus (tiny Shakespeare, which
corpus.py fetches or assembles; this module only reads it), and checks it before training starts.
"""

from __future__ import annotations

import functools
import math
import queue
import re
import threading
import weakref
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

import bpe
import corpus

DEFAULT_INPUT = Path("input.txt")
VAL_FRACTION = 0.1

SCAN_CHUNK = 1 << 20  # bytes read at a time when scanning the file
PIECE_BYTES = 16 << 10  # bytes of text per datasets example (one tokenizer call each)
TOKENIZE_BATCH = 8  # pieces per batched map call
MIN_SHARD_BYTES, MAX_SHARD_BYTES = 64 << 10, 4 << 20
# A "clean cut" is just before a newline that precedes a non-space character ("word\n\nWord" -> "word\n" +
# "\nWord"): the GPT-2 pre-tokenizer ends a whitespace run's first token there and starts a new one at that
# newline, so pieces cut there tokenize exactly like the whole text. Cutting after the newline would not ("\n\n"
# ending a piece is one token; followed by a word it is two).
CLEAN_CUT = re.compile(rb"\n(?=\S)")
SPACE_BYTES = b" \t\n\r\f\v"


class InputError(ValueError):
    """The training text is unusable; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Scanning and the split


class TextSplit(NamedTuple):
    n_bytes: int
    n_chars: int
    train_chars: int  # int(n_chars * 0.9): the train part is text[:train_chars]
    boundary_byte: int  # byte offset of text[train_chars]: train = bytes[:boundary_byte], val = the rest


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # lead byte: is its sequence complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)  # only continuation bytes: let the decoder report them


def _decoded_chunks(path: Path) -> Iterator[tuple[int, str]]:
    """(byte offset, text) for the whole file, chunk by chunk; InputError at the first invalid UTF-8 byte."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(SCAN_CHUNK)
            data, at_end = carry + data, not data
            cut = len(data) if at_end else _complete_prefix(data)
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError as e:
                bad = offset + e.start
                raise InputError(
                    f"{path} is not valid UTF-8: the first bad byte is at byte offset {bad} "
                    f"(0x{data[e.start]:02x}). Save the file as UTF-8 text (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            yield offset, text
            if at_end:
                return
            offset, carry = offset + cut, data[cut:]


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _scan(key: tuple[str, int, int]) -> TextSplit:
    path = Path(key[0])
    # Pass 1 validates and counts characters; we keep one (offset, chars) pair per 1 MiB chunk (8 KB per GB)
    # so that pass 2 only has to re-read the chunk holding the boundary.
    chunks, n_chars = [], 0
    for offset, text in _decoded_chunks(path):
        chunks.append((offset, n_chars))
        n_chars += len(text)
    train_chars = int(n_chars * (1 - VAL_FRACTION))
    boundary_byte = key[1]
    for (offset, chars_before), nxt in zip(chunks, chunks[1:] + [(key[1], n_chars)]):
        if chars_before <= train_chars < nxt[1]:
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read(nxt[0] - offset).decode("utf-8")
            boundary_byte = offset + len(text[: train_chars - chars_before].encode("utf-8"))
            break
    return TextSplit(key[1], n_chars, train_chars, boundary_byte)


def split_text(path: str | Path) -> TextSplit:
    """The train/val split of a UTF-8 file, computed by streaming (cached per path, size and mtime)."""
    return _scan(_file_key(Path(path)))


# ----------------------------------------------------------------------------------------------------------------
# Reading pieces of text and tokenizing them


def _clean_cut_after(f, pos: int, end: int, scan: int) -> int:
    """The first clean cut after `pos`, within `scan` bytes (else the next character boundary)."""
    f.seek(pos)
    data = f.read(min(scan, end - pos))
    match = CLEAN_CUT.search(data, 1)
    if match:
        return pos + match.start()
    skip = 0
    while skip < len(data) and 0x80 <= data[skip] < 0xC0:  # step off continuation bytes
        skip += 1
    return pos + skip


def _last_clean_cut(data: bytes) -> int:
    """Where to end a piece: at the last clean cut in `data`, else at its last character boundary."""
    i = len(data) - 1
    while (i := data.rfind(b"\n", 1, i)) > 0:
        if data[i + 1] not in SPACE_BYTES:
            return i
    return _complete_prefix(data)


def _pieces(path: str, start: int, end: int) -> Iterator[str]:
    """The text of bytes [start, end) of `path` as pieces of about PIECE_BYTES, cut at clean cuts."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, carry = start, b""
        while pos < end or carry:
            data = f.read(min(PIECE_BYTES, end - pos))
            if not data:  # the file shrank under us: stop at what is there
                end = pos
            pos += len(data)
            data = carry + data
            cut = len(data) if pos >= end else _last_clean_cut(data)
            carry = data[cut:]
            if cut:
                yield data[:cut].decode("utf-8")


def _generate_pieces(path: str, shards: list[tuple[int, int]]):
    """datasets example generator: (key, {"text": piece}) for each piece of each byte-range shard."""
    for start, end in shards:
        for i, text in enumerate(_pieces(path, start, end)):
            yield f"{start}:{i}", {"text": text}


def _tokenize(batch: dict) -> dict:
    encoding = bpe.get_encoding()
    return {"ids": [encoding.encode_ordinary(text) for text in batch["text"]]}


def _shard_ranges(path: Path, end: int, world_size: int) -> list[tuple[int, int]]:
    """Cut bytes [0, end) into a multiple of world_size shards of 64 KiB - 4 MiB, each ending at a clean cut."""
    shard_bytes = min(max(end // 256, MIN_SHARD_BYTES), MAX_SHARD_BYTES)
    n_shards = max(1, math.ceil(end / (shard_bytes * world_size))) * world_size
    step = end / n_shards
    scan = min(int(step) // 2, 1 << 16)  # < step, so the cuts increase
    with open(path, "rb") as f:
        cuts = [0] + [_clean_cut_after(f, int(i * step), end, scan) for i in range(1, n_shards)] + [end]
    return list(zip(cuts[:-1], cuts[1:]))


# ----------------------------------------------------------------------------------------------------------------
# Input validation


def _count_tokens(path: Path, start: int, end: int, needed: int) -> int:
    """Tokens in bytes [start, end), counting only until `needed` is reached."""
    count = 0
    for text in _pieces(str(path), start, end):
        count += len(bpe.encode(text))
        if count >= needed:
            break
    return count


def validate_input(path: str | Path, block_size: int) -> TextSplit:
    """Raise InputError unless `path` is non-empty UTF-8 text giving >= 1 train and >= 1 val window."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"Input file {path} does not exist. Pass --input PATH to a UTF-8 text file, or put your text in "
            f"./{DEFAULT_INPUT} (without either, the default tiny Shakespeare corpus is used)."
        )
    if not path.is_file():
        raise InputError(f"Input {path} is not a regular file. Pass --input PATH to a UTF-8 text file.")
    if path.stat().st_size == 0:
        raise InputError(f"Input file {path} is empty. Put some UTF-8 text in it (tiny Shakespeare is ~1 MB).")
    split = split_text(path)
    needed = block_size + 1
    train_tokens = _count_tokens(path, 0, split.boundary_byte, needed)
    val_tokens = _count_tokens(path, split.boundary_byte, split.n_bytes, needed)
    if train_tokens < needed or val_tokens < needed:
        raise InputError(
            f"Input file {path} is too short for block_size={block_size}: the first 90% ({split.train_chars} "
            f"characters) gives {train_tokens} tokens for training and the last 10% gives {val_tokens} for "
            f"validation, but each needs at least block_size+1 = {needed} tokens. Use a longer text (roughly "
            f"{40 * needed} characters or more) or a smaller --block-size."
        )
    return split


def resolve_input(path: str | Path | None, block_size: int) -> tuple[Path, str]:
    """The validated training text and a description: the given path, else ./input.txt, else the default corpus."""
    if path is not None:
        path = Path(path)
        description = path.name
    elif DEFAULT_INPUT.is_file():
        path, description = DEFAULT_INPUT, str(DEFAULT_INPUT)
    else:
        try:
            path, description = corpus.default_corpus()
        except corpus.CorpusError as err:
            raise InputError(str(err)) from err
    validate_input(path, block_size)
    return path, description


# ----------------------------------------------------------------------------------------------------------------
# The training stream


def _epoch_dataset(path: str, shards: list, seed: int, rank: int, world_size: int, epoch: int):
    """This rank's tokenized pieces for one epoch: a datasets IterableDataset over the shards in a seeded order."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node
    from datasets.iterable_dataset import ExamplesIterable

    # The private ExamplesIterable, not the public IterableDataset.from_generator: from_generator makes a
    # `Generator` builder, whose __init__ takes a FileLock in the datasets cache and leaves the lock file there
    # (~/.cache/huggingface/datasets/*_generator_default-<hash of generator and gen_kwargs>_0.0.0.lock), one per
    # input file and epoch here, since each epoch's shard order is new gen_kwargs; from_generator has no parameter
    # to avoid it (datasets 5.2.0). Its streaming dataset is an ExamplesIterable over the generator too.
    # A list in the kwargs makes each element a datasets shard, and with strategy="shards" split_dataset_by_node
    # gives each rank whole shards (there are a multiple of world_size). test_data.py pins all of this.
    order = np.random.default_rng(seed + epoch).permutation(len(shards))
    ds = IterableDataset(ExamplesIterable(_generate_pieces, {"path": path, "shards": [shards[i] for i in order]}))
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size, strategy="shards")
    return ds.map(_tokenize, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=["text"])


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
        path: str | Path,
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
        self.path, self.block_size, self.seed = Path(path), block_size, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, max(1, shuffle_buffer)
        self.prefetch = max(1, prefetch)
        self.split = split_text(self.path)
        self.shards = _shard_ranges(self.path, self.split.boundary_byte, world_size)
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.buffer: list[np.ndarray] = []  # the shuffle buffer
        self.tokens = np.zeros(0, dtype=np.int64)  # tokens read but not yet cut into windows
        # Position of the last piece consumed: its epoch, its index in the epoch, the datasets stream state after it.
        self.epoch, self.examples_in_epoch, self.dataset_state = 0, 0, None
        self._pieces: queue.Queue | None = None  # filled by the producer thread, started on first use
        self._stop_producer: weakref.finalize | None = None  # stops and joins that thread

    def _start_producer(self) -> None:
        make_dataset = functools.partial(
            _epoch_dataset, str(self.path), self.shards, self.seed, self.rank, self.world_size
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
            raise RuntimeError(f"reading training text from {self.path} failed (rank {self.rank}): {item}") from item
        tokens, self.epoch, self.examples_in_epoch, self.dataset_state = item
        return tokens

    def _next_packed(self) -> np.ndarray:
        n = self.block_size + 1
        while len(self.tokens) < n:
            self.tokens = np.concatenate([self.tokens, self._next_piece_tokens()])
        window = self.tokens[:n].copy()
        self.tokens = self.tokens[self.block_size :]  # the last token is also the next window's first
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
            "path": str(self.path),
            "n_bytes": self.split.n_bytes,
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
        mine = self.state_dict()
        for key in ("n_bytes", "block_size", "seed", "rank", "world_size", "shuffle_buffer"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"Cannot resume the data stream: {key} was {state[key]} in the checkpoint but is {mine[key]} "
                    f"now. Resume with the same input file and settings, or start a fresh run."
                )
        self.close()  # the producer restarts from the restored position
        self.epoch, self.examples_in_epoch, self.dataset_state = state["epoch"], state["examples_in_epoch"], state["dataset"]
        self.tokens = np.asarray(state["tokens"], dtype=np.int64)
        self.buffer = [np.asarray(w, dtype=np.int64) for w in state["buffer"]]
        self.rng.bit_generator.state = state["rng"]

# ----------------------------------------------------------------------------------------------------------------
# Validation windows


class ValWindows(NamedTuple):
    windows: torch.Tensor  # (N, block_size+1) LongTensor, in file order
    target_chars: torch.Tensor  # (N,) characters covered by each window's targets windows[:, 1:]


@functools.lru_cache(maxsize=1)
def _token_char_counts() -> np.ndarray:
    """Characters each token contributes (UTF-8 non-continuation bytes), so partial characters count once."""
    encoding = bpe.get_encoding()
    counts = np.zeros(encoding.n_vocab, dtype=np.int64)
    for token in range(encoding.n_vocab):
        counts[token] = sum(1 for byte in encoding.decode_single_token_bytes(token) if not 0x80 <= byte < 0xC0)
    return counts


def val_windows(path: str | Path, block_size: int, max_windows: int | None = None) -> ValWindows:
    """The first `max_windows` (all if None) validation windows, deterministic; streamed from the val part."""
    split = split_text(path)
    n = block_size + 1
    windows, tokens = [], np.zeros(0, dtype=np.int64)
    for text in _pieces(str(path), split.boundary_byte, split.n_bytes):
        tokens = np.concatenate([tokens, np.asarray(bpe.encode(text), dtype=np.int64)])
        while len(tokens) >= n and (max_windows is None or len(windows) < max_windows):
            windows.append(tokens[:n].copy())
            tokens = tokens[block_size:]
        if max_windows is not None and len(windows) >= max_windows:
            break
    if not windows:
        raise InputError(f"{path}: the validation part (last 10%) is shorter than block_size+1 = {n} tokens.")
    stacked = torch.from_numpy(np.stack(windows))
    target_chars = torch.from_numpy(_token_char_counts()[stacked[:, 1:].numpy()].sum(axis=1))
    return ValWindows(stacked, target_chars)
