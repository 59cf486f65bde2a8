"""sources.resolve_source beyond one file: directories and globs of text files, a local parquet dataset, a dataset repo
on the stand-in Hub (streamed over HTTP): hold-outs, exact resume, disjoint ranks, errors, flat memory."""

import io
import json
import re
import socket
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from toygpt import bpe
from toygpt import sources, text_files
from toygpt.stream import TrainWindows, val_windows
from toygpt.text_files import InputError
from conftest import REPO, run_python
from hub_server import FakeHub

BLOCK = 16


def lines(tag, n, doc=""):
    """Lines carrying unique markers `<tag>000123;`, so any window can be traced to its lines."""
    return "".join(f"{tag}{doc}{i:06d}; some words of text number {i:06d}\n" for i in range(n))


def markers(window, tags="TV"):
    return set(re.findall(rf"([{tags}]\w*\d{{6}});", bpe.decode(window.tolist())))


def take(stream, n):
    return [next(stream) for _ in range(n)]


def write_text_dir(root, n_files=3, n_lines=300):
    """Files whose first 90% of characters carry T markers and whose last 10% carry V markers, as the split cuts."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        train, val = lines("T", 9 * n_lines // 10, f"f{i}x"), lines("V", n_lines // 10, f"f{i}x")
        assert len(train) == 9 * len(val)
        (root / f"doc{i}.txt").write_text(train + val, encoding="utf-8")
    return root


def rows(tag, n):
    return [f"{tag}{i:06d}; row text {'word ' * (i % 9)}number {i}" for i in range(n)]


def write_parquet(path, texts, row_group_size=50, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=row_group_size)
    return path


def held_out(text):
    return zlib.crc32(text.encode("utf-8")) % 10 == 0


# ---------------------------------------------------------------------------------------------------------------
# Text files: a directory or a glob


def test_text_directory_holds_out_each_files_last_tenth(tmp_path):
    root = write_text_dir(tmp_path / "books")
    (root / ".hidden.txt").write_text("H000001; never read\n" * 50)
    source, description = sources.resolve_source(input=str(root), block_size=BLOCK)
    assert description == "books/ (3 text files)" and source.description == description
    assert str(tmp_path) not in description
    stream = TrainWindows(source, BLOCK, shuffle_buffer=32)
    seen = set()
    for window in take(stream, 600):  # more than one epoch
        seen |= markers(window, "TVH")
    stream.close()
    assert seen and all(m.startswith("T") for m in seen)
    assert {m[:3] for m in seen} == {"Tf0", "Tf1", "Tf2"}
    val = val_windows(source, BLOCK)
    val_seen = set().union(*(markers(w, "TVH") for w in val.windows))
    assert val_seen and all(m.startswith("V") for m in val_seen)


def test_text_files_tokenize_as_documents_ending_in_endoftext(tmp_path):
    root = write_text_dir(tmp_path / "books", n_files=4, n_lines=2000)
    source, _ = sources.resolve_source(input=str(root / "doc*.txt"), block_size=BLOCK)
    texts = [(root / f"doc{i}.txt").read_text(encoding="utf-8") for i in range(4)]
    expected = []
    for text in texts:
        expected += bpe.encode(text[: int(len(text) * 0.9)]) + [bpe.EOT_ID]
    assert len(source.train_shards(2)) % 2 == 0 and len(source.train_shards(1)) > 1  # several shards
    assert [t for ids in sources.train_token_pieces(source) for t in ids.tolist()] == expected
    # the held-out windows: each file's last 10%, each ending its document; EOT targets count no characters
    val = val_windows(source, BLOCK)
    covered = bpe.decode([t for t in val.windows[:, 1:].flatten().tolist() if t != bpe.EOT_ID])
    assert val.target_chars.sum().item() == len(covered)


def test_blank_files_in_a_directory_are_skipped_and_counted(tmp_path):
    # An empty or whitespace-only file holds no document: skipped (not refused, one blank file among many should not
    # stop a run), and the description says so; a directory of nothing but blank files is refused.
    root = write_text_dir(tmp_path / "books")
    plain, _ = sources.resolve_source(input=str(root), block_size=BLOCK)
    expected = [ids.tolist() for ids in sources.train_token_pieces(plain)]
    expected_val = val_windows(plain, BLOCK).windows
    (root / "doc1b.txt").write_text(" \n\t\n   \n" * 3000)
    (root / "doc9.txt").write_text("")
    source, description = sources.resolve_source(input=str(root), block_size=BLOCK)
    assert description == "books/ (5 text files, 2 blank skipped)"
    assert [ids.tolist() for ids in sources.train_token_pieces(source)] == expected
    assert torch.equal(val_windows(source, BLOCK).windows, expected_val)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("\n\n  \n" * 3000)
    (blank / "b.txt").write_text("")
    with pytest.raises(InputError, match=r"--input blank/ holds no text: each of its files is empty or only whitespace"):
        sources.resolve_source(input=str(blank), block_size=BLOCK)


def test_glob_takes_only_its_matches(tmp_path):
    root = write_text_dir(tmp_path / "corpus")
    (root / "notes.md").write_text("M000001; not matched\n" * 200)
    source, description = sources.resolve_source(input=str(root / "*.txt"), block_size=BLOCK)
    assert description == "corpus/*.txt (3 text files)"
    assert source.spec() == {"input": str(root.resolve() / "*.txt")}
    assert [f["name"] for f in source.fingerprint()["files"]] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    with pytest.raises(InputError, match=r"holds no files"):
        sources.resolve_source(input=str(root / "*.rst"), block_size=BLOCK)


def test_text_file_fingerprint_changes_with_the_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(lines("T", 400))
    source, _ = sources.resolve_source(input=str(path), block_size=BLOCK)
    before = source.fingerprint()
    assert before["type"] == "file" and before["size"] == path.stat().st_size
    assert str(tmp_path) not in json.dumps(before)
    moved = tmp_path / "b.txt"
    moved.write_bytes(path.read_bytes())
    assert sources.resolve_source(input=str(moved), block_size=BLOCK)[0].fingerprint() == before  # content, not name
    path.write_text(lines("T", 400).replace("T000007", "T000008"))
    assert sources.resolve_source(input=str(path), block_size=BLOCK)[0].fingerprint() != before


def test_bad_text_files_are_named(tmp_path):
    root = write_text_dir(tmp_path / "mixed", n_files=2)
    (root / "z.txt").write_bytes("é".encode("utf-16"))
    with pytest.raises(InputError, match=r"z\.txt is UTF-16 text.*iconv -f UTF-16 -t UTF-8"):
        sources.resolve_source(input=str(root), block_size=BLOCK)
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("a few words\n")
    with pytest.raises(InputError, match=r"short/ \(1 text file\) is too short for block_size=16.*--block-size"):
        sources.resolve_source(input=str(short), block_size=BLOCK)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no files"):
        sources.resolve_source(input=str(empty), block_size=BLOCK)


def test_dataset_flags_with_a_text_input_are_refused(tmp_path):
    root = write_text_dir(tmp_path / "books")
    with pytest.raises(InputError, match=r"--text-column applies to datasets only"):
        sources.resolve_source(input=str(root), text_column="body", block_size=BLOCK)
    with pytest.raises(InputError, match=r"--dataset-config and --split apply to datasets only"):
        sources.resolve_source(input=str(root), dataset_config="en", split="test", block_size=BLOCK)
    assert sources.resolve_source(input=str(root), split=None, text_column=None, block_size=BLOCK)[0].paths
    with pytest.raises(InputError, match=r"either --input .* or --dataset"):
        sources.resolve_source(input=str(root), dataset="alice/corpus", block_size=BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# A local datasets directory (parquet)


def test_parquet_without_validation_split_holds_out_a_tenth_of_rows(tmp_path):
    texts = rows("T", 3000)
    write_parquet(tmp_path / "pq" / "train.parquet", texts, n=list(range(3000)))
    source, description = sources.resolve_source(input=str(tmp_path / "pq"), block_size=BLOCK)
    assert description == "dataset pq/ (config default, split train)"
    assert source.spec() == {"input": str((tmp_path / "pq").resolve()), "dataset_config": None, "split": "train",
                             "text_column": "text"}
    assert sources.resolve_source(**source.spec(), block_size=BLOCK)[0].fingerprint() == source.fingerprint()
    train = [t for t in texts if not held_out(t)]
    assert 0.05 < 1 - len(train) / len(texts) < 0.15
    # one pass over the training rows, in dataset order, each row a document
    expected = [t for text in train for t in bpe.encode(text) + [bpe.EOT_ID]]
    assert [t for ids in sources.train_token_pieces(source) for t in ids.tolist()] == expected
    # held-out rows never reach training; validation reads exactly them
    val = val_windows(source, BLOCK)
    held = {t.split(";")[0] for t in texts if held_out(t)}
    val_seen = set().union(*(markers(w, "T") for w in val.windows))
    assert val_seen and val_seen <= held
    stream = TrainWindows(source, BLOCK, shuffle_buffer=16)
    train_seen = set().union(*(markers(w, "T") for w in take(stream, 3000)))
    stream.close()
    assert len(train_seen) > 2000 and not train_seen & held


def test_blank_rows_are_no_documents(tmp_path):
    # A whitespace-only row is skipped like an empty one, on both sides: no "   " + <|endoftext|> documents.
    texts = rows("T", 600)
    blanks = ["", "   ", "\t\n", " \t\n"] * 50  # "\t\n" falls in the CRC-32 hold-out
    write_parquet(tmp_path / "pq" / "train.parquet", [t for pair in zip(texts, blanks * 3) for t in pair])
    source, _ = sources.resolve_source(input=str(tmp_path / "pq"), block_size=BLOCK)
    expected = [t for text in texts if not held_out(text) for t in bpe.encode(text) + [bpe.EOT_ID]]
    assert [t for ids in sources.train_token_pieces(source) for t in ids.tolist()] == expected
    held = [t for text in texts if held_out(text) for t in bpe.encode(text) + [bpe.EOT_ID]]
    assert [t for ids in sources.val_token_pieces(source) for t in ids.tolist()] == held


def test_parquet_validation_split_is_the_held_out_text(tmp_path):
    root = tmp_path / "ds"
    write_parquet(root / "data" / "train-00000-of-00002.parquet", rows("T", 800))
    write_parquet(root / "data" / "train-00001-of-00002.parquet", rows("U", 800))
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", rows("V", 300))
    source, _ = sources.resolve_source(input=str(root), block_size=BLOCK)
    assert source.holdout == "its 'validation' split"
    assert [t for ids in sources.train_token_pieces(source) for t in ids.tolist()] == [
        t for text in rows("T", 800) + rows("U", 800) for t in bpe.encode(text) + [bpe.EOT_ID]]
    val = val_windows(source, BLOCK)
    assert set().union(*(markers(w, "TUV") for w in val.windows)) <= {f"V{i:06d}" for i in range(300)}
    covered = bpe.decode([t for t in val.windows[:, 1:].flatten().tolist() if t != bpe.EOT_ID])
    assert val.target_chars.sum().item() == len(covered)  # bits per character: characters of the targets
    assert torch.equal(val_windows(str(root), BLOCK).windows, val.windows)  # a path works too (quantize.py)


def test_dataset_errors_name_the_fix(tmp_path):
    write_parquet(tmp_path / "pq" / "train.parquet", rows("T", 200), body=rows("B", 200), n=list(range(200)))
    src = str(tmp_path / "pq")
    columns = r"no column 'content'; its columns are \['text', 'body', 'n'\].*--text-column"
    with pytest.raises(InputError, match=columns):
        sources.resolve_source(input=src, text_column="content", block_size=BLOCK)
    with pytest.raises(InputError, match=r"Column 'n' .* holds .*int64.*not text.*--text-column"):
        sources.resolve_source(input=src, text_column="n", block_size=BLOCK)
    with pytest.raises(InputError, match=r"no split 'test'; it has \['train'\].*--split"):
        sources.resolve_source(input=src, split="test", block_size=BLOCK)
    source, description = sources.resolve_source(input=src, text_column="body", block_size=BLOCK)
    assert description == "dataset pq/ (config default, split train, column body)"
    val = val_windows(source, BLOCK, max_windows=8).windows
    assert any(markers(w, "B") for w in val) and not any(markers(w, "T") for w in val)
    write_parquet(tmp_path / "tiny" / "train.parquet", ["one row"])
    with pytest.raises(InputError, match=r"too short for block_size=16"):
        sources.resolve_source(input=str(tmp_path / "tiny"), block_size=BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# Exact resume and disjoint ranks, for every kind of source


def make_source(kind, tmp_path):
    if kind == "text_dir":
        return str(write_text_dir(tmp_path / "books", n_files=5, n_lines=700))
    if kind == "parquet":
        for i, tag in enumerate("TU"):
            write_parquet(tmp_path / "pq" / f"train-{i}.parquet", rows(tag, 2000), row_group_size=100)
        return str(tmp_path / "pq")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["text_dir", "parquet"])
def test_exact_resume(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "MIN_SHARD_BYTES", 8 << 10)  # several shards from small files
    source, _ = sources.resolve_source(input=make_source(kind, tmp_path), block_size=BLOCK)
    kwargs = dict(seed=3, shuffle_buffer=16)
    reference = TrainWindows(source, BLOCK, **kwargs)
    windows, epochs = [], []
    while len(epochs) < 200 or epochs[-200] < 1:  # into the second epoch
        windows.append(next(reference))
        epochs.append(reference.epoch)
    reference.close()
    boundary = epochs.index(1)
    stream = TrainWindows(source, BLOCK, **kwargs)
    taken = 0
    for k in (1, 77, boundary - 1, boundary + 5):
        take(stream, k - taken)
        taken = k
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = TrainWindows(source, BLOCK, **kwargs)
        resumed.load_state_dict(state)
        for expected in windows[k : k + 40]:
            assert torch.equal(next(resumed), expected), f"resumed after {k} windows"
        resumed.close()
    stream.close()
    first = [tuple(w.tolist()) for w in windows[:100]]
    assert first != [tuple(w.tolist()) for w in windows[boundary : boundary + 100]]  # a new order each epoch


@pytest.mark.parametrize("kind", ["text_dir", "parquet"])
def test_two_ranks_see_disjoint_text(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "MIN_SHARD_BYTES", 8 << 10)
    source, _ = sources.resolve_source(input=make_source(kind, tmp_path), block_size=BLOCK)
    seen = []
    for rank in (0, 1):
        stream = TrainWindows(source, BLOCK, rank=rank, world_size=2, shuffle_buffer=8)
        windows = []
        while stream.epoch == 0:
            windows.append(next(stream))
        stream.close()
        seen.append(set().union(*(markers(w, "TU") for w in windows)))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0]) > 0.3 * len(seen[0] | seen[1])  # both ranks get a fair part


def test_dataset_with_fewer_parts_than_ranks_splits_rows(tmp_path):
    path = tmp_path / "one" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows("T", 1500)))
    source, _ = sources.resolve_source(input=str(path.parent), block_size=BLOCK)
    assert source.train_shards(2) == [0]  # one file: datasets gives each rank every other row
    seen = []
    for rank in (0, 1):
        stream = TrainWindows(source, BLOCK, rank=rank, world_size=2, shuffle_buffer=8)
        seen.append(set().union(*(markers(w, "T") for w in take(stream, 300))))
        stream.close()
    assert seen[0] and seen[1] and not seen[0] & seen[1]


# ---------------------------------------------------------------------------------------------------------------
# A dataset repo on the stand-in Hub, streamed over HTTP

HUB_PROBE = """
import json, sys
import torch
from toygpt import bpe, sources
from toygpt.stream import TrainWindows, val_windows
from toygpt.text_files import InputError
out = {}
source, out["description"] = sources.resolve_source(dataset="alice/corpus", block_size=16)
out["fingerprint"], out["spec"], out["holdout"] = source.fingerprint(), source.spec(), source.holdout
stream = TrainWindows(source, 16, shuffle_buffer=8)
first = [next(stream) for _ in range(30)]
state = json.loads(json.dumps(stream.state_dict()))
after = [next(stream) for _ in range(20)]
stream.close()
resumed = TrainWindows(source, 16, shuffle_buffer=8)
resumed.load_state_dict(state)
out["resumed_exactly"] = all(torch.equal(next(resumed), w) for w in after)
resumed.close()
out["train_text"] = [bpe.decode(w.tolist()) for w in first]
out["val_text"] = [bpe.decode(w.tolist()) for w in val_windows(source, 16, max_windows=20).windows]
for kwargs in ({"dataset": "alice/missing"}, {"dataset": "alice/corpus", "dataset_config": "nope"},
               {"dataset": "alice/corpus", "text_column": "body"}):
    try:
        sources.resolve_source(block_size=16, **kwargs)
    except InputError as err:
        out.setdefault("errors", []).append(str(err))
