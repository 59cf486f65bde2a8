"""The one error base class of ToyGPT: every error the library raises for a user carries its exit status, and each
CLI maps it once (`prog: error: {err}`, exit err.exit_code) instead of each layer catching and re-raising.

Torch-free and import-free: the CLIs import it before parsing, and `--help` must stay instant.
"""


class ToyGPTError(Exception):
    """A failure at run time (the disk, the network, a training run that stopped): exit status 1."""

    exit_code = 1


class UsageError(ToyGPTError, ValueError):
    """Bad input (flags, paths, directories, ids), found before or instead of any work: exit status 2, argparse's.
    A ValueError too, as the classes it replaces were."""

    exit_code = 2
