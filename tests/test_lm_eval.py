"""EleutherAI's lm-evaluation-harness on a saved ToyGPT dir and its int8 copy, through the repo's local task
(bench/lm_eval/toygpt_text.yaml: rolling log-likelihood of a text file, no download), checked against
toygpt/evaluation.py's `evaluate` on the same text.

How the two score text, and why they agree exactly on the windows checked here:

* Units. The harness reports bits per UTF-8 byte of each document; ToyGPT bits per character of the target tokens.
  The texts here are ASCII, where bytes and characters are the same count (asserted).
* Windows. The harness tokenizes each document on its own and predicts every token: the first window feeds
  <|endoftext|> then the document's first B-1 tokens and scores B tokens (B = the context, 64 here); each next
  window scores the next B tokens from the B tokens before them; the last one scores the r = N mod B left over
  with a full context of B. That is ToyGPT's packing (`stream.val_windows`: windows of B+1 tokens at stride B) of
  <|endoftext|> + the document, plus that partial tail. ToyGPT's own validation stream differs at the edges:
  no <|endoftext|> in front (its first token is context only), and an incomplete last window is dropped; so its
  figure over a text file's held-out part is a different average, reported beside the harness's, not compared.
* Rounding. Both sides run the same float32 model on the same inputs one window at a time (batch size 1, which
  also gives the int8 copy's dynamic activation quantization the same tensors); the harness sums float32 per-window
  log-likelihoods, ToyGPT float64 sums. A float32 sum of N terms is within N * 2**-24 of exact, relatively: the
  tolerance, with N the tokens scored.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (requirements-dev.txt: `make install`)")

from transformers import AutoModelForCausalLM  # noqa: E402

from toygpt import bpe  # noqa: E402
from toygpt.stream import ValWindows, val_windows  # noqa: E402
from toygpt.text_files import split_text  # noqa: E402
from toygpt.evaluation import evaluate  # noqa: E402
from toygpt.training_loss import CausalLMLoss  # noqa: E402

sys.path.insert(0, str(REPO / "bench" / "lm_eval"))
from toygpt_text import read_documents  # noqa: E402

B = 64  # conftest's small_config block_size
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    """{"fp32": the saved random model, "int8": its copy made by quantize.py}."""
    out = tmp_path_factory.mktemp("lm_eval") / "tiny-int8"
    subprocess.run([sys.executable, "quantize.py", str(tiny_model_dir), str(out), "--speed-tokens", "8"], cwd=REPO,
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return {"fp32": tiny_model_dir, "int8": out}


@pytest.fixture(scope="module")
def texts(shakespeare_path, tmp_path_factory):
    """Two local text files: `lines`, whose held-out paragraphs are single lines (each shorter than the context),
    and `prose`, whose held-out part is one document of several windows."""
    head = shakespeare_path.read_text(encoding="utf-8")[:20000]
    assert head.isascii()
    folder = tmp_path_factory.mktemp("texts")
    (folder / "lines.txt").write_text("\n\n".join(line for line in head.splitlines() if line.strip()))
    (folder / "prose.txt").write_text(head)
    return {"lines": folder / "lines.txt", "prose": folder / "prose.txt"}


def harness(model_dir, metadata):
    """The harness's result for the toygpt_text task: (bits_per_byte, its logged samples)."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "trust_remote_code": True}, device="cpu",
        batch_size=1, tasks=["toygpt_text"], log_samples=True,
        task_manager=TaskManager(include_path=str(REPO / "bench" / "lm_eval"), include_defaults=False,
                                 metadata=metadata))
    return results["results"]["toygpt_text"]["bits_per_byte,none"], results["samples"]["toygpt_text"]


def loss_sum(model, windows):
    """ToyGPT's summed loss (nats) over `windows` (rows of equal length), through toygpt.evaluation.evaluate."""
    chars = torch.tensor([len(bpe.get_encoding().decode(window[1:])) for window in windows])  # ASCII: = bytes
    result = evaluate(CausalLMLoss(model), ValWindows(torch.tensor(windows), chars), batch_size=1)
    return result["val_loss"] * result["val_tokens"]


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_harness_bits_per_byte_equal_toygpts_on_documents_shorter_than_the_context(model_dirs, texts, kind):
    """Each document fits one window: the harness's window is exactly ToyGPT's [<|endoftext|>] + document."""
    bits, samples = harness(model_dirs[kind], {"path": str(texts["lines"])})
    docs = read_documents(texts["lines"])
    assert [sample["doc"]["text"] for sample in samples] == docs and len(docs) > 20
    model = AutoModelForCausalLM.from_pretrained(model_dirs[kind], trust_remote_code=True)
    total, n_tokens = 0.0, 0
    for doc in docs:
        ids = [bpe.EOT_ID] + bpe.encode(doc)
        assert len(ids) <= B + 1, doc
        total += loss_sum(model, [ids])
        n_tokens += len(ids) - 1
    expected = total / sum(len(doc) for doc in docs) / math.log(2)
    assert bits == pytest.approx(expected, rel=n_tokens * 2**-24, abs=0), kind


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_harness_bits_per_byte_equal_toygpts_windows_of_a_long_document(model_dirs, texts, kind, record_property):
    """One document of several windows: ToyGPT's packing of <|endoftext|> + the document, plus the harness's tail
    (its last r targets: the loss over the window ending the document with the first B - r targets ignored)."""
    bits, _ = harness(model_dirs[kind], {"path": str(texts["prose"]), "documents": "whole"})
    (doc,) = read_documents(texts["prose"], documents="whole")
    tokens = [bpe.EOT_ID] + bpe.encode(doc)
    n = len(tokens) - 1
    full, r = divmod(n, B)
    assert full >= 4 and r > 0, (n, B)  # the case with windows and a tail
    model = AutoModelForCausalLM.from_pretrained(model_dirs[kind], trust_remote_code=True)
    total = loss_sum(model, [tokens[i * B:i * B + B + 1] for i in range(full)])
    tail = torch.tensor([tokens[-B - 1:]])
    targets = tail[:, 1:].clone()
    targets[:, :B - r] = -100
    with torch.no_grad():
        total += CausalLMLoss(model.eval())(tail[:, :-1], targets, reduction="sum").item()
    assert bits == pytest.approx(total / len(doc) / math.log(2), rel=n * 2**-24, abs=0), kind

    # ToyGPT's own figure on the same held-out text (its windows, see the module docstring): reported.
    own = evaluate(CausalLMLoss(model), val_windows(texts["prose"], B), batch_size=8)["val_bits_per_char"]
    record_property(f"lm_eval_bits_per_byte_{kind}", bits)
    record_property(f"toygpt_val_bits_per_char_{kind}", own)
    print(f"{kind}: harness {bits:.4f} bits/byte, ToyGPT's validation windows {own:.4f} bits/char")
    assert doc == texts["prose"].read_bytes()[split_text(texts["prose"]).boundary_byte:].decode()