print(json.dumps(out))
"""

ERROR_PROBE = """
from toygpt import sources
from toygpt.text_files import InputError
try:
    sources.resolve_source(dataset="alice/corpus", block_size=16)
except InputError as err:
    print(err)
"""


def hub_env(url, home):
    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    return env


@pytest.fixture
def hub(tmp_path):
    hub = FakeHub(tmp_path / "hub")
    hub.start()
    files = {}
    for name, tag, n in (("train-00000-of-00002", "T", 600), ("train-00001-of-00002", "U", 600),
                         ("validation-00000-of-00001", "V", 200)):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": rows(tag, n)}), buffer, row_group_size=100)
        files[f"data/{name}.parquet"] = buffer.getvalue()
    files["README.md"] = b"---\nlicense: mit\n---\n# corpus\n"
    hub.sha = hub.add_repo("dataset", "alice/corpus", files)
    yield hub
    hub.stop()


def test_hub_dataset_streams_from_the_stand_in_hub(hub, tmp_path):
    out = json.loads(run_python(HUB_PROBE, cwd=REPO, env=hub_env(hub.url, tmp_path / "home")).splitlines()[-1])
    assert out["description"] == "dataset alice/corpus (config default, split train)"
    assert out["fingerprint"] == {"type": "hub_dataset", "dataset": "alice/corpus", "revision": hub.sha,
                                  "config": "default", "split": "train", "text_column": "text"}
    assert out["spec"]["dataset_revision"] == hub.sha and out["holdout"] == "its 'validation' split"
    assert out["resumed_exactly"]
    train_markers = {m for text in out["train_text"] for m in re.findall(r"([TUV])\d{6};", text)}
    val_markers = {m for text in out["val_text"] for m in re.findall(r"([TUV])\d{6};", text)}
    assert train_markers <= {"T", "U"} and train_markers and val_markers == {"V"}
    missing, config, column = out["errors"]
    assert "alice/missing" in missing and "does not exist" in missing and hub.url in missing
    assert "Cannot open the Hub dataset alice/corpus" in config and "nope" in config
    assert "no column 'body'; its columns are ['text']" in column and "--text-column" in column
    # streamed: parquet read in byte ranges (footer, row groups), not downloaded whole
    assert any(r.startswith("/datasets/alice/corpus/resolve/") and ".parquet bytes=" in r for r in hub.ranges)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_or_offline_hub_is_reported_before_training(tmp_path):
    unreachable = run_python(ERROR_PROBE, cwd=REPO, env=hub_env(f"http://127.0.0.1:{free_port()}", tmp_path))
    assert "Cannot reach the Hub dataset alice/corpus at http://127.0.0.1:" in unreachable
    offline = run_python(ERROR_PROBE, cwd=REPO, env={**hub_env("http://127.0.0.1:9", tmp_path), "HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE is set" in offline and "--input" in offline


# ---------------------------------------------------------------------------------------------------------------
# Memory does not grow with the corpus size

MEMORY_PROBE = """
import resource, sys
from toygpt import sources
from toygpt.stream import TrainWindows, val_windows
source, _ = sources.resolve_source(input=sys.argv[1], block_size=256)
source.fingerprint()
stream = TrainWindows(source, 256)
for _, batch in zip(range(20), stream.batches(16)):
    pass
