"""Writing and checking ToyGPT model directories: complete, loadable, and never at the cost of the user's files.

A model directory is what `save_pretrained` writes (config.json with auto_map, the remote-code files,
model.safetensors, generation_config.json) plus the GPT-2 tokenizer files and, optionally, a README.md card.

Every command that writes a directory (train.py, quantize.py, convert_gpt2.py, push_to_hub.py --dry-run) goes through
`OutputDir`, which keeps one rule (README, "What is safe"):

1. A command creates or replaces only its output directory OUT, and its own hidden entries beside it (`.OUT.lock`,
   `.OUT.tmp-*`, `.OUT.swap.json`), which it removes again. It never deletes or replaces a path it did not create.
2. An existing, non-empty OUT is replaced only when asked (--overwrite; train.py's --resume rebuilds its own dir) and
   only if the project wrote it, recognisable by its files: a model dir (config.json of a ToyGPT or GPT-2 model
   beside model.safetensors) or a train.py run (checkpoint/step-*/trainer_state.json). Anything else is refused.
3. OUT is never an input, never contains one (the training text, a SRC model dir, ...), and never holds the
   current directory. (It may lie inside a SRC model dir, like quantize.py's OUT = SRC/int8, which the Space uses.)
4. Entries of OUT that the new output does not write (an int8/ copy, notes) are moved into the new OUT: they survive.
5. At every instant OUT is complete-old or complete-new: the new tree is built in `.OUT.tmp-*`, then swapped in by
   one atomic exchange (Linux renameat2), else by two renames. A journal (`.OUT.swap.json`, written before the swap,
   naming both trees by inode) lets the next command that claims OUT finish or undo a swap cut short by a kill, and
   say so; temp trees of killed runs are removed then too.
6. One writer at a time: an exclusive lock on `.OUT.lock` for as long as the command runs; a second one is refused
   with a message naming the holder.
New directories and files get the user's umask, like any other file they create.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from transformers import GenerationConfig

from toygpt import bpe
from toygpt.file_modes import give_umask, make_temp_dir

MODEL_TYPES = ("toygpt", "gpt2")  # what this project writes: ToyGPT dirs, and GPT-2 dirs (convert_gpt2.py to-gpt2)


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or not a ToyGPT directory."""


class OutputDirError(ValueError):
    """An output path this command may not write (or not now); the message says why and what to do instead."""


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


# ----------------------------------------------------------------------------------------------------------------
# What the project wrote


def is_project_model_dir(path: Path) -> bool:
    """A model dir this project writes (ToyGPT or GPT-2 config beside model.safetensors), or a train.py run dir."""
    try:
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") in MODEL_TYPES and (path / "model.safetensors").is_file():
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return any((path / "checkpoint").glob("step-*/trainer_state.json"))


# ----------------------------------------------------------------------------------------------------------------
# The swap: exchange, journal, recovery


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem can't."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform.startswith("linux") else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return None


def _journal_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.swap.json")


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _carry(old: Path, new: Path) -> list[str]:
    """Move every entry of `old` that `new` lacks into `new` (the user's files survive the swap)."""
    carried = []
    for entry in sorted(old.iterdir()) if old.is_dir() else []:
        if not (new / entry.name).exists() and not entry.name.endswith(".part"):
            os.replace(entry, new / entry.name)
            carried.append(entry.name)
    return carried


def _swap(out: Path, new: Path) -> list[str]:
    """Put the complete tree `new` at `out`; the old tree goes, its foreign entries stay. Returns what was kept."""
    journal = _journal_path(out)
    _write_json_atomic(journal, {"new": new.name, "new_inode": _inode(new), "old_inode": _inode(out)})
    carried = _carry(out, new)
    if not out.exists():
        os.replace(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new)  # the old tree, now at the temp path
    else:
        old = make_temp_dir(out.parent, f".{out.name}.old-")
        os.replace(out, old / out.name)
        os.replace(new, out)
        shutil.rmtree(old)
    journal.unlink()
    return carried


