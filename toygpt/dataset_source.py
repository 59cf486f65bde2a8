"""A 🤗 datasets dataset as training text: a local directory `datasets` can read (parquet, jsonl/json, csv, arrow)
or a dataset repo on the Hub (wherever HF_ENDPOINT points), streamed with `load_dataset(..., streaming=True)`, so
memory stays flat whatever the dataset's size. It is one of toygpt/sources.py's `Source`s; toygpt/stream.py turns
the rows into tokens and windows.

    source = DatasetSource.hub("alice/corpus", config=None, split="train", text_column="text")  # or .local(dir, ...)
    parts = source.train_shards(world_size)   # the stream permutes them each epoch and splits them across ranks
    source.train_examples(parts)              # IterableDataset of {"text": row} over those parts, in that order
    source.val_texts()                        # the held-out rows, in order
    source.description, source.fingerprint(), source.spec()

Opening checks, before any training, everything that can be checked (DatasetError names what failed and the
fix): the Hub answers and has the dataset (its revision is then pinned to the commit it reported, so the data cannot
change under a run), the config and split exist, the text column exists and holds strings.

Each row is one document. Held-out rows: the dataset's "validation" split when it has one (and --split is not that
split), else the rows whose UTF-8 text has a CRC-32 divisible by HOLDOUT_MODULUS (one row in ten). That rule reads
the text alone, so it does not depend on file order, shards, ranks or epochs, and duplicated rows all land on the
same side. Blank rows (empty, or only whitespace) are no document: skipped on both sides.

Shards: the split's data files, or, when there are few, the row groups of its parquet files (`reshard`), grouped
into at most MAX_PARTS contiguous parts (`IterableDataset.shard`); each epoch concatenates the parts in a new order.
The cap keeps the datasets stream state, saved in every checkpoint, small: it holds a few entries per part.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Iterator

from toygpt.text_files import InputError

# Extensions of the files `load_dataset(directory)` reads (its packaged builders); a directory holding any is a
# dataset directory, any other directory is read as text files (toygpt/sources.py).
DATA_EXTENSIONS = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv")
VALIDATION_SPLIT = "validation"
HOLDOUT_MODULUS = 10
MAX_PARTS = 64
ROW_BATCH = 64  # rows per hold-out filter call


class DatasetError(InputError):
    """The dataset cannot be used; the message names the problem and the fix (sources.py reports it as InputError)."""


def is_dataset_dir(directory: Path) -> bool:
    return any(p.suffix in DATA_EXTENSIONS for p in visible_files(directory))


def visible_files(directory: Path) -> list[Path]:
    """Regular files under `directory`, not hidden and not under a hidden folder (.git, .cache), sorted."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_held_out(text: str) -> bool:
    """The deterministic hold-out of datasets without a validation split: about one row in HOLDOUT_MODULUS."""
    return zlib.crc32(text.encode("utf-8")) % HOLDOUT_MODULUS == 0


def has_text(text: str) -> bool:
    """A row is a document when it holds a character other than whitespace."""
    return bool(text) and not text.isspace()


def _train_rows(batch: list, hold_out: bool) -> list[bool]:
    return [has_text(text) and not (hold_out and is_held_out(text)) for text in batch]


