"""Training sources: what to train on and what to hold out, checked before training, and their text as tokens.

    source, description = resolve_source(input=args.input, dataset=args.dataset, dataset_config=...,
                                         split="train", text_column="text", block_size=256)  # InputError: the fix
    source.description, source.fingerprint(), source.spec()      # log line, identity, resolve_source kwargs
    for ids in train_token_pieces(source): ...                    # the whole training text's tokens, one pass
    path, description = resolve_input(args.input, block_size)    # the file-only form

`resolve_source` picks and checks one of the three kinds of `Source`:
  * a text file (TextFile): nanoGPT's split, its first 90% of characters train, the rest is held out
    (toygpt/text_files.py).
  * a directory of text files, or a glob of them (TextFiles): every file is one document, split the same way. A file
    that is empty or holds only whitespace is no document: it is skipped, and the description says how many were.
  * a directory `datasets` reads (parquet, jsonl, csv, arrow files), or a Hub dataset (--dataset): see
    toygpt/dataset_source.py. Each row is a document; the held-out rows are the "validation" split, else a fixed tenth.
Documents end with GPT-2's <|endoftext|> token, as in nanoGPT's OpenWebText prepare.py (a single file is one
document and gets none, so its tokens are exactly those of its text). With neither --input nor --dataset it takes
./input.txt, else the default corpus (tiny Shakespeare, which toygpt/corpus.py fetches or assembles).
"""

from __future__ import annotations

import functools
import glob
import re
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from toygpt import bpe
from toygpt import corpus
from toygpt.defaults import DEFAULT_INPUT
from toygpt.dataset_source import DatasetError, DatasetSource, is_dataset_dir, visible_files
from toygpt.text_files import (InputError, TextSplit, generate_file_pieces, generate_pieces, pieces, shard_ranges,
                               split_text, text_file_shards, with_last)

TOKENIZE_BATCH = 8  # text pieces per batched map call
ROWS_PER_PIECE = 64  # dataset rows (documents) tokenized into one piece
GLOB_CHARS = re.compile(r"[*?[]")


class Source(Protocol):
    """Training text and its held-out text: TextFile, TextFiles and dataset_source.DatasetSource.

    `description` is the one line that names it (logs, errors, the model card). `fingerprint()` is its one identity:
    what the text is (sizes and hashes, or a Hub dataset's pinned revision), not where it lies, so a resumed run can
    check it reads the same text. `spec()` says where it lies: the resolve_source arguments that open it again.
    """

    description: str
    holdout: str  # which text is held out, in words (for errors)
    rows_are_documents: bool  # train_examples' rows are whole documents ({"text"}), not pieces ({"text", "end"})

    def fingerprint(self) -> dict: ...

    def spec(self) -> dict: ...

    def train_shards(self, world_size: int) -> list:
        """Shards of the training text: a multiple of world_size where there are enough (whole shards per rank)."""

    def train_examples(self, shards: list):
        """A datasets IterableDataset of the training text of `shards`, in that order."""

    def val_texts(self) -> Iterator[tuple[str, bool]]:
        """The held-out text in a fixed order, as (text, ends a document) pairs."""


class TextFile:
    """One UTF-8 text file, split like nanoGPT: its first 90% of characters train, its last 10% are held out."""

    holdout = "the last 10% of its characters"
    rows_are_documents = False

    def __init__(self, path: str | Path, description: str | None = None):
        self.path = Path(path)
        self.description = description or self.path.name

    @functools.cached_property
    def split(self) -> TextSplit:
        return split_text(self.path)  # one split for this object's life

    def fingerprint(self) -> dict:
        return {"type": "file", "size": self.split.n_bytes, "sha256": self.split.sha256}  # not its name

    def spec(self) -> dict:
        return {"input": str(self.path.resolve())}

    def train_shards(self, world_size: int) -> list[tuple[int, int]]:
        return shard_ranges(self.path, self.split.boundary_byte, world_size)

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
        return IterableDataset(ExamplesIterable(generate_pieces, {"path": str(self.path), "shards": shards}))

    def val_texts(self) -> Iterator[tuple[str, bool]]:
        for text in pieces(str(self.path), self.split.boundary_byte, self.split.n_bytes):
            yield text, False


