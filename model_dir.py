"""Writing and checking ToyGPT model directories: atomically, complete, loadable by `from_pretrained`.

A model directory is what `save_pretrained` writes (config.json with auto_map, both remote-code files,
model.safetensors, generation_config.json) plus the GPT-2 tokenizer files and, optionally, a README.md card.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from transformers import GenerationConfig

import bpe


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or not a ToyGPT directory."""


def sampling_generation_config(max_new_tokens: int = 200) -> GenerationConfig:
    """Sampling defaults shipped with every model: top-k 50, as the pipeline and the Space expect."""
    return GenerationConfig(
        do_sample=True,
        top_k=50,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        bos_token_id=bpe.EOT_ID,
        eos_token_id=bpe.EOT_ID,
        pad_token_id=bpe.EOT_ID,
    )


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir` by rename, on error it is removed.

    Readers never see a half-written directory, and an existing `out_dir` survives any failure.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another path or pass --overwrite.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(model, directory: str | os.PathLike, max_new_tokens: int = 200) -> None:
    """save_pretrained (safetensors only) + tokenizer + sampling generation config into an existing directory."""
    model.generation_config = sampling_generation_config(max_new_tokens)
    model.save_pretrained(str(directory))
    bpe.save_tokenizer(directory, model_max_length=model.config.block_size)


def save_model_dir(model, out_dir: str | os.PathLike, overwrite: bool = False, card=None) -> Path:
    """Atomically write a complete model directory; `card` is a `huggingface_hub.ModelCard` or None."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_files(model, tmp)
        if card is not None:
            card.save(str(Path(tmp) / "README.md"))
    return Path(out_dir)


def check_model_dir(directory: str | os.PathLike) -> dict:
    """Return config.json as a dict if `directory` looks like a ToyGPT model dir, else raise ModelDirError."""
    import json

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"{directory} is not a directory; pass a ToyGPT model directory written by train.py.")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{directory} has no config.json; it is not a transformers model directory.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{config_path} is not valid JSON ({err}); the directory is corrupt.") from err
    if config.get("model_type") != "toygpt":
        raise ModelDirError(
            f"{directory} holds a {config.get('model_type')!r} model, not a ToyGPT one; "
            "convert GPT-2 checkpoints first with `python convert_gpt2.py from-gpt2 SRC DST`."
        )
    if not (directory / "model.safetensors").is_file():
        raise ModelDirError(f"{directory} has no model.safetensors; the weights are missing.")
    return config
