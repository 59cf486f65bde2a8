"""The model a fine-tune starts from (train.py --init-from): a ToyGPT dir, a GPT-2 dir, or a Hub repo of either.

    start = find_init_model("openai-community/gpt2")   # fast: config.json only, every error but damaged weights
    architecture_conflicts(start.config, n_layer=6)      # ["--n-layer 6 (the checkpoint has 12)"]
    model = start.load(block_size=256, dropout=0.1)      # fp32 ToyGPTForCausalLM, GPT-2's function exactly
    model, description = load_init_model("path/to/gpt2")  # both steps at once

Finding comes first and reads config.json alone, so a wrong path, an unknown repo, an unreachable or offline Hub, a
model ToyGPT cannot represent or another vocabulary fail before any download of weights or any training work. A Hub
repo is pinned to the commit its config.json came from, so the weights loaded later are that commit's. Downloads go
through huggingface_hub and `from_pretrained` (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and the cache as usual).

GPT-2 weights are converted by convert_gpt2.gpt2_to_toygpt (same parameters, Conv1D matrices transposed), so the
converted model computes GPT2LMHeadModel's logits, and a first eval its loss. A --block-size below the checkpoint's
keeps the first positions of wpe (nanoGPT's crop_block_size): on windows that fit, the function is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from toygpt import bpe
from configuration_toygpt import ToyGPTConfig
from toygpt.hub_errors import describe_hub_error
from toygpt.gpt2_conversion import GPT2_WEIGHT_FILES, gpt2_to_toygpt, toygpt_config_from_gpt2
from toygpt.model_dir import MODEL_TYPES, ModelDirError, check_model_dir, load_pretrained, read_model_config
from modeling_toygpt import ToyGPTForCausalLM

EXAMPLE_REPO = "openai-community/gpt2"
# The ToyGPTConfig fields a run records (InitModel.record): --resume rebuilds the model from them, not from a preset.
CONFIG_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "layer_norm_epsilon",
                 "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id")


class InitFromError(ModelDirError):
    """A model to start from that cannot be found or used; the message names it, what is wrong and the fix."""


@dataclass
class InitModel:
    """A model found by find_init_model: where it is and its architecture, weights not loaded yet."""

    given: str  # as the user wrote it
    model_type: str  # "gpt2" or "toygpt"
    location: str  # the absolute directory, or the Hub repo id
    revision: str | None  # the Hub commit the config came from (None for a directory)
    config: ToyGPTConfig  # the architecture, as ToyGPT's config

    @property
    def on_hub(self) -> bool:
        return self.revision is not None

    @property
    def description(self) -> str:
        c = self.config
        kind = "GPT-2" if self.model_type == "gpt2" else "ToyGPT"
        # A local dir by its name: the description goes into the model card, and nothing pushed may hold a local path.
        where = (f"Hub repo {self.location} (commit {self.revision[:12]})" if self.on_hub
                 else f"directory {Path(self.location).name}")
        return (f"the {kind} model in {where}: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, "
                f"context {c.block_size}")

    def record(self) -> dict:
        """What a run records about its start (training_args.json, the model card); --resume reads it, never reloads:
        init_config is the checkpoint's config, which --resume rebuilds the model from (with the run's block_size and
        dropout)."""
        return {"init_from": self.given, "init_from_revision": self.revision, "init_from_description": self.description,
                "init_config": {name: getattr(self.config, name) for name in CONFIG_FIELDS}}

    def load(self, block_size: int | None = None, dropout: float | None = None) -> ToyGPTForCausalLM:
        """The fp32 ToyGPT model, in train mode; `block_size` (at most the checkpoint's) crops the positions,
        `dropout` replaces the checkpoint's."""
        kwargs = {"revision": self.revision} if self.on_hub else {}
        cls = GPT2LMHeadModel if self.model_type == "gpt2" else ToyGPTForCausalLM
        if self.on_hub:
            where = f"The weights of {self.location} (commit {self.revision[:12]})"
            fix = ("If a download was cut short, run again (it resumes); if the cached copy is damaged, delete it "
                   f"(`hf cache rm model/{self.location}`) and run again.")
        else:
            where = f"The weights in {self.location}"
            fix = ("If they were cut short or damaged (an interrupted copy or download), copy or download them again; "
                   "else re-save the model with save_pretrained.")
        # float32 whatever the checkpoint's dtype: these are the master weights (transformers 5 defaults to "auto").
        model = load_pretrained(cls, self.location, where=where, fix=fix, dtype=torch.float32, **kwargs)
        if self.model_type == "gpt2":
            model = gpt2_to_toygpt(model)
        return with_overrides(model, block_size, dropout).train()


def find_init_model(id_or_dir: str, revision: str | None = None) -> InitModel:
    """Locate `id_or_dir` (a local dir first, else a Hub repo id) and read its architecture; InitFromError if it
    cannot be used. Downloads config.json only."""
    given = str(id_or_dir)
    path = Path(given).expanduser()
    if path.exists():
        if revision is not None:
            raise InitFromError(f"{given} is a local directory; a revision applies to a Hub repo only.")
        return _local(given, path)
    if not _looks_like_repo_id(given):
        raise InitFromError(f"{given} is not a directory, nor a Hub repo id (owner/name, e.g. {EXAMPLE_REPO}): "
                            "check the path.")
    config_path = _download_config(given, revision)
    commit = Path(config_path).parent.name  # the cache keeps each commit's files in snapshots/<commit>/
    try:
        config = read_model_config(Path(config_path).parent)
    except ModelDirError as err:
        raise InitFromError(f"{given} (commit {commit[:12]}): {err}") from None
    return _from_config(given, given, config, commit)


def load_init_model(id_or_dir: str, revision: str | None = None, block_size: int | None = None,
                    dropout: float | None = None) -> tuple[ToyGPTForCausalLM, str]:
    """find_init_model + load: the fp32 ToyGPT model and a description of where it came from."""
    start = find_init_model(id_or_dir, revision)
    return start.load(block_size, dropout), start.description


def architecture_conflicts(config: ToyGPTConfig, n_layer: int | None = None, n_head: int | None = None,
                           n_embd: int | None = None, block_size: int | None = None) -> list[str]:
    """The architecture flags (None = not given) that the checkpoint of `config` cannot honour, as readable strings.

    A --block-size below the checkpoint's is allowed (load() crops the positions); above it is a conflict: the
    positions past the checkpoint's were never trained. --dropout is free and not checked here."""
    given = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}
    conflicts = [f"--{name.replace('_', '-')} {value} (the checkpoint has {getattr(config, name)})"
                 for name, value in given.items() if value is not None and value != getattr(config, name)]
    if block_size is not None and block_size > config.block_size:
        conflicts.append(f"--block-size {block_size} (the checkpoint has {config.block_size} positions; a smaller "
                         "--block-size crops them)")
    return conflicts


