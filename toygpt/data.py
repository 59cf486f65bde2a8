"""The training data: a source of text -> GPT-2 BPE tokens -> windows of block_size+1 tokens, streamed.

Public API (train.py uses these names):

    source, description = resolve_source(input=args.input, dataset=args.dataset, dataset_config=...,
                                         split="train", text_column="text", block_size=256)  # InputError: the fix
    train = TrainWindows(source, block_size, seed=1337, rank=0, world_size=1)   # a source or a plain file path
    for xy in train.batches(batch_size):                          # (batch_size, block_size+1) LongTensor
        x, y = xy[:, :-1], xy[:, 1:]
    state = train.state_dict()                                    # JSON-serialisable; exact resume:
    train2 = TrainWindows(source, block_size, ...); train2.load_state_dict(state)
    val = val_windows(source, block_size, max_windows=64)         # ValWindows(windows, target_chars)
    source.fingerprint(), source.describe(), source.spec()        # identity, log line, resolve_source kwargs
    for ids in train_token_pieces(source): ...                    # the whole training text's tokens, one pass
    path, description = resolve_input(args.input, block_size)     # the file-only form (quantize.py)

Sources. `resolve_source` picks and checks one of:
  * a text file (TextFile): nanoGPT's split. With `text` the whole file decoded as UTF-8 (newlines untranslated),
    `n = len(text); train = text[:int(n * 0.9)]; val = text[int(n * 0.9):]`. We find the character count and the
    byte offset of that boundary by streaming the file in chunks, so memory does not grow with the file size.
  * a directory of text files, or a glob of them (TextFiles): every file is one document, split the same way (its
    first 90% of characters train, its last 10% are held out).
  * a directory `datasets` reads (parquet, jsonl, csv, arrow files), or a Hub dataset (--dataset): see
    toygpt/dataset_source.py. Each row is a document; the held-out rows are the "validation" split, else a fixed tenth.
Documents end with GPT-2's <|endoftext|> token, as in nanoGPT's OpenWebText prepare.py (a single file is one
document and gets none, so its tokens are exactly those of its text). A source gives the stream its training text
as `train_examples(shards)`, a datasets IterableDataset of text over shards in a given order; its held-out text as
`val_texts()`, (text, ends a document) pairs in a fixed order.

Training stream: a text file's train bytes are cut into shards (byte ranges of 64 KiB - 4 MiB, cut at line ends;
text files' shards may span several files), read as ~16 KiB text pieces by a 🤗 `datasets.IterableDataset` over a
generator (what `IterableDataset.from_generator` builds); a dataset's shards are parts of its files or parquet row
groups, read by `load_dataset(..., streaming=True)` (toygpt/dataset_source.py). Each epoch (one pass over this rank's
shards) takes the shards in a new order drawn from seed + epoch; `datasets.distributed.split_dataset_by_node` splits
them across DDP ranks (whole shards per rank where there are a multiple of world_size, as text sources always cut,
else every world_size-th example: either way ranks see disjoint text), and tiktoken tokenizes them in a batched
`map` (a text piece, or ROWS_PER_PIECE dataset rows, per piece of tokens). Text pieces are cut where the GPT-2
pre-tokenizer splits anyway, so the tokens are exactly those of tokenizing the train text in one go. We pack the
token stream into windows of block_size+1 tokens (consecutive windows share one token, so every next-token pair is
a target once) and shuffle them with our own seeded buffer; the stream never ends. A background thread reads and
tokenizes a few pieces ahead (tiktoken releases the GIL), so the training loop mostly just slices and stacks windows.
Why our own shuffle buffer: datasets' `shuffle(buffer_size=...)` does not restore its buffer on resume. Ours is
part of `state_dict()`, with the datasets stream state after the last consumed piece, the leftover tokens, the
RNG state and the epoch: a stream restored from it yields exactly the windows the original would have.

Validation: `val_windows` packs the held-out text the same way, in its fixed order, without shuffling: the same
windows at every eval. Each window also has its target character count (the characters of its last block_size
tokens; <|endoftext|> counts none), from which toygpt/evaluation.py computes bits per character.

Input: `resolve_source` with neither --input nor --dataset takes ./input.txt, else the default corpus (tiny
Shakespeare, which toygpt/corpus.py fetches or assembles; this module only reads it), and checks the source before
training starts.
"""

from __future__ import annotations