def recover(out: Path, log=print) -> None:
    """Finish or undo a swap of `out` cut short by a kill, and remove temp trees of killed runs; say what was done.

    Call with the lock on `out` held (OutputDir does): nothing else is writing these entries then."""
    journal = _journal_path(out)
    journal.with_name(journal.name + ".part").unlink(missing_ok=True)  # killed while writing the journal
    if journal.is_file():
        try:
            record = json.loads(journal.read_text())
        except ValueError:
            record = {}
        new = out.with_name(record.get("new", ".missing"))
        if record and _inode(new) == record["new_inode"] and _inode(out) != record["new_inode"]:
            kept = _swap(out, new)  # the new tree was complete (the journal is written after it): finish
            log(f"note: finished an interrupted save of {out}" + (f" (kept {', '.join(kept)})" if kept else ""))
        elif record and _inode(new) is not None and _inode(new) == record.get("old_inode"):
            shutil.rmtree(new)  # exchanged, then killed before the old tree was removed
            log(f"note: removed the previous copy of {out} that an interrupted save left at {new.name}")
        journal.unlink(missing_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        size = sum(p.stat().st_size for p in stale.rglob("*") if p.is_file())
        shutil.rmtree(stale, ignore_errors=True)
        log(f"note: removed {stale.name}, left beside {out.name} by an interrupted run ({size / 1e6:.1f} MB)")


# ----------------------------------------------------------------------------------------------------------------
# The output directory of one command


class OutputDir:
    """A command's output directory, claimed before any work: recovered, locked and checked against the rule above.

        with OutputDir(out, inputs=[src], replace=args.overwrite) as output:
            ...                                   # the work
            with output.write() as tmp:           # build the new tree in tmp; swapped in atomically on success
                ...
    """

    def __init__(self, path, *, inputs=(), replace: bool = False, flag: str = "--output-dir",
                 owned=is_project_model_dir, lock: bool = True, log=print, exists_hint: str = ""):
        self.path, self.flag, self.log, self.exists_hint = Path(path).absolute(), flag, log, exists_hint
        self._lock_fd = None
        real, cwd = self.path.resolve(), Path.cwd().resolve()
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{flag} {self.path} is a file, not a directory; choose another {flag}.")
        if self.path.exists() and (cwd == real or real in cwd.parents):
            raise OutputDirError(f"{flag} {self.path} is (or contains) the current directory; choose another one.")
        self.refuse_inputs(inputs)
        if lock:
            self._lock()
        try:
            recover(self.path, log)
            self.replaces = self._check_contents(replace, owned)
        except BaseException:
            self.close()
            raise

    def refuse_inputs(self, inputs) -> None:
        """OutputDirError if OUT is one of the inputs or contains one (replacing OUT would delete it)."""
        real = self.path.resolve()
        for given in (Path(p) for p in inputs if p is not None):
            source = given.resolve()
            if source == real:
                raise OutputDirError(f"{self.flag} {self.path} is the input itself; write the output to a new "
                                     "directory.")
            if real in source.parents:
                raise OutputDirError(f"{self.flag} {self.path} contains the input {given}: replacing it would delete "
                                     "that; choose an output directory that holds none of the inputs.")

    def _check_contents(self, replace: bool, owned) -> bool:
        """Whether an existing OUT will be replaced; OutputDirError if it may not be."""
        out = self.path
        if not out.exists() or not any(out.iterdir()):
            return False
        if not replace:
            raise OutputDirError(f"{out} already exists; choose another path or pass --overwrite{self.exists_hint}.")
        if not owned(out):
            names = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())[:6])
            raise OutputDirError(
                f"{self.flag} {out} is not a directory this project wrote (it holds {names}); --overwrite replaces only "
                f"a model directory written by train.py, quantize.py or convert_gpt2.py. Choose another {self.flag}."
            )
        return True

    def _lock(self) -> None:
        lock = self.path.with_name(f".{self.path.name}.lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:  # (re)open until we hold the lock of the file that is at the path now
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise OutputDirError(f"{self.path} is being written by another run ({holder}); wait for it to "
                                         f"finish, or choose another {self.flag}.") from None
                if _inode(lock) == os.fstat(fd).st_ino:
                    break
                os.close(fd)  # the holder removed it between our open and our lock
        except PermissionError as err:
            raise OutputDirError(f"cannot write in {self.path.parent} ({err.strerror}); choose a {self.flag} in a "
                                 "directory you can write to.") from None
        holder = f"pid {os.getpid()} on {socket.gethostname()}, `{' '.join(sys.argv)}`, since {time.strftime('%H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        self._lock_fd, self._lock_path = fd, lock

    @contextlib.contextmanager
    def write(self):
        """Yield an empty temp dir beside OUT; when the block succeeds, it becomes OUT atomically (entries of the old
        OUT that it lacks move into it); when the block fails, it is removed and OUT is as it was."""
        tmp = make_temp_dir(self.path.parent, f".{self.path.name}.tmp-")
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        give_umask(tmp)
        kept = _swap(self.path, tmp)
        stale = [name for name in kept if is_project_model_dir(self.path / name)]
        if kept:
            self.log(f"kept in {self.path}: {', '.join(kept)} (not written by this command)"
                     + (f"; {', '.join(stale)} came from the previous model: re-create it" if stale else ""))

    def close(self) -> None:
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)  # while still holding it: a waiter then retries on a new file
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def atomic_dir(out_dir, overwrite: bool = False, inputs=(), flag: str = "--output-dir", owned=is_project_model_dir):
    """Claim `out_dir` (OutputDir's rule) and yield a temp dir that replaces it atomically on success."""
    with OutputDir(out_dir, inputs=inputs, replace=overwrite, flag=flag, owned=owned) as output:
        with output.write() as tmp:
            yield tmp


# ----------------------------------------------------------------------------------------------------------------
# Model files


def write_model_files(model, directory: str | os.PathLike, max_new_tokens: int = 200) -> None:
    """save_pretrained (safetensors only) + tokenizer + sampling generation config into an existing directory."""
    model.generation_config = sampling_generation_config(max_new_tokens)
    model.save_pretrained(str(directory))
    bpe.save_tokenizer(directory, model_max_length=model.config.block_size)


def save_model_dir(model, out_dir: str | os.PathLike, overwrite: bool = False, card=None, inputs=()) -> Path:
    """Atomically write a complete model directory; `card` is a `huggingface_hub.ModelCard` or None."""
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        write_model_files(model, tmp)
        if card is not None:
            card.save(str(Path(tmp) / "README.md"))
    return Path(out_dir)


def check_model_dir(directory: str | os.PathLike) -> dict:
    """Return config.json as a dict if `directory` looks like a ToyGPT model dir, else raise ModelDirError."""
    directory = Path(directory)
    if not directory.is_dir() and _journal_path(directory.absolute()).is_file():
        raise ModelDirError(f"{directory} is missing: a save of it was cut short. Any command that writes it "
                            f"(e.g. `python train.py --output-dir {directory} --resume`) finishes that save first.")
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
