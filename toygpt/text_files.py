"""Text files as training text: the UTF-8 checks (with the fix to suggest), nanoGPT's 90/10 split by characters,
and the train parts cut into shards and read back as pieces of text.

The split, as nanoGPT: with `text` the whole file decoded as UTF-8 (newlines untranslated),
`n = len(text); train = text[:int(n * 0.9)]; val = text[int(n * 0.9):]`. We find the character count and the byte
offset of that boundary by streaming the file in chunks, so memory does not grow with the file size.

Shards: a file's train bytes are cut into byte ranges of 64 KiB - 4 MiB, at clean cuts (several files' train parts
are cut as one text, so a shard may span files), read back as ~16 KiB pieces of text. Pieces are cut where the GPT-2
pre-tokenizer splits anyway, so the tokens of the pieces are exactly those of tokenizing the text in one go.
toygpt/sources.py makes sources of files; toygpt/stream.py streams them.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import math
import re
from pathlib import Path
from typing import Iterator, NamedTuple

from toygpt.errors import UsageError

VAL_FRACTION = 0.1

SCAN_CHUNK = 1 << 20  # bytes read at a time when scanning the file
PIECE_BYTES = 16 << 10  # bytes of text per datasets example (one tokenizer call each)
MIN_SHARD_BYTES, MAX_SHARD_BYTES = 64 << 10, 4 << 20
# A "clean cut" is just before a newline that precedes a non-space character ("word\n\nWord" -> "word\n" +
# "\nWord"): the GPT-2 pre-tokenizer ends a whitespace run's first token there and starts a new one at that
# newline, so pieces cut there tokenize exactly like the whole text. Cutting after the newline would not ("\n\n"
# ending a piece is one token; followed by a word it is two).
CLEAN_CUT = re.compile(rb"\n(?=\S)")
SPACE_BYTES = b" \t\n\r\f\v"


class InputError(UsageError):
    """The training text is unusable; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Scanning and the split


class TextSplit(NamedTuple):
    n_bytes: int
    n_chars: int
    train_chars: int  # int(n_chars * 0.9): the train part is text[:train_chars]
    boundary_byte: int  # byte offset of text[train_chars]: train = bytes[:boundary_byte], val = the rest
    sha256: str  # of the file's bytes (dataset_source.file_sha256's digest), hashed while scanning
    blank: bool  # no character but whitespace (or none at all): nothing to learn from


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
    chunks, n_chars, digest, has_text = [], 0, hashlib.sha256(), False
    for offset, text in _decoded_chunks(path, digest):
        chunks.append((offset, n_chars))
        n_chars += len(text)
        has_text = has_text or (bool(text) and not text.isspace())  # isspace stops at the first other character
    train_chars = int(n_chars * (1 - VAL_FRACTION))
    boundary_byte = key[1]
    for (offset, chars_before), nxt in zip(chunks, chunks[1:] + [(key[1], n_chars)]):
        if chars_before <= train_chars < nxt[1]:
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read(nxt[0] - offset).decode("utf-8")
            boundary_byte = offset + len(text[: train_chars - chars_before].encode("utf-8"))
            break
    return TextSplit(key[1], n_chars, train_chars, boundary_byte, digest.hexdigest(), not has_text)


def split_text(path: str | Path) -> TextSplit:
    """The train/val split of a UTF-8 file, computed by streaming (cached per path, size and mtime)."""
    return _scan(_file_key(Path(path)))


# ----------------------------------------------------------------------------------------------------------------
# Reading pieces of text


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


def pieces(path: str, start: int, end: int) -> Iterator[str]:
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


def generate_pieces(path: str, shards: list[tuple[int, int]]):
    """datasets example generator: (key, {"text": piece, "end": False}) for each piece of each byte-range shard."""
    for start, end in shards:
        for i, text in enumerate(pieces(path, start, end)):
            yield f"{start}:{i}", {"text": text, "end": False}  # a single file is one document, with no end token


def with_last(items: Iterator) -> Iterator[tuple[object, bool]]:
    """(item, whether it is the last) for each item."""
    previous = sentinel = object()
    for item in items:
        if previous is not sentinel:
            yield previous, False
        previous = item
    if previous is not sentinel:
        yield previous, True


def generate_file_pieces(paths: tuple[str, ...], shards: list[tuple]):
    """datasets example generator for text files: (key, {"text": piece, "end": ends a document}) for each piece of
    each shard, a shard being (file index, start, end, the file's train part ends there) byte-range segments."""
    for segments in shards:
        for index, start, end, ends_document in segments:
            for i, (text, last) in enumerate(with_last(pieces(paths[index], start, end))):
                yield f"{index}:{start}:{i}", {"text": text, "end": ends_document and last}


# ----------------------------------------------------------------------------------------------------------------
# Shards


def _shard_sizes(total: int, world_size: int) -> tuple[int, float, int]:
    """(n_shards, step, scan) for cutting `total` bytes into a multiple of world_size shards of 64 KiB - 4 MiB: cut
    near each i * step, at the first clean cut within `scan` bytes."""
    shard_bytes = min(max(total // 256, MIN_SHARD_BYTES), MAX_SHARD_BYTES)
    n_shards = max(1, math.ceil(total / (shard_bytes * world_size))) * world_size
    step = total / n_shards
    return n_shards, step, min(int(step) // 2, 1 << 16)  # scan < step, so the cuts increase


def shard_ranges(path: Path, end: int, world_size: int) -> list[tuple[int, int]]:
    """Cut bytes [0, end) into a multiple of world_size shards of 64 KiB - 4 MiB, each ending at a clean cut."""
    n_shards, step, scan = _shard_sizes(end, world_size)
    with open(path, "rb") as f:
        cuts = [0] + [_clean_cut_after(f, int(i * step), end, scan) for i in range(1, n_shards)] + [end]
    return list(zip(cuts[:-1], cuts[1:]))


def text_file_shards(paths: list[Path], ends: list[int], world_size: int) -> list[tuple]:
    """Cut the train parts [0, ends[i]) of several files, as if they were one text, into a multiple of world_size
    shards sized like shard_ranges': tuples of (file index, start, end, ends the file's train part) segments, cut
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

