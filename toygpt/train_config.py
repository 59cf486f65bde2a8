"""train.py's configuration as one typed record, and every check of it that comes before any work.

`TrainingConfig` holds every flag (None: the preset's value, or on --resume the checkpoint's) and what a run derives
before it starts: its data's identity (`DataRecord`) and its --init-from start (`StartRecord`). It is the one
interface of the library below train.py's command line, and the one file format of a run: `training_args.json` and
the checkpoint's `trainer_state.json["args"]` are `to_record()`, read back only through `TrainingConfig.load` /
`from_record` (model cards, quantize.py, push_to_hub.py, --resume), whose key names are those train.py has always
written.

`prepare(config)` claims --output-dir (model_dir.OutputDir: lock, finish an interrupted save, never the user's files),
resolves the config (`resolved`: preset and fine-tuning defaults, the resumed checkpoint's values, checks naming the
flag), checks the device, the training data (sources.resolve_source) and --init-from, and returns what the run needs.
Everything that can be wrong with a command line is reported from here, as a TrainError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from toygpt import sources
from toygpt import init_from
from toygpt import tracking
from toygpt.checkpoint import CHECKPOINT_DIR, latest_checkpoint, read_trainer_state
from configuration_toygpt import PRESETS, ToyGPTConfig
from toygpt.errors import UsageError
from toygpt.defaults import FINE_TUNING_DEFAULTS, RUN_DEFAULTS, TRAINING_DEFAULTS  # noqa: F401 (re-exported)
from toygpt.model_dir import ModelDirError, OutputDir, is_project_model_dir

TRAINING_ARGS = "training_args.json"
# Records written before a run recorded these (optim.py's defaults then): what those runs used.
LEGACY_DEFAULTS = dict(optimizer="adamw", schedule="cosine")
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
FLOAT_FIELDS = ("lr", "embedding_lr", "min_lr", "weight_decay", "grad_clip", "dropout", "time_budget_min",
                "ema_decay")
POSITIVE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps", "eval_every",
                   "eval_batches", "checkpoint_every")
# What --resume cannot change: the shapes of the checkpoint's tensors, and the data stream it continues.
RESUME_FIXED_FIELDS = ("preset", "n_layer", "n_head", "n_embd", "block_size", "seed", "input", "dataset",
                       "dataset_config", "split", "text_column", "vocab", "init_from", "init_revision")
MAX_SEED = 2**32 - 1  # numpy's and the data stream's seeds are 32-bit
# One optimizer step reads at most this many tokens per process (16M; GPT-3's largest batch was 3.2M): Ctrl-C and
# --time-budget-min stop a run between steps, so a step must end in reasonable time.
MAX_STEP_TOKENS = 2**24


class TrainError(UsageError):
    """A bad command line or output directory, reported before any work starts."""


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


@dataclass(frozen=True)
class DataRecord:
    """The identity of a run's training data, measured before it starts (and again on --resume)."""

    description: str  # for people: "input.txt", "dataset owner/name (config None, split train)"
    source: dict  # data_source: how to open it again (sources.resolve_source's arguments, a Hub commit)
    fingerprint: dict  # data_fingerprint: sizes and sha256 (a Hub commit); --resume refuses changed data
    holdout: str | None  # the validation text, as data's source says it ("the last 10% of its characters")
    input_path: str | None = None  # the one text file trained on, absolute (quantize.py evaluates on it), else None
    input_sha256: str | None = None

    KEYS = {"description": "data_description", "source": "data_source", "fingerprint": "data_fingerprint",
            "holdout": "data_holdout", "input_path": "input_path", "input_sha256": "input_sha256"}


