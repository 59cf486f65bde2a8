"""Shared fixtures: small configs, a saved random model dir, the Shakespeare corpus, fresh-process runner."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# Two cores on CI: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))
# int8 generate() compiles its decode step by default (seconds per model and shape): the suite decodes eagerly, here
# and in every process it starts; tests/test_int8_decode.py turns the compiled path back on where it checks it.
os.environ["TOYGPT_INT8_COMPILE"] = "0"


@contextlib.contextmanager
def one_thread():
    """Run a command's work (training, generating) in the test process on one thread, as the suite's processes of
    train.py and the app do (OMP_NUM_THREADS=1): beside other work on two cores, two intra-op threads run a tiny
    model's steps many times slower (45 training steps: 78 s against 0.6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_config(**overrides):
    from configuration_toygpt import ToyGPTConfig

    return ToyGPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=64), **overrides})


@pytest.fixture
def config():
    return small_config()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete saved model dir (random weights, tokenizer, generation config)."""
    from toygpt.model_dir import save_model_dir
    from modeling_toygpt import ToyGPTForCausalLM

    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config())
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def shakespeare_path():
    """The real tiny Shakespeare where ../shared has it; else the project's default corpus."""
    if SHARED_SHAKESPEARE.is_file():
        return SHARED_SHAKESPEARE
    from toygpt import corpus

    return corpus.default_corpus_path()


def run_python(code, cwd, env=None, timeout=300):
    """Run `code` in a fresh interpreter in `cwd`, offline; return stdout (raise with stderr on failure)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
