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
7. A symlinked OUT is resolved once and its target written (the link stays); a dangling one is refused. Recovery never
   replaces an entry of OUT changed after the journal was written: it stays, the save's copy goes beside it.
8. A full disk is one line (DiskFullError) naming the disk and OUT, which is as it was.
`OutputFile` keeps the same rule for one file (convert_gpt2.py to-gguf's .gguf).
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

from modeling_toygpt import ToyGPTForCausalLM
from toygpt import bpe
from toygpt.checkpoint import CHECKPOINT_DIR
from toygpt.errors import ToyGPTError, UsageError
from toygpt.file_modes import give_umask, make_temp_dir, user_umask, write_file_atomic

MODEL_TYPES = ("toygpt", "gpt2")  # what this project writes: ToyGPT dirs, and GPT-2 dirs (convert_gpt2.py to-gpt2)


class ModelDirError(UsageError):
    """A model directory that is missing, incomplete or not a ToyGPT directory."""


class OutputDirError(UsageError):
    """An output path this command may not write (or not now); the message says why and what to do instead."""


class DiskFullError(ToyGPTError, OSError):
    """The disk filled up while an output was written; the old output is as it was (the message says where)."""


def _is_disk_full(err: OSError) -> bool:
    """ENOSPC/EDQUOT, or numpy's short write ("N requested and M written", errno unset), which means the same."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or (err.errno is None and " requested and " in str(err))


@contextlib.contextmanager
def _disk_full_is_one_line(out: Path):
    """Turn a full disk while writing `out` into DiskFullError saying where, and that `out` is as it was."""
    try:
        yield
    except OSError as err:
        if isinstance(err, DiskFullError) or not _is_disk_full(err):
            raise
        free = shutil.disk_usage(out.parent).free
        raise DiskFullError(f"the disk holding {out.parent} is full ({free / 1e6:.1f} MB free) while writing {out}; "
                            f"{out.name} is as it was. Free some space there (or choose an output on another disk) "
                            "and run again.") from None


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


def _carry(old: Path, new: Path) -> list[str]:
    """Move every entry of `old` that `new` lacks into `new` (the user's files survive the swap)."""
    carried = []
    for entry in sorted(old.iterdir()) if old.is_dir() else []:
        if not os.path.lexists(new / entry.name):
            os.replace(entry, new / entry.name)
            carried.append(entry.name)
    return carried


def _swap(out: Path, new: Path) -> list[str]:
    """Put the complete tree `new` at `out`; the old tree goes, its foreign entries stay. Returns what was kept."""
    journal = _journal_path(out)
    write_file_atomic(journal, json.dumps({"new": new.name, "new_inode": _inode(new), "old_inode": _inode(out)}))
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


def _changed_since(path: Path, since: float) -> bool:
    """Whether `path` (any file or dir in it) was created or changed after the time `since` (st_ctime)."""
    return any(p.lstat().st_ctime > since for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink()
                                                            else [])])


def _set_aside_newer(out: Path, new: Path, since: float) -> list[str]:
    """Before an interrupted swap is finished: an entry of `out` changed after the journal was written (a user's
    new int8/, made while the save lay cut short) must not be replaced by the copy in `new`. It keeps its name; the
    copy `new` holds moves to NAME.interrupted-save beside it. Returns what was set aside."""
    aside = []
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        theirs = new / entry.name
        if os.path.lexists(theirs) and _changed_since(entry, since):
            os.replace(theirs, new / f"{entry.name}.interrupted-save")
            aside.append(entry.name)
    return aside