@dataclass(frozen=True)
class StartRecord:
    """--init-from's start (init_from.InitModel.record()): --resume rebuilds the model from it, never reloads."""

    revision: str | None  # the Hub commit, None for a directory
    description: str
    config: dict  # the checkpoint's architecture (ToyGPTConfig fields)

    KEYS = {"revision": "init_from_revision", "description": "init_from_description", "config": "init_config"}


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a training run; train.py's flags, same names. None: the preset's value (the checkpoint's on
    --resume), filled by `resolved`."""

    # Data (sources.resolve_source).
    input: str | None = None  # a text file, a directory or glob of them, or a directory of dataset files
    dataset: str | None = None  # a Hub dataset (owner/name), instead of input
    dataset_config: str | None = None
    split: str | None = None  # the dataset split trained on (train)
    text_column: str | None = None  # the dataset column holding the text (text)
    output_dir: str = "out/toygpt"
    preset: str | None = None  # architecture + training defaults (tiny)
    init_from: str | None = None  # start from this checkpoint (Hub id or dir) instead of random weights
    init_revision: str | None = None
    # Architecture.
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    # Optimisation.
    batch_size: int | None = None  # windows per micro-batch, per process
    grad_accum: int | None = None  # micro-batches per optimizer step
    vocab: str | None = None  # auto, corpus or full (corpus_vocab.VOCAB_MODES)
    optimizer: str | None = None  # adamw or muon (optim.OPTIMIZERS)
    schedule: str | None = None  # cosine or wsd (optim.SCHEDULES)
    lr: float | None = None
    embedding_lr: float | None = None  # the tied embedding's peak lr (resolved: lr)
    min_lr: float | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None  # optimizer steps (with time_budget_min: an upper bound)
    time_budget_min: float | None = None  # the schedule is fitted to this wall clock
    weight_decay: float | None = None
    grad_clip: float | None = None  # max gradient norm, 0 = none
    eval_every: int | None = None
    eval_batches: int | None = None  # None: every eval reads the whole validation split (up to VAL_MAX_TOKENS)
    keep_best: bool | None = None  # the model dir holds the best eval's weights (else the last step's)
    ema_decay: float | None = None  # evals and the model dir see a moving average of the weights; 0: none
    checkpoint_every: int | None = None
    seed: int | None = None
    device: str | None = None  # auto, cpu, cuda, cuda:N, mps
    dtype: str | None = None  # autocast: auto, float32, bfloat16
    compile: bool | None = None
    report_to: list[str] | None = None  # trackers besides metrics.jsonl (tracking.REPORT_TO; Trainer's names)
    run_name: str | None = None  # the trackers' run; kept by --resume, so a resumed run continues the same one
    overwrite: bool = False
    resume: bool = False
    # Derived before the run starts (prepare), never given as flags.
    start: StartRecord | None = None  # --init-from's checkpoint
    data: DataRecord | None = None  # what the run trains on
    vocab_used: str | None = None  # "corpus" or "full": --vocab's choice as the run made it

    # -- the file format: training_args.json, trainer_state.json["args"] -----------------------------------------------

    def to_record(self) -> dict:
        """The JSON object train.py writes (key names as ever: the flags, init_*, data_*, input_path/sha256)."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("start", "data")}
        for part in (self.start, self.data):
            if part is not None:
                record.update({key: getattr(part, name) for name, key in part.KEYS.items()})
        return record

    @classmethod
    def from_record(cls, record: dict) -> TrainingConfig:
        """The config a record describes; keys it lacks (older runs) are None or what those runs used, unknown keys
        (a pushed record's input_name) are ignored."""
        known = {f.name for f in fields(cls)} - {"start", "data"}
        values = {**LEGACY_DEFAULTS, **{k: v for k, v in record.items() if k in known}}
        start = data = None
        if record.get("init_config") is not None:
            start = StartRecord(**{name: record.get(key) for name, key in StartRecord.KEYS.items()})
        if any(record.get(key) is not None for key in DataRecord.KEYS.values()):
            data = DataRecord(**{name: record.get(key) for name, key in DataRecord.KEYS.items()})
        return cls(**values, start=start, data=data)

    @classmethod
    def load(cls, model_dir) -> TrainingConfig | None:
        """The training_args.json of a model dir; None where there is none (a converted or older dir) or it is not a
        JSON object."""
        try:
            record = json.loads((Path(model_dir) / TRAINING_ARGS).read_text())
        except (OSError, ValueError):
            return None
        return cls.from_record(record) if isinstance(record, dict) else None

    def save(self, model_dir) -> None:
        (Path(model_dir) / TRAINING_ARGS).write_text(json.dumps(self.to_record(), indent=2))

    # -- resolution --------------------------------------------------------------------------------------------------

    def resolved(self, saved: TrainingConfig | None = None) -> TrainingConfig:
        """Every unset field filled (the resumed run's values, else the preset's and fine-tuning defaults) and
        checked; TrainError names the flag and the fix."""
        preset = (saved.preset if saved else None) or self.preset or "tiny"
        defaults = {**{k: PRESETS[preset][k] for k in MODEL_FIELDS}, **TRAINING_DEFAULTS[preset],
                    **(FINE_TUNING_DEFAULTS if self.init_from else {}), **RUN_DEFAULTS}
        if saved is not None:  # the checkpoint's run: its flags and its start (its data is measured again)
            defaults.update({k: v for k, v in dataclasses.asdict(saved).items()
                             if k not in ("resume", "overwrite", "data", "vocab_used", "start") and v is not None})
            defaults["start"] = saved.start
        filled = {k: defaults[k] for k, v in self.__dict__.items() if v is None and k in defaults and k != "preset"}
        config = replace(self, preset=preset, **filled)
        if config.embedding_lr is None:
            config = replace(config, embedding_lr=config.lr)
        config.check()
        return config

    def check(self) -> None:
        """The checks of a resolved config, each naming its flag."""
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise TrainError(f"{flag(name)} must be a finite number, got {value}.")
        for name in POSITIVE_FIELDS:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise TrainError(f"{flag(name)} must be positive, got {getattr(self, name)}.")
        for name in ("lr", "embedding_lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:  # weight_decay None: the epochs rule
                raise TrainError(f"{flag(name)} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.ema_decay < 1:
            raise TrainError(f"--ema-decay must be in [0, 1) (0: no moving average), got {self.ema_decay}.")
        if self.min_lr > self.lr:
            raise TrainError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr}).")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise TrainError(f"--time-budget-min must be positive, got {self.time_budget_min}.")
        try:
            tracking.check_report_to(self.report_to)
        except tracking.TrackingError as err:
            raise TrainError(str(err)) from None
        if not 0 <= self.seed <= MAX_SEED:
            raise TrainError(f"--seed must be between 0 and {MAX_SEED} (2**32 - 1), got {self.seed}.")
        step_tokens = self.batch_size * self.block_size * self.grad_accum
        if step_tokens > MAX_STEP_TOKENS:
            most = max(1, MAX_STEP_TOKENS // (self.batch_size * self.block_size))
            raise TrainError(
                f"--grad-accum {self.grad_accum} makes one optimizer step {step_tokens:,} tokens per process "
                f"(--batch-size {self.batch_size} x --block-size {self.block_size} x --grad-accum); a step is at most "
                f"{MAX_STEP_TOKENS:,} tokens, so that Ctrl-C and --time-budget-min can stop the run at a step. Use "
                f"--grad-accum {most} or less (or a smaller --batch-size).")

    def model_config(self) -> ToyGPTConfig:
        """The architecture: the preset's (or --init-from's checkpoint's) with the model fields."""
        values = {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}
        try:
            if self.start is not None:  # --init-from: the checkpoint's config (recorded), with these fields
                return ToyGPTConfig(**{**self.start.config, **values})
            return ToyGPTConfig.from_preset(self.preset, **values)
        except ValueError as err:
            raise TrainError(str(err)) from err

    @property
    def step_tokens(self) -> int:
        """Tokens one optimizer step reads, per process."""
        return self.batch_size * self.block_size * self.grad_accum


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work


def check_device(device_arg: str) -> None:
    """A --device this machine does not have is a command-line error, reported before any work."""
    if device_arg == "auto":
        return
    try:
        device = torch.device(device_arg)
    except RuntimeError as err:
        raise TrainError(f"--device {device_arg!r} is not a device ({err}); use auto, cpu, cuda, cuda:N or mps.") \
            from None
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xpu, hpu, ...: torch names them, training runs on none
        raise TrainError(f"--device {device_arg}: train.py runs on cpu, cuda or mps only; use auto, cpu, cuda, cuda:N "
                         "or mps.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device_arg}: no CUDA GPU is available here; use --device cpu (or auto).")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"--device {device_arg}: MPS is not available here; use --device cpu (or auto).")