class TextFiles:
    """UTF-8 text files (a directory's, or a glob's matches, in name order), each one document split like a single
    file: its first 90% of characters train, its last 10% are held out. Blank files (empty, or only whitespace) are
    skipped: they would add nothing but whitespace and an <|endoftext|>."""

    holdout = "the last 10% of each file's characters"
    rows_are_documents = False

    def __init__(self, root: Path, paths: list[Path], shown: str, pattern: str):
        # shown: for logs, never absolute ("books/" or "books/*.txt"); pattern: the absolute directory or glob
        self.paths, self.shown, self.pattern = paths, shown, pattern
        self.names = [path.resolve().relative_to(root.resolve()).as_posix() for path in paths]

    @functools.cached_property
    def splits(self) -> list[TextSplit]:
        return [split_text(path) for path in self.paths]  # InputError names a file that is not UTF-8 text

    @functools.cached_property
    def description(self) -> str:
        n, blank = len(self.paths), sum(split.blank for split in self.splits)
        skipped = f", {blank} blank skipped" if blank else ""
        return f"{self.shown} ({n} text file{'s' * (n != 1)}{skipped})"

    def fingerprint(self) -> dict:
        files = [{"name": name, "size": split.n_bytes, "sha256": split.sha256}
                 for name, split in zip(self.names, self.splits)]
        return {"type": "text_files", "files": files}

    def spec(self) -> dict:
        return {"input": self.pattern}

    def _train_ends(self) -> list[int]:
        return [0 if split.blank else split.boundary_byte for split in self.splits]  # a blank file trains nothing

    def train_shards(self, world_size: int) -> list[tuple]:
        return text_file_shards(self.paths, self._train_ends(), world_size)

    def train_examples(self, shards: list[tuple]):
        from datasets import IterableDataset
        from datasets.iterable_dataset import ExamplesIterable  # why not from_generator: TextFile.train_examples

        paths = tuple(str(path) for path in self.paths)
        return IterableDataset(ExamplesIterable(generate_file_pieces, {"paths": paths, "shards": shards}))

    def val_texts(self) -> Iterator[tuple[str, bool]]:
        for path, split in zip(self.paths, self.splits):
            if not split.blank:
                yield from with_last(pieces(str(path), split.boundary_byte, split.n_bytes))


# ----------------------------------------------------------------------------------------------------------------
# A source's text as GPT-2 tokens


def _tokenize(batch: dict) -> dict:
    """Pieces of text -> token ids, one row per piece; <|endoftext|> after a piece that ends a document."""
    encoding = bpe.get_encoding()
    eot = [bpe.EOT_ID]
    ids = [encoding.encode_ordinary(text) + (eot if end else []) for text, end in zip(batch["text"], batch["end"])]
    return {"ids": ids}


def _tokenize_rows(batch: dict) -> dict:
    """Rows (whole documents) -> one row of token ids for the whole batch, each document ending in <|endoftext|>:
    fewer, longer pieces, so the stream's per-piece work (a state copy, a queue hop) is spread over many rows."""
    encoding = bpe.get_encoding()
    ids = []
    for text in batch["text"]:
        ids += encoding.encode_ordinary(text)
        ids.append(bpe.EOT_ID)
    return {"ids": [ids] if ids else []}


def tokenized(source: Source, examples):
    """`examples` (of source.train_examples) as {"ids": token ids}, a piece (or ROWS_PER_PIECE rows) per example."""
    if source.rows_are_documents:
        return examples.map(_tokenize_rows, batched=True, batch_size=ROWS_PER_PIECE, remove_columns=["text"])
    return examples.map(_tokenize, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=["text", "end"])