import bisect
import functools
import glob
import hashlib
import itertools
import math
import queue
import re
import threading
import weakref
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from toygpt import bpe
from toygpt import corpus
from toygpt.dataset_source import DatasetError, DatasetSource, is_dataset_dir, visible_files

DEFAULT_INPUT = Path("input.txt")
VAL_FRACTION = 0.1

SCAN_CHUNK = 1 << 20  # bytes read at a time when scanning the file
PIECE_BYTES = 16 << 10  # bytes of text per datasets example (one tokenizer call each)
TOKENIZE_BATCH = 8  # pieces per batched map call
ROWS_PER_PIECE = 64  # dataset rows (documents) tokenized into one piece
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
    sha256: str  # of the file's bytes (dataset_source.file_sha256's digest), hashed while scanning


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


def _utf16_fix(path: Path, head: bytes) -> str | None:
    """The fix for a UTF-16 or UTF-32 file, else None. Its byte-order mark, or NUL bytes at every other position (the
    high bytes of ASCII characters), say so plainly; `iconv -f latin1` would "work" and train on NUL-riddled text."""
    for bom, encoding in ((b"\xff\xfe\0\0", "UTF-32"), (b"\0\0\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                          (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            why = f"it starts with a {encoding} byte-order mark"
            break
    else:
        half = len(head) // 2
        even, odd = head[0 : 2 * half : 2].count(0), head[1 : 2 * half : 2].count(0)
        if half < 4 or min(even, odd) > half // 20 or max(even, odd) < half * 2 // 5:
            return None
        encoding = "UTF-16LE" if odd > even else "UTF-16BE"
        why = f"NUL bytes at every {'odd' if odd > even else 'even'} byte offset are the pattern of {encoding}"
    return (
        f"{path} is {encoding[:6]} text, not UTF-8 ({why}). Convert it to UTF-8: "
        f"`iconv -f {encoding} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`."
    )


def _not_utf8_fix(data: bytes, bad: int, seen_non_ascii: bool) -> str:
    """The likely fix for invalid UTF-8 at data[bad]: which encoding the bytes look like."""
    if seen_non_ascii or not data[:bad].isascii():
        return ("The text before it is UTF-8 with non-ASCII characters, so the file is probably UTF-8 with damaged "
                "bytes: fix them, or drop them with `iconv -f UTF-8 -t UTF-8 -c`.")
    if b"\0" in data:
        return ("It holds NUL bytes: it is probably not a text file. Pass text files only (for a directory, a glob "
                "such as --input 'DIR/*.txt').")
    if any(0x80 <= byte < 0xA0 for byte in data[bad : bad + 4096]):  # C1 controls in latin1; quotes, dashes in CP1252
        return "Save the file as UTF-8 text; it looks like Windows-1252 (`iconv -f CP1252 -t UTF-8`)."
    return "Save the file as UTF-8 text (e.g. `iconv -f latin1 -t utf-8`)."


def _decoded_chunks(path: Path, digest) -> Iterator[tuple[int, str]]:
    """(byte offset, text) for the whole file, chunk by chunk, every byte read fed to `digest`; InputError at the
    first invalid UTF-8 byte."""
    offset, carry, seen_non_ascii = 0, b"", False
    with open(path, "rb") as f:
        while True:
            data = f.read(SCAN_CHUNK)
            digest.update(data)
            if offset == 0 and not carry and (fix := _utf16_fix(path, data[:4096])):
                raise InputError(fix)
            data, at_end = carry + data, not data
            cut = len(data) if at_end else _complete_prefix(data)
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError as e:
                bad = offset + e.start
                raise InputError(
                    f"{path} is not valid UTF-8: the first bad byte is at byte offset {bad} "
                    f"(0x{data[e.start]:02x}). {_not_utf8_fix(data, e.start, seen_non_ascii)}"
                ) from None
            seen_non_ascii = seen_non_ascii or not text.isascii()
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
    chunks, n_chars, digest = [], 0, hashlib.sha256()
    for offset, text in _decoded_chunks(path, digest):
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
    return TextSplit(key[1], n_chars, train_chars, boundary_byte, digest.hexdigest())


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


def _with_last(items: Iterator) -> Iterator[tuple[object, bool]]:
    """(item, whether it is the last) for each item."""
    previous = sentinel = object()
    for item in items:
        if previous is not sentinel:
            yield previous, False
        previous = item
    if previous is not sentinel:
        yield previous, True


def _generate_file_pieces(paths: tuple[str, ...], shards: list[tuple]):
    """datasets example generator for text files: (key, {"text": piece, "end": ends a document}) for each piece of
    each shard, a shard being (file index, start, end, the file's train part ends there) byte-range segments."""
    for segments in shards:
        for index, start, end, ends_document in segments:
            for i, (text, last) in enumerate(_with_last(_pieces(paths[index], start, end))):
                yield f"{index}:{start}:{i}", {"text": text, "end": ends_document and last}


def _tokenize(batch: dict) -> dict:
    """Pieces of text -> token ids, one row per piece; <|endoftext|> after a piece that ends a document."""
    encoding = bpe.get_encoding()
    ends = batch["end"] if "end" in batch else [False] * len(batch["text"])
    eot = [bpe.EOT_ID]
    return {"ids": [encoding.encode_ordinary(text) + (eot if end else []) for text, end in zip(batch["text"], ends)]}


def _tokenize_rows(batch: dict) -> dict:
    """Rows (whole documents) -> one row of token ids for the whole batch, each document ending in <|endoftext|>:
    fewer, longer pieces, so the stream's per-piece work (a state copy, a queue hop) is spread over many rows."""
    encoding = bpe.get_encoding()
    ids = []
    for text in batch["text"]:
        ids += encoding.encode_ordinary(text)
        ids.append(bpe.EOT_ID)
    return {"ids": [ids] if ids else []}


def _shard_sizes(total: int, world_size: int) -> tuple[int, float, int]:
    """(n_shards, step, scan) for cutting `total` bytes into a multiple of world_size shards of 64 KiB - 4 MiB: cut
    near each i * step, at the first clean cut within `scan` bytes."""
    shard_bytes = min(max(total // 256, MIN_SHARD_BYTES), MAX_SHARD_BYTES)
    n_shards = max(1, math.ceil(total / (shard_bytes * world_size))) * world_size
    step = total / n_shards
    return n_shards, step, min(int(step) // 2, 1 << 16)  # scan < step, so the cuts increase


def _shard_ranges(path: Path, end: int, world_size: int) -> list[tuple[int, int]]:
    """Cut bytes [0, end) into a multiple of world_size shards of 64 KiB - 4 MiB, each ending at a clean cut."""
    n_shards, step, scan = _shard_sizes(end, world_size)
    with open(path, "rb") as f:
        cuts = [0] + [_clean_cut_after(f, int(i * step), end, scan) for i in range(1, n_shards)] + [end]
    return list(zip(cuts[:-1], cuts[1:]))


def _text_file_shards(paths: list[Path], ends: list[int], world_size: int) -> list[tuple]:
    """Cut the train parts [0, ends[i]) of several files, as if they were one text, into a multiple of world_size
    shards sized like _shard_ranges': tuples of (file index, start, end, ends the file's train part) segments, cut
    at clean cuts (a cut in a file never moves past that file's train part)."""
    starts = list(itertools.accumulate(ends, initial=0))  # offset of each file's train part in the virtual text
    n_shards, step, scan = _shard_sizes(starts[-1], world_size)
    cuts = [(0, 0)]
    for i in range(1, n_shards):
        at = int(i * step)
        index = bisect.bisect_right(starts, at) - 1  # the last file starting at or before `at`: never an empty one
        with open(paths[index], "rb") as f:
            cuts.append((index, _clean_cut_after(f, at - starts[index], ends[index], scan)))
    cuts.append((len(ends) - 1, ends[-1]))
    shards = []
    for (first, start), (last, end) in zip(cuts[:-1], cuts[1:]):
        segments = [(i, start if i == first else 0, end if i == last else ends[i]) for i in range(first, last + 1)]
        shards.append(tuple((i, a, b, b == ends[i]) for i, a, b in segments if b > a))
    return shards


# ----------------------------------------------------------------------------------------------------------------
# Sources: what to train on and what to hold out (toygpt/dataset_source.py has the datasets ones)


def _count_until(id_pieces, needed: int) -> int:
    """Tokens in pieces of token ids, counting (and drawing pieces) only until `needed` is reached."""
    count = 0
    for ids in id_pieces:
        count += len(ids)
        if count >= needed:
            break
    return count


def _count_tokens(path: Path, start: int, end: int, needed: int) -> int:
    """Tokens in bytes [start, end), counting only until `needed` is reached."""
    return _count_until((bpe.encode(text) for text in _pieces(str(path), start, end)), needed)


def validate_input(path: str | Path, block_size: int) -> TextSplit:
    """Raise InputError unless `path` is non-empty UTF-8 text giving >= 1 train and >= 1 val window."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"Input file {path} does not exist. Pass --input PATH to a UTF-8 text file (or a directory or glob of "
            f"them, or a dataset directory), --dataset ID for a Hub dataset, or put your text in ./{DEFAULT_INPUT} "
            "(without any of these, the default tiny Shakespeare corpus is used)."
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


def _check_long_enough(source, block_size: int) -> None:
    """InputError unless the source's training text and held-out text each give block_size+1 tokens (streamed until
    they do)."""
    needed = block_size + 1
    counts = [_count_until(pieces, needed) for pieces in (train_token_pieces(source), _val_token_pieces(source))]
    if min(counts) < needed:
        raise InputError(
            f"{source.describe()} is too short for block_size={block_size}: its training text gives {counts[0]} "
            f"tokens and its held-out text ({source.holdout}) gives {counts[1]}, but each needs at least "
            f"block_size+1 = {needed} tokens. Use more text or a smaller --block-size."
        )


class TextFile:
    """One UTF-8 text file, split like nanoGPT: its first 90% of characters train, its last 10% are held out."""

    holdout = "the last 10% of its characters"
    columns = ["text"]  # of train_examples
    rows_are_documents = False

    def __init__(self, path: str | Path, description: str | None = None):
        self.path = Path(path)
        self.description = description or self.path.name

    @functools.cached_property
    def split(self) -> TextSplit:
        return split_text(self.path)  # one split for this object's life

    def describe(self) -> str:
        return self.description

    def fingerprint(self) -> dict:
        return {"type": "file", "size": self.split.n_bytes, "sha256": self.split.sha256}  # not its name

    def spec(self) -> dict:
        return {"input": str(self.path.resolve())}

    def stream_identity(self, shards: list) -> dict:
        """What TrainWindows' state records of the source (keys other than "path" must match on resume)."""
        return {"path": str(self.path), "n_bytes": self.split.n_bytes}

    def train_shards(self, world_size: int) -> list[tuple[int, int]]:
        return _shard_ranges(self.path, self.split.boundary_byte, world_size)

    def train_examples(self, shards: list[tuple[int, int]]):
        from datasets import IterableDataset
        from datasets.iterable_dataset import ExamplesIterable

        # The private ExamplesIterable, not the public IterableDataset.from_generator: from_generator makes a
        # `Generator` builder, whose __init__ takes a FileLock in the datasets cache and leaves the lock file there
        # (~/.cache/huggingface/datasets/*_generator_default-<hash of generator and gen_kwargs>_0.0.0.lock), one per
        # input file and epoch here, since each epoch's shard order is new gen_kwargs; from_generator has no
        # parameter to avoid it (datasets 5.2.0). Its streaming dataset is an ExamplesIterable over the generator
        # too. A list in the kwargs makes each element a datasets shard (tuples are passed whole). test_data.py pins
        # all of this.
        return IterableDataset(ExamplesIterable(_generate_pieces, {"path": str(self.path), "shards": shards}))

    def val_texts(self) -> Iterator[tuple[str, bool]]:
        for text in _pieces(str(self.path), self.split.boundary_byte, self.split.n_bytes):
            yield text, False


class TextFiles:
    """UTF-8 text files (a directory's, or a glob's matches, in name order), each one document split like a single
    file: its first 90% of characters train, its last 10% are held out."""

    holdout = "the last 10% of each file's characters"
    columns = ["text", "end"]  # of train_examples
    rows_are_documents = False

    def __init__(self, root: Path, paths: list[Path], shown: str, pattern: str):
        # shown: for logs, never absolute ("books/" or "books/*.txt"); pattern: the absolute directory or glob
        self.paths, self.shown, self.pattern = paths, shown, pattern
        self.names = [path.resolve().relative_to(root.resolve()).as_posix() for path in paths]

    @functools.cached_property
    def splits(self) -> list[TextSplit]:
        return [split_text(path) for path in self.paths]  # InputError names a file that is not UTF-8 text

    def describe(self) -> str:
        return f"{self.shown} ({len(self.paths)} text file{'s' * (len(self.paths) != 1)})"

    def fingerprint(self) -> dict:
        files = [{"name": name, "size": split.n_bytes, "sha256": split.sha256}
                 for name, split in zip(self.names, self.splits)]
        return {"type": "text_files", "files": files}

    def spec(self) -> dict:
        return {"input": self.pattern}

    def stream_identity(self, shards: list) -> dict:
        return {"source": self.describe(), "n_bytes": sum(split.n_bytes for split in self.splits),
                "n_shards": len(shards)}

    def train_shards(self, world_size: int) -> list[tuple]:
        return _text_file_shards(self.paths, [split.boundary_byte for split in self.splits], world_size)

    def train_examples(self, shards: list[tuple]):
        from datasets import IterableDataset
        from datasets.iterable_dataset import ExamplesIterable  # why not from_generator: TextFile.train_examples

        paths = tuple(str(path) for path in self.paths)
        return IterableDataset(ExamplesIterable(_generate_file_pieces, {"paths": paths, "shards": shards}))

    def val_texts(self) -> Iterator[tuple[str, bool]]:
        for path, split in zip(self.paths, self.splits):
            yield from _with_last(_pieces(str(path), split.boundary_byte, split.n_bytes))


GLOB_CHARS = re.compile(r"[*?[]")


def _text_files(pattern: str) -> TextFiles:
    """A directory's files, or a glob's: InputError where there are none."""
    path = Path(pattern)
    if path.is_dir():
        root, paths, rest = path, visible_files(path), []
    else:
        fixed = next(i for i, part in enumerate(path.parts) if GLOB_CHARS.search(part))
        root, rest = Path(*path.parts[:fixed]), list(path.parts[fixed:])
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise InputError(f"--input {pattern} holds no files: pass a file, a directory or a glob of UTF-8 text files.")
    shown = "/".join([root.resolve().name, *rest]) + ("/" if not rest else "")
    return TextFiles(root, paths, shown, str(Path(root.resolve(), *rest)))


def _default_input() -> tuple[Path, str]:
    """./input.txt, else the default corpus."""
    if DEFAULT_INPUT.is_file():
        return DEFAULT_INPUT, str(DEFAULT_INPUT)
    try:
        return corpus.default_corpus()
    except corpus.CorpusError as err:
        raise InputError(str(err)) from err


def _local_source(input: str | Path | None, dataset_config: str | None = None, split: str = "train",
                  text_column: str = "text"):
    """What --input names, unchecked: a dataset directory, a directory or glob of text files, or a text file (None:
    ./input.txt, else the default corpus)."""
    if input is not None and Path(input).is_dir() and is_dataset_dir(Path(input)):
        return DatasetSource.local(input, config=dataset_config, split=split, text_column=text_column)
    given = [flag for flag, value, default in (("--dataset-config", dataset_config, None), ("--split", split, "train"),
                                               ("--text-column", text_column, "text")) if value != default]
    if given:
        raise InputError(
            f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to datasets only (--dataset, or --input "
            "DIR holding parquet, jsonl, csv or arrow files), not to text files."
        )
    if input is None:
        return TextFile(*_default_input())
    if Path(input).is_dir() or (not Path(input).exists() and GLOB_CHARS.search(str(input))):
        return _text_files(str(input))
    return TextFile(input)


def resolve_source(input: str | Path | None = None, dataset: str | None = None, dataset_config: str | None = None,
                   split: str = "train", text_column: str = "text", *, block_size: int,
                   dataset_revision: str | None = None):
    """The checked training source and its description: --dataset (a Hub dataset), else --input (a text file, a
    directory or glob of text files, or a dataset directory), else ./input.txt, else the default corpus."""
    if input is not None and dataset is not None:
        raise InputError("Pass either --input (a file, directory or glob) or --dataset (a Hub dataset), not both.")
    split, text_column = split or "train", text_column or "text"  # None: the flag's default
    try:
        if dataset is not None:
            source = DatasetSource.hub(dataset, config=dataset_config, split=split, text_column=text_column,
                                       revision=dataset_revision)
        else:
            source = _local_source(input, dataset_config, split, text_column)
        if isinstance(source, TextFile):
            validate_input(source.path, block_size)
        else:
            _check_long_enough(source, block_size)  # streams until it has enough: reads every text file's split
    except DatasetError as err:
        raise InputError(str(err)) from err
    except OSError as err:  # a file we may not read, a dataset the network dropped while checking it
        raise InputError(f"Cannot read the training data: {err}") from err
    return source, source.describe()


def resolve_input(path: str | Path | None, block_size: int) -> tuple[Path, str]:
    """The validated training text file and a description: the given path, else ./input.txt, else the default
    corpus. (resolve_source also takes directories, globs and datasets.)"""
    path, description = (Path(path), Path(path).name) if path is not None else _default_input()
    validate_input(path, block_size)
    return path, description


# ----------------------------------------------------------------------------------------------------------------
# The training stream


def _as_source(source):
    """A source as it is; a path (a file, a directory, a glob) as the source resolve_source makes of it, unchecked."""
    if hasattr(source, "train_examples"):
        return source
    try:
        return _local_source(source)
    except DatasetError as err:
        raise InputError(str(err)) from err


def _tokenized(source, examples):
    if source.rows_are_documents:
        return examples.map(_tokenize_rows, batched=True, batch_size=ROWS_PER_PIECE, remove_columns=source.columns)
    return examples.map(_tokenize, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=source.columns)


def _epoch_dataset(source, shards: list, seed: int, rank: int, world_size: int, epoch: int):
    """This rank's tokenized pieces for one epoch: a datasets IterableDataset over the shards in a seeded order."""
    from datasets.distributed import split_dataset_by_node

    source = _as_source(source)
    order = np.random.default_rng(seed + epoch).permutation(len(shards))
    ds = source.train_examples([shards[i] for i in order])
    # strategy "auto": with a multiple of world_size shards (text sources always cut so many), each rank gets whole
    # shards; else (a dataset with fewer parts than ranks) each rank keeps every world_size-th example. test_data.py
    # pins this.
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return _tokenized(source, ds)


def train_token_pieces(source) -> Iterator[np.ndarray]:
    """The GPT-2 token ids of the source's whole training text (every rank's), in source order, piece by piece: one
    streaming pass with the stream's own tokenization, so memory stays flat (e.g. to find which ids occur)."""
    source = _as_source(source)
    for example in _tokenized(source, source.train_examples(source.train_shards(1))):
        yield np.asarray(example["ids"], dtype=np.int64)


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
        source,  # from resolve_source, or a text file's path
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
        self.source, self.block_size, self.seed = _as_source(source), block_size, seed
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
            _epoch_dataset, self.source, self.shards, self.seed, self.rank, self.world_size
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
                f"reading training text from {self.source.describe()} failed (rank {self.rank}): {item}"
            ) from item
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
            **self.source.stream_identity(self.shards),  # a text file's: its path and size
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
        identity = self.source.stream_identity(self.shards)
        settings = ("block_size", "seed", "rank", "world_size", "shuffle_buffer")  # state_dict's, from attributes
        mine = {**identity, **{key: getattr(self, key) for key in settings}}
        for key in (*[key for key in identity if key not in ("path", "source")], *settings):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"Cannot resume the data stream: {key} was {state.get(key)} in the checkpoint but is {mine[key]} "
                    f"now. Resume with the same input and settings, or start a fresh run."
                )
        self.close()  # the producer restarts from the restored position
        self.epoch, self.examples_in_epoch, self.dataset_state = state["epoch"], state["examples_in_epoch"], state["dataset"]
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


def _val_token_pieces(source) -> Iterator[np.ndarray]:
    for text, ends_document in source.val_texts():
        yield np.asarray(bpe.encode(text) + ([bpe.EOT_ID] if ends_document else []), dtype=np.int64)


def val_windows(source, block_size: int, max_windows: int | None = None) -> ValWindows:
    """The first `max_windows` (all if None) validation windows, deterministic; streamed from the held-out text of
    `source` (from resolve_source, or a text file's path)."""
    source = _as_source(source)
    n = block_size + 1
    windows, tokens = [], np.zeros(0, dtype=np.int64)
    for ids in _val_token_pieces(source):
        tokens = np.concatenate([tokens, ids])
        while len(tokens) >= n and (max_windows is None or len(windows) < max_windows):
            windows.append(tokens[:n].copy())
            tokens = tokens[block_size:]
        if max_windows is not None and len(windows) >= max_windows:
            break
    if not windows:
        raise InputError(
            f"{source.describe()}: the held-out text ({source.holdout}) is shorter than block_size+1 = {n} tokens."
        )
    stacked = torch.from_numpy(np.stack(windows))
    target_chars = torch.from_numpy(_token_char_counts()[stacked[:, 1:].numpy()].sum(axis=1))
    return ValWindows(stacked, target_chars)