def recover(out: Path, log=print) -> None:
    """Finish or undo a swap of `out` cut short by a kill, and remove temp files and trees of killed runs; say what
    was done.

    Call with the lock on `out` held (OutputDir does): nothing else is writing these entries then."""
    journal = _journal_path(out)
    for part in out.parent.glob(f".{journal.name}.tmp-*"):  # killed while writing the journal
        part.unlink()
    if journal.is_file():
        try:
            record = json.loads(journal.read_text())
        except ValueError:
            record = {}
        new = out.with_name(record.get("new", ".missing"))
        if record and _inode(new) == record["new_inode"] and _inode(out) != record["new_inode"]:
            aside = _set_aside_newer(out, new, journal.stat().st_mtime)
            kept = _swap(out, new)  # the new tree was complete (the journal is written after it): finish
            log(f"note: finished an interrupted save of {out}" + (f" (kept {', '.join(kept)})" if kept else ""))
            for name in aside:
                log(f"note: {out / name} changed after that save was cut short, so it stays; the copy the save held "
                    f"is now {out / (name + '.interrupted-save')}: keep the one you want and delete the other.")
        elif record and _inode(new) is not None and _inode(new) == record.get("old_inode"):
            shutil.rmtree(new)  # exchanged, then killed before the old tree was removed
            log(f"note: removed the previous copy of {out} that an interrupted save left at {new.name}")
        journal.unlink(missing_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        if stale.is_dir() and not stale.is_symlink():
            size = sum(p.stat().st_size for p in stale.rglob("*") if p.is_file())
            shutil.rmtree(stale, ignore_errors=True)
        else:
            size = stale.lstat().st_size
            stale.unlink()
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

    kind = "directory"

    def __init__(self, path, *, inputs=(), replace: bool = False, flag: str = "--output-dir",
                 owned=is_project_model_dir, lock: bool = True, log=print, exists_hint: str = "",
                 owner: str = "a model directory written by train.py, quantize.py or convert_gpt2.py"):
        self.flag, self.log, self.exists_hint, self.owner = flag, log, exists_hint, owner
        self._lock_fd = None
        self.path = self._follow_link(Path(path).absolute())
        self._check_kind()
        self.refuse_inputs(inputs)
        if lock:
            self._lock()
        try:
            recover(self.path, log)
            self.replaces = self._check_contents(replace, owned)
        except BaseException:
            self.close()
            raise

    def _follow_link(self, path: Path) -> Path:
        """A symlinked output is written where it points (resolved once: the link stays a link); a dangling one is
        refused, since writing it would create a path somewhere the user did not name."""
        if not path.is_symlink():
            return path
        target = path.resolve()
        if not target.exists():
            raise OutputDirError(f"{self.flag} {path} is a symbolic link to {target}, which does not exist; create "
                                 f"that {self.kind}, or choose another {self.flag}.")
        self.log(f"note: {path} is a symbolic link; writing its target {target}")
        return target

    def _check_kind(self) -> None:
        """OutputDirError unless OUT is a directory (or missing), and not where the command runs."""
        real, cwd = self.path.resolve(), Path.cwd().resolve()
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{self.flag} {self.path} is a file, not a directory; choose another {self.flag}.")
        if self.path.exists() and (cwd == real or real in cwd.parents):
            raise OutputDirError(f"{self.flag} {self.path} is (or contains) the current directory; choose another one.")

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
            state = source / CHECKPOINT_DIR  # the input's resumable training state: never an output's place
            if real == state.resolve() or state.resolve() in real.parents:
                raise OutputDirError(f"{self.flag} {self.path} is inside {given}'s {CHECKPOINT_DIR}/, the state "
                                     f"`train.py --resume` continues from; write the output elsewhere (e.g. "
                                     f"{given}/int8).")

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
                f"{self.flag} {out} is not a directory this project wrote (it holds {names}); it replaces only "
                f"{self.owner}. Choose another {self.flag}."
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
        with _disk_full_is_one_line(self.path):
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


class OutputFile(OutputDir):
    """A command's output file (convert_gpt2.py to-gguf's .gguf), under the same rule: never an input, replaced only
    with --overwrite and only if the project wrote it (`owned`: for GGUF, the metadata key gguf_export writes), one
    writer at a time (`.NAME.lock`), written to `.NAME.tmp-PID` and renamed into place; temp files of killed runs
    are removed by the next writer.

        with OutputFile(dst, inputs=[src], replace=args.overwrite, owned=is_project_gguf) as output:
            with output.write() as tmp:           # write the file tmp; renamed to dst on success
                ...
    """

    kind = "file"

    def _check_kind(self) -> None:
        if self.path.is_dir():
            raise OutputDirError(f"{self.flag} {self.path} is a directory; name the file to write, e.g. "
                                 f"{self.path / 'model.gguf'}.")
        if not self.path.parent.is_dir():
            raise OutputDirError(f"{self.path.parent} is not a directory; create it first, or write {self.flag} "
                                 "elsewhere.")

    def _check_contents(self, replace: bool, owned) -> bool:
        if not os.path.lexists(self.path):
            return False
        if not replace:
            raise OutputDirError(f"{self.path} already exists; choose another path or pass --overwrite.")
        if not owned(self.path):
            raise OutputDirError(f"{self.flag} {self.path} is not a file this project wrote; --overwrite replaces only "
                                 f"a file written by this command. Choose another {self.flag}.")
        return True

    @contextlib.contextmanager
    def write(self):
        """Yield the temp path beside the output; when the block succeeds, it is renamed to the output."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with _disk_full_is_one_line(self.path):
            try:
                yield tmp
                os.chmod(tmp, 0o666 & ~user_umask())
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)


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


def read_model_config(directory: str | os.PathLike) -> dict:
    """config.json of the transformers model directory `directory`, or ModelDirError saying why it is not one."""
    directory = Path(directory)
    if not directory.is_dir() and _journal_path(directory.absolute()).is_file():
        raise ModelDirError(f"{directory} is missing: a save of it was cut short. Any command that writes it "
                            f"(e.g. `python train.py --output-dir {directory} --resume`) finishes that save first.")
    if not directory.is_dir():
        raise ModelDirError(f"{directory} is not a directory; pass a model directory (save_pretrained output).")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{directory} has no config.json; it is not a transformers model directory.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ModelDirError(f"{config_path} is not valid JSON ({err}); the directory is corrupt: copy or write it "
                            "again.") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_path} holds no JSON object; the directory is corrupt: copy or write it again.")
    return config


def check_model_dir(directory: str | os.PathLike) -> dict:
    """Return config.json as a dict if `directory` looks like a ToyGPT model dir, else raise ModelDirError."""
    directory = Path(directory)
    config = read_model_config(directory)
    if config.get("model_type") != "toygpt":
        raise ModelDirError(
            f"{directory} holds a {config.get('model_type')!r} model, not a ToyGPT one; "
            "convert GPT-2 checkpoints first with `python convert_gpt2.py from-gpt2 SRC DST`."
        )
    if not (directory / "model.safetensors").is_file():
        raise ModelDirError(f"{directory} has no model.safetensors; the weights are missing.")
    return config


def check_fp32_dir(src: Path, refusal: str = "pass the fp32 model directory it was quantized from.") -> dict:
    """config.json of the fp32 ToyGPT dir `src`; ModelDirError otherwise (for an int8 dir, `refusal` says what to
    do instead)."""
    config = check_model_dir(src)
    if config.get("quantization") is not None:
        raise ModelDirError(f"{src} is an int8-quantized ToyGPT directory; {refusal}")
    return config


def load_pretrained(cls, source, where: str | None = None, fix: str | None = None, **load_kwargs):
    """`cls.from_pretrained(source)` with every weight read from the files, or ModelDirError naming `where` (default:
    SOURCE/model.safetensors), what failed and `fix`: a traceback of a file cut short says neither which nor what now.
    The one loader every command shares (train --init-from, quantize, convert_gpt2.py, push_to_hub.py)."""
    where = where or str(Path(source) / "model.safetensors")
    try:
        model, info = cls.from_pretrained(str(source), output_loading_info=True, **load_kwargs)
    except Exception as err:  # SafetensorError on a file cut short, bad shapes, ...: these weights are unusable
        what = f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line, as transformers' messages are not
    else:
        problems = [f"{kind.replace('_', ' ')}: {', '.join(sorted(keys)[:3])}{' …' if len(keys) > 3 else ''}"
                    for kind, keys in info.items() if kind != "error_msgs" and keys]
        if not problems:  # else from_pretrained would silently fill them with random values
            return model
        what = f"its weights do not match config.json ({'; '.join(problems)})"
    fix = fix or (f"If it was cut short or damaged (an interrupted copy or download), copy it again; else re-create "
                  f"{source} with train.py. Nothing was written.")
    raise ModelDirError(f"{where} cannot be loaded ({what}). {fix}")


def load_fp32_model(src, refusal: str = "pass the fp32 model directory it was quantized from.", **load_kwargs):
    """The model of the fp32 ToyGPT dir `src` (checked: check_fp32_dir), every weight loaded, in eval mode; else
    ModelDirError saying which file and what to do. The fp32 loader of every command that reads a model dir."""
    check_fp32_dir(Path(src), refusal)
    return load_pretrained(ToyGPTForCausalLM, src, **load_kwargs).eval()
