"""Files and directories the project creates get the user's umask, as if the user had created them.

tempfile makes 0700 directories and 0600 files (right for secrets, wrong for a model dir or a cached corpus the user
shares), and libraries that write through a temp file (save_pretrained's safetensors) leave 0600 too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def user_umask() -> int:
    """The process umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(mode: int = 0o777) -> int:
    """`mode` as the user's umask lets them have it."""
    return mode & ~user_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """tempfile.mkdtemp with the permissions of any directory the user creates."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, umask_mode())
    return path


def give_umask(tree: Path) -> None:
    """Every file and dir of a tree we wrote gets the user's umask (symlinks are left as they are)."""
    mask = user_umask()
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_file_atomic(path, data: str | bytes) -> None:
    """Write the file `path` whole or not at all: `data` goes to a temp file beside it (`.NAME.tmp-PID`, the user's
    umask), renamed over `path` once complete; on any failure the temp file is removed and `path` is as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:  # open() applies the umask to 0o666, as for any file the user creates
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