def _hub_error(repo_id: str, err: Exception) -> DatasetError:
    from huggingface_hub import constants, errors

    where = f"the Hub dataset {repo_id} at {constants.ENDPOINT}"
    if isinstance(err, errors.OfflineModeIsEnabled):
        return DatasetError(
            f"Cannot stream {where}: HF_HUB_OFFLINE is set. Unset it, or download the dataset and pass its "
            "directory as --input."
        )
    if isinstance(err, errors.GatedRepoError):
        return DatasetError(f"{where} is gated: accept its terms on the Hub and set HF_TOKEN (or `hf auth login`).")
    if isinstance(err, errors.RepositoryNotFoundError):
        return DatasetError(
            f"{where} does not exist (or is private): check --dataset (owner/name), and set HF_TOKEN for a private one."
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return DatasetError(f"{where} has no such revision: {err}")
    return DatasetError(
        f"Cannot reach {where} ({type(err).__name__}: {err}). Check the network (and HF_ENDPOINT), or download "
        "the dataset and pass its directory as --input."
    )


class DatasetSource:
    """A dataset's train split and held-out rows, checked when opened; see the module docstring."""

    rows_are_documents = True  # see sources.Source

    def __init__(self, path: str, *, hub: bool, config: str | None, split: str, text_column: str,
                 revision: str | None = None):
        from datasets import load_dataset

        self.path, self.hub, self.split, self.text_column, self.revision = path, hub, split, text_column, revision
        self.name, self.config_given = path if hub else Path(path).name, config
        try:
            splits = load_dataset(path, name=config, revision=revision, streaming=True)
        except Exception as err:  # datasets raises ValueError, FileNotFoundError, ConnectionError, ... with a reason
            hint = "" if hub else (
                f" (a directory holding {', '.join(DATA_EXTENSIONS)} files is read as a dataset; to read its text "
                "files instead, pass a glob such as --input 'DIR/*.txt')"
            )
            raise DatasetError(f"Cannot open {self._what()}{hint}: {err}") from err
        if split not in splits:
            raise DatasetError(
                f"{self._what()} has no split {split!r}; it has {sorted(splits)}. Pass one of them as --split."
            )
        train = splits[split]
        self.config = config or train.info.config_name or "default"
        columns = train.column_names or list(next(iter(train), {}))  # features are unknown for a few formats
        if text_column not in columns:
            raise DatasetError(
                f"{self._what()} has no column {text_column!r}; its columns are {columns}. Pass the one holding "
                "the text as --text-column."
            )
        feature = (train.features or {}).get(text_column)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DatasetError(
                f"Column {text_column!r} of {self._what()} holds {feature}, not text. Pass the column holding the "
                f"text as --text-column (columns: {columns})."
            )
        if train.num_shards < MAX_PARTS:  # few files: their row groups give the epochs' shuffled order more parts
            train = train.reshard()
        self.train = self._text_only(train)
        has_validation = VALIDATION_SPLIT in splits and split != VALIDATION_SPLIT
        self.val = self._text_only(splits[VALIDATION_SPLIT]) if has_validation else None
        self.holdout = (
            f"its {VALIDATION_SPLIT!r} split" if has_validation
            else f"the rows whose text has CRC-32 % {HOLDOUT_MODULUS} == 0"
        )
        column = "" if text_column == "text" else f", column {text_column}"
        where = path if hub else f"{self.name}/"
        self.description = f"dataset {where} (config {self.config}, split {split}{column})"

    @classmethod
    def local(cls, directory: str | Path, *, config=None, split="train", text_column="text") -> "DatasetSource":
        return cls(str(Path(directory).resolve()), hub=False, config=config, split=split, text_column=text_column)

    @classmethod
    def hub(cls, repo_id: str, *, config=None, split="train", text_column="text", revision=None) -> "DatasetSource":
        from huggingface_hub import HfApi

        try:  # fast, specific errors (not found, gated, offline, unreachable) before datasets' generic ones
            sha = HfApi().dataset_info(repo_id, revision=revision).sha
        except Exception as err:
            raise _hub_error(repo_id, err) from err
        return cls(repo_id, hub=True, config=config, split=split, text_column=text_column, revision=sha)

    def _what(self) -> str:
        return f"the Hub dataset {self.path}" if self.hub else f"the dataset directory {self.name}/"

    def _text_only(self, ds):
        ds = ds.select_columns([self.text_column])
        return ds if self.text_column == "text" else ds.rename_column(self.text_column, "text")

    # ---- sources.Source -----------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        common = {"config": self.config, "split": self.split, "text_column": self.text_column}
        if self.hub:
            return {"type": "hub_dataset", "dataset": self.path, "revision": self.revision, **common}
        root = Path(self.path)
        files = [{"name": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in visible_files(root)]
        return {"type": "dataset_dir", "files": files, **common}  # names relative to the directory

    def spec(self) -> dict:
        common = {"dataset_config": self.config_given, "split": self.split, "text_column": self.text_column}
        if self.hub:
            return {"dataset": self.path, "dataset_revision": self.revision, **common}
        return {"input": self.path, **common}

    def train_shards(self, world_size: int) -> list[int]:
        """Part indices: at most MAX_PARTS, a multiple of world_size where there are enough (whole parts per rank)."""
        n = min(self.train.num_shards, MAX_PARTS)
        return list(range(n - n % world_size if n >= world_size else n))

    def train_examples(self, parts: list[int]):
        """The training rows ({"text": str}) of these parts, in this order: held-out and blank rows dropped."""
        from datasets import concatenate_datasets

        ds = concatenate_datasets([self.train.shard(num_shards=len(parts), index=i) for i in parts])
        return ds.filter(_train_rows, input_columns=["text"], batched=True, batch_size=ROW_BATCH,
                         fn_kwargs={"hold_out": self.val is None})

    def val_texts(self) -> Iterator[tuple[str, bool]]:
        """The held-out rows in dataset order, as (text, ends a document) pairs: each row is a whole document."""
        for example in self.val if self.val is not None else self.train:
            text = example["text"]
            if has_text(text) and (self.val is not None or is_held_out(text)):
                yield text, True
