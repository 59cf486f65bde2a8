"""Documents for the `toygpt_text` lm-evaluation-harness task (toygpt_text.yaml): a local UTF-8 text file, by default
its held-out last 10% of characters, the same text train.py's validation loss reads (toygpt.text_files.split_text)."""

import re
import sys
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # the harness imports this file by path

from toygpt.text_files import split_text  # noqa: E402

SPLITS = ("heldout", "all")
DOCUMENTS = ("paragraphs", "whole")


def read_documents(path, split="heldout", documents="paragraphs"):
    """The task's documents: `split` of the file at `path`, as paragraphs (split at blank lines) or one document."""
    if split not in SPLITS or documents not in DOCUMENTS:
        raise ValueError(f"toygpt_text: split must be one of {SPLITS} and documents one of {DOCUMENTS}; "
                         f"got split={split!r}, documents={documents!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"toygpt_text: {path} is not a file; pass --metadata '{{\"path\": \"input.txt\"}}'")
    data = path.read_bytes()
    start = split_text(path).boundary_byte if split == "heldout" else 0  # InputError where it is not UTF-8 text
    text = data[start:].decode("utf-8")
    docs = [text] if documents == "whole" else [p.strip() for p in re.split(r"\n\s*\n", text)]
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise ValueError(f"toygpt_text: the {split} text of {path} is empty")
    return docs


def load(path=None, split="heldout", documents="paragraphs", **_):
    """custom_dataset hook: the harness passes the task's metadata (`--metadata` JSON merged with the YAML's)."""
    if path is None:
        raise ValueError("toygpt_text: name the text file: --metadata '{\"path\": \"input.txt\"}'")
    rows = [{"text": doc} for doc in read_documents(path, split, documents)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