def with_overrides(model: ToyGPTForCausalLM, block_size: int | None = None,
                   dropout: float | None = None) -> ToyGPTForCausalLM:
    """The same weights in a model with the first `block_size` positions (nanoGPT's crop_block_size) and `dropout`;
    `model` itself when neither changes."""
    config = model.config
    block_size = config.block_size if block_size is None else block_size
    dropout = config.dropout if dropout is None else dropout
    if block_size > config.block_size:
        raise ValueError(f"block_size {block_size} exceeds the model's {config.block_size} positions.")
    if (block_size, dropout) == (config.block_size, config.dropout):
        return model
    # Rebuilt rather than patched: every module reads its dropout from the config when it is built.
    new = ToyGPTForCausalLM(ToyGPTConfig(**{**config.to_dict(), "block_size": block_size, "dropout": dropout}))
    state = model.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    new.load_state_dict(state, strict=True)
    return new


# ----------------------------------------------------------------------------------------------------------------
# Finding: a local directory, or a Hub repo's config.json


def _local(given: str, path: Path) -> InitModel:
    if not path.is_dir():
        raise InitFromError(f"{given} is a file; pass a model directory (save_pretrained output) or a Hub repo id.")
    config = read_model_config(path)
    if config.get("model_type") == "toygpt":
        check_model_dir(path)  # model.safetensors is there
    if config.get("model_type") == "gpt2" and not any((path / name).is_file() for name in GPT2_WEIGHT_FILES):
        raise InitFromError(f"{given} has no weights (none of {', '.join(GPT2_WEIGHT_FILES)}).")
    return _from_config(given, str(path.absolute()), config, None)


def _from_config(given: str, location: str, config: dict, revision: str | None) -> InitModel:
    """The InitModel of a config.json, or InitFromError if ToyGPT cannot start from it."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise InitFromError(f"{given} holds a {model_type!r} model; --init-from takes GPT-2 ('gpt2') and ToyGPT "
                            f"models, e.g. {EXAMPLE_REPO} and its larger siblings.")
    if model_type == "toygpt" and config.get("quantization") is not None:
        raise InitFromError(f"{given} is an int8-quantized ToyGPT model; training needs fp32 weights: start from the "
                            "fp32 model it was quantized from.")
    try:
        if model_type == "gpt2":
            toygpt = toygpt_config_from_gpt2(GPT2Config.from_dict(config))
        else:
            toygpt = ToyGPTConfig.from_dict(config)
    except ValueError as err:  # the field ToyGPT cannot represent, named
        raise InitFromError(f"{given}: {err}") from None
    if toygpt.vocab_size != bpe.VOCAB_SIZE:
        raise InitFromError(f"{given} has a vocabulary of {toygpt.vocab_size} tokens; ToyGPT trains with the GPT-2 "
                            f"BPE tokenizer ({bpe.VOCAB_SIZE} tokens), so it starts only from models with that "
                            "vocabulary.")
    return InitModel(given, model_type, location, revision, toygpt)


def _looks_like_repo_id(given: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if given.startswith((".", "/", "~")) or given.endswith("/"):
        return False  # a path, even where it would pass as an id
    try:
        validate_repo_id(given)
    except HFValidationError:
        return False
    return True


def _download_config(repo_id: str, revision: str | None) -> str:
    """config.json of the Hub repo (from the cache when there, or offline); InitFromError saying which failure."""
    from huggingface_hub import constants, errors, hf_hub_download

    where = f"{repo_id} on the Hub ({constants.ENDPOINT})"
    try:
        return hf_hub_download(repo_id, "config.json", revision=revision)
    except errors.RemoteEntryNotFoundError:
        raise InitFromError(f"{where} has no config.json: it is not a transformers model repo.") from None
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError) as err:
        cache = f"in the Hub cache ({constants.HF_HUB_CACHE})"
        if isinstance(err, errors.LocalEntryNotFoundError) and constants.is_offline_mode():
            raise InitFromError(f"HF_HUB_OFFLINE is set and {repo_id} is not {cache}: unset HF_HUB_OFFLINE to "
                                "download it, or pass a local model directory.") from None
        uncached = f" {repo_id} is not {cache}." if isinstance(err, errors.LocalEntryNotFoundError) else ""
        raise InitFromError(f"{repo_id} is not a local directory, and {describe_hub_error(err, where, revision)}"
                            f"{uncached} Check the path or the repo id (e.g. {EXAMPLE_REPO}), or pass a local model directory.") from None