state = stream.state_dict()
val = val_windows(source, 256, max_windows=64)
stream.close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_corpus(kind, root, n_bytes):
    block = "".join(f"line {i}: some words of text, and a few more é\n" for i in range(2000))
    root.mkdir(parents=True)
    if kind == "text_dir":  # files of ~1 MB
        for i in range(max(1, n_bytes // (1 << 20))):
            (root / f"part{i:04d}.txt").write_text(block * ((1 << 20) // len(block) + 1))
    else:  # parquet files of ~16 MB of text, rows of ~2 KB that do not compress away (hex words)
        rng, per_file = np.random.default_rng(0), 8000
        for i in range(max(1, n_bytes // (per_file * 2048))):
            n_rows = min(per_file, n_bytes // 2048)
            texts = [" ".join(re.findall(".{1,15}", rng.bytes(960).hex())) for _ in range(n_rows)]
            pq.write_table(pa.table({"text": texts}), root / f"train-{i:04d}.parquet", row_group_size=1000)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text_dir", "parquet"])
def test_peak_memory_does_not_grow_with_corpus_size(kind, tmp_path):
    rss = {}
    for name, size in (("small", 2 << 20), ("big", 160 << 20)):
        root = write_corpus(kind, tmp_path / name, size)
        code = MEMORY_PROBE.replace("sys.argv[1]", repr(str(root)))
        rss[name] = int(run_python(code, cwd=REPO).split()[-1])
    assert rss["big"] < 1.2 * rss["small"], rss