def autocast_dtype(dtype_arg: str, device: torch.device):
    """The autocast dtype, or None for plain float32 (master weights are float32 either way)."""
    if dtype_arg == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if dtype_arg == "bfloat16" else None


def check_resume_flags(config: TrainingConfig, saved: TrainingConfig) -> None:
    """--resume continues the checkpoint's model and data: flags that would change them are refused, named."""
    changed = [f"{flag(name)} {getattr(config, name)} (the checkpoint has {getattr(saved, name)})"
               for name in RESUME_FIXED_FIELDS
               if getattr(config, name) is not None and getattr(config, name) != getattr(saved, name)]
    if changed:
        raise TrainError(
            f"--resume continues the checkpoint's run, which these flags would change: {'; '.join(changed)}. "
            "Drop them to resume, or start a new run (another --output-dir, or --overwrite)."
        )


def find_start(config: TrainingConfig) -> tuple[TrainingConfig, init_from.InitModel]:
    """--init-from: find the checkpoint (its config.json only: a wrong id or an unreachable Hub fails here, fast), take
    the architecture from it and record where it came from; flags that contradict it are refused, named."""
    if config.vocab == "corpus":
        raise TrainError("--vocab corpus is exact only from random weights (every never-seen token row equal); with "
                         "--init-from drop --vocab (or pass --vocab full).")
    try:
        start = init_from.find_init_model(config.init_from, config.init_revision)
    except ModelDirError as err:  # InitFromError, or the dir's own
        raise TrainError(f"--init-from: {err}") from None
    conflicts = init_from.architecture_conflicts(start.config, config.n_layer, config.n_head, config.n_embd,
                                                 config.block_size)
    if conflicts:
        raise TrainError(f"--init-from {config.init_from} fixes the architecture, which these flags contradict: "
                         f"{'; '.join(conflicts)}. Drop them (a --block-size up to the checkpoint's is fine).")
    c, record = start.config, start.record()
    config = replace(
        config, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=config.block_size or c.block_size,
        dropout=c.dropout if config.dropout is None else config.dropout,
        vocab="full",  # the checkpoint's never-seen rows differ: only the full vocabulary is exact
        start=StartRecord(**{name: record[key] for name, key in StartRecord.KEYS.items()}))
    return config, start