def train_token_pieces(source: Source | str | Path) -> Iterator[np.ndarray]:
    """The GPT-2 token ids of the source's whole training text (every rank's), in source order, piece by piece: one
    streaming pass with the stream's own tokenization, so memory stays flat (e.g. to find which ids occur)."""
    source = as_source(source)
    for example in tokenized(source, source.train_examples(source.train_shards(1))):
        yield np.asarray(example["ids"], dtype=np.int64)


def count_train_tokens(source: Source, needed: int) -> int:
    """Tokens in the training split, counting (one streaming pass at most) only until `needed` is reached."""
    return _count_until(train_token_pieces(source), needed)


def val_token_pieces(source: Source) -> Iterator[np.ndarray]:
    """The GPT-2 token ids of the held-out text, in its fixed order, piece by piece."""
    for text, ends_document in source.val_texts():
        yield np.asarray(bpe.encode(text) + ([bpe.EOT_ID] if ends_document else []), dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# The checks before training


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
    return _count_until((bpe.encode(text) for text in pieces(str(path), start, end)), needed)


def validate_input(path: str | Path, block_size: int) -> TextSplit:
    """Raise InputError unless `path` is UTF-8 text, not only whitespace, giving >= 1 train and >= 1 val window."""
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
    if split.blank:
        raise InputError(f"Input file {path} holds only whitespace (spaces, tabs, newlines). Put some UTF-8 text in "
                         "it (tiny Shakespeare is ~1 MB).")
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


def _check_long_enough(source: Source, block_size: int) -> None:
    """InputError unless the source's training text and held-out text each give block_size+1 tokens (streamed until
    they do)."""
    if isinstance(source, TextFiles) and all(split.blank for split in source.splits):
        raise InputError(f"--input {source.shown} holds no text: each of its files is empty or only whitespace. "
                         "Put some UTF-8 text in them.")
    needed = block_size + 1
    counts = [_count_until(ids, needed) for ids in (train_token_pieces(source), val_token_pieces(source))]
    if min(counts) < needed:
        raise InputError(
            f"{source.description} is too short for block_size={block_size}: its training text gives {counts[0]} "
            f"tokens and its held-out text ({source.holdout}) gives {counts[1]}, but each needs at least "
            f"block_size+1 = {needed} tokens. Use more text or a smaller --block-size."
        )


# ----------------------------------------------------------------------------------------------------------------
# Resolving the flags to a source


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
                  text_column: str = "text") -> Source:
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


def as_source(source: Source | str | Path) -> Source:
    """A source as it is; a path (a file, a directory, a glob) as the source resolve_source makes of it, unchecked."""
    if not isinstance(source, (str, Path)):
        return source
    return _local_source(source)


def resolve_source(input: str | Path | None = None, dataset: str | None = None, dataset_config: str | None = None,
                   split: str = "train", text_column: str = "text", *, block_size: int,
                   dataset_revision: str | None = None) -> tuple[Source, str]:
    """The checked training source and its description: --dataset (a Hub dataset), else --input (a text file, a
    directory or glob of text files, or a dataset directory), else ./input.txt, else the default corpus."""
    if input is not None and dataset is not None:
        raise InputError("Pass either --input (a file, directory or glob) or --dataset (a Hub dataset), not both.")
    if input is not None and not str(input).strip():  # Path("") is the current directory: never meant
        raise InputError(f"the input path {str(input)!r} is empty; pass a text file, a directory or a glob of them "
                         "(was a shell variable unset?).")
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
    except OSError as err:  # a file we may not read, a dataset the network dropped while checking it
        raise InputError(f"Cannot read the training data: {err}") from err
    return source, source.description


def resolve_input(path: str | Path | None, block_size: int) -> tuple[Path, str]:
    """The validated training text file and a description: the given path, else ./input.txt, else the default
    corpus. (resolve_source also takes directories, globs and datasets.)"""
    path, description = (Path(path), Path(path).name) if path is not None else _default_input()
    validate_input(path, block_size)
    return path, description