def check_data(config: TrainingConfig, saved: TrainingConfig | None, output: OutputDir):
    """The checked training source, and the config with its DataRecord; on --resume the data must be unchanged."""
    source, description = sources.resolve_source(
        input=config.input, dataset=config.dataset, dataset_config=config.dataset_config, split=config.split,
        text_column=config.text_column, block_size=config.block_size,
        # a resumed run keeps its Hub commit
        dataset_revision=saved.data.source.get("dataset_revision") if saved and saved.data else None)
    spec, fingerprint = source.spec(), source.fingerprint()
    output.refuse_inputs([spec.get("input")])
    is_file = fingerprint["type"] == "file"  # quantize.py evaluates on the text a model was trained on, if one file
    record = DataRecord(description=description, source=spec, fingerprint=fingerprint,
                        holdout=source.holdout, input_path=spec["input"] if is_file else None,
                        input_sha256=fingerprint.get("sha256"))
    if saved is not None and saved.data is not None and saved.data.fingerprint != fingerprint:
        raise TrainError(
            f"--resume: the training data ({description}) has changed since the checkpoint was written, and the "
            "checkpoint continues a stream over the old data. Restore it to resume, or start a new run on the new "
            "data (another --output-dir, or --overwrite).")
    return source, replace(config, data=record)


def prepare(config: TrainingConfig):
    """Claim --output-dir (lock, finish an interrupted save), resolve the config (from the checkpoint on --resume) and
    check it, the data and the output: everything that can be wrong is reported here, before any work.

    Returns the resolved config (with its DataRecord), the checked data source, the checkpoint to resume from or None,
    the --init-from model (fp32, loaded) or None, and the claimed output dir (locked on rank 0 until closed)."""
    given_input = config.input or (sources.DEFAULT_INPUT if sources.DEFAULT_INPUT.is_file() else None)
    # a local --init-from dir is an input too (a Hub id names no local path)
    start_dir = config.init_from if config.init_from and Path(config.init_from).exists() else None
    output = OutputDir(config.output_dir, inputs=[given_input, start_dir], replace=config.overwrite or config.resume,
                       lock=os.environ.get("RANK", "0") == "0", log=lambda message: print(message, file=sys.stderr),
                       exists_hint=", --resume to continue its checkpoint, or choose another --output-dir")
    try:
        resume_from, saved, start = None, None, None
        if config.resume:
            resume_from = latest_checkpoint(output.path)
            if resume_from is None:
                raise TrainError(f"--resume: no checkpoint in {output.path / CHECKPOINT_DIR}; start the run without "
                                 "--resume.")
            saved = TrainingConfig.from_record(read_trainer_state(resume_from)["args"])
            check_resume_flags(config, saved)
        elif config.init_from is not None:  # its architecture before the preset fills the rest
            config, start = find_start(config)
        config = config.resolved(saved)
        if config.run_name is None:  # a new run (or one resumed from a checkpoint written before run names)
            config = replace(config, run_name=f"{Path(config.output_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}")
        config.model_config()
        check_device(config.device)
        source, config = check_data(config, saved, output)
        # The weights last, once every cheaper check has passed: a download, and a damaged file shows only here.
        init_model = None
        if start is not None:
            try:
                init_model = start.load(config.block_size, config.dropout)
            except ModelDirError as err:  # InitFromError, or the dir's own
                raise TrainError(f"--init-from: {err}") from None
    except BaseException:
        output.close()
        raise
    return config, source, resume_from, init_model, output


def start_output_dir(output: OutputDir, resuming: bool) -> None:
    """--overwrite drops the old run's checkpoints and metrics, but keeps its model files until the new model
    directory is complete and swapped in atomically at the end."""
    out_dir = output.path
    if output.replaces and not resuming:
        print(f"--overwrite: replacing the run in {out_dir}: its checkpoint and metrics now; its model files when the "
              "new ones are complete.", file=sys.stderr, flush=True)
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(out_dir / tracking.RUNS_DIR, ignore_errors=True)  # the old run's TensorBoard events
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def discard_failed_start(output: OutputDir, existed: bool) -> None:
    """A run that stopped before its first checkpoint (a first step that diverged, Ctrl-C while starting) leaves
    nothing to resume, and a dir holding only its metrics.jsonl (and runs/) is no directory this project would replace: in an
    output dir that was missing or empty (`existed`: it was there, empty), remove what the run wrote, and the dir if
    the run created it, so that the same command runs again. Anything else found there stays."""
    out = output.path
    if output.replaces or os.environ.get("RANK", "0") != "0" or not out.is_dir():
        return
    if latest_checkpoint(out) is not None or is_project_model_dir(out):
        return
    (out / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out / tracking.RUNS_DIR, ignore_errors=True)  # its TensorBoard events (tracking.py)
    for folder in (out / CHECKPOINT_DIR, *([] if existed else [out])):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass
