"""train.py end to end: real `python train.py` processes on a tiny model and a slice of tiny Shakespeare.

Every run uses a 2-layer, 32-wide model with a 32-token context (most of its time goes to the 50257-token head),
one thread per process, and 60 kB of text, so a run takes a few seconds, mostly imports. A test's further runs
(a refusal, a resume after its real run) call train.main() in the test process (main_in_process): the same code,
without those imports again.
"""

import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, one_thread, run_python
from test_tracking import expected as expected_scalars, tensorboard_scalars
from test_optim import scheduled_lrs
from toygpt import regularization
from toygpt.defaults import EPOCH_RULES

TRAIN = REPO / "train.py"
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "4", "--grad-accum", "1"]
# Run A of the resume test and the run whose output directory the other tests inspect. Dropout is on so that the
# RNG state has to survive the resume too; eval and checkpoint cadence do not change the trajectory.
STEPS = 24
# The tiny preset's Muon with the cosine schedule, whose curve the schedule tests check step by step.
RUN = TINY + ["--max-steps", str(STEPS), "--warmup-steps", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--dropout", "0.1",
              "--eval-every", "8", "--eval-batches", "2", "--seed", "7", "--schedule", "cosine"]


def train_cmd(*args):
    return [sys.executable, str(TRAIN), *map(str, args)]


def train_env(**extra):
    # One thread per process: the CI box has 2 cores and the DDP test runs two trainers at once.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOYGPT_OFFLINE": "1", **extra}


def run_train(*args, cwd=None, timeout=300, **env):
    proc = subprocess.run(train_cmd(*args), cwd=cwd, env=train_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare_path):
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, text_file):
    """One uninterrupted run (its final checkpoint only): the reference for resume, and the output dir checked."""
    out = tmp_path_factory.mktemp("run_a") / "model"
    proc = run_train("--input", text_file, "--output-dir", out, *RUN, "--checkpoint-every", "1000")
    (out.parent / "train.stderr").write_text(proc.stderr)  # beside the output dir, for the tests of what it printed
    return out


@pytest.fixture(scope="module")
def train_module():
    import train

    return train


@pytest.fixture(scope="module")
def training():
    from toygpt import training

    return training


# ----------------------------------------------------------------------------------------------------------------
# Bad input: exit 2 with a clear message, before any work, leaving no output directory


def bad_inputs(tmp):
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "empty_dir").mkdir()
    good = "First Citizen:\nBefore we proceed any further, hear me speak.\n".encode() * 40 + b"caf"
    (tmp / "latin1.txt").write_bytes(good + "\xe9\n".encode("latin-1") + b"more text\n" * 100)
    (tmp / "short.txt").write_text("To be, or not to be.\n" * 3)
    return {
        "missing": (["--input", tmp / "nope.txt"], "nope.txt does not exist"),
        # A directory of text files is an input (issue 11); one with nothing in it is not.
        "directory": (["--input", tmp / "empty_dir"], "holds no files"),
        "empty": (["--input", tmp / "empty.txt"], "is empty"),
        "not_utf8": (["--input", tmp / "latin1.txt"],
                     f"not valid UTF-8: the first bad byte is at byte offset {len(good)} (0xe9)"),
        "too_short": (["--input", tmp / "short.txt"], "too short for block_size=32"),
    }


BAD_FLAGS = {
    "heads_do_not_divide": (["--n-embd", "30", "--n-head", "4"], "n_embd"),
    "zero_batch": (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    "zero_steps": (["--max-steps", "0"], "--max-steps must be positive"),
    "negative_lr": (["--lr=-0.001"], "--lr must be >= 0"),
    "min_lr_above_lr": (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr (0.001) must not exceed --lr (0.0001)"),
    "dropout_one": (["--dropout", "1.0"], "dropout"),
    "zero_budget": (["--time-budget-min", "0"], "--time-budget-min must be positive"),
    "ema_one": (["--ema-decay", "1"], "--ema-decay must be in [0, 1) (0: no moving average), got 1.0"),
    "no_gpu": (["--device", "cuda"], "no CUDA GPU is available"),
    # Issue 17: each raised a traceback after the output dir was made.
    "negative_seed": (["--seed", "-1"], "--seed must be between 0 and 4294967295 (2**32 - 1), got -1"),
    "huge_seed": (["--seed", "99999999999999999999"], "--seed must be between 0 and 4294967295"),
    # `nan < 0` is false: every float flag is checked for a finite value first.
    **{f"{flag}_{value}": ([f"--{flag}", value], f"--{flag} must be a finite number, got {value}")
       for flag, value in [("lr", "nan"), ("lr", "inf"), ("min-lr", "nan"), ("weight-decay", "inf"),
                           ("grad-clip", "nan"), ("dropout", "nan"), ("time-budget-min", "inf")]},
}


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "not_utf8", "too_short", *BAD_FLAGS])
def test_bad_input_is_a_clear_error_before_any_work(case, tmp_path, text_file, train_module, capsys):
    if case in BAD_FLAGS:
        flags, message = BAD_FLAGS[case]
        argv = ["--input", str(text_file), *TINY, *flags]
    else:
        flags, message = bad_inputs(tmp_path)[case]
        argv = [*map(str, flags), *TINY]
    out = tmp_path / "out"
    assert train_module.main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err, err
    assert not out.exists()


def test_existing_output_dir_needs_overwrite(tmp_path, text_file, train_module, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert train_module.main(["--input", str(text_file), *TINY, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "--resume" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # A file where the directory should go is refused even with --overwrite.
    (tmp_path / "file").write_text("x")
    argv = ["--input", str(text_file), *TINY, "--output-dir", str(tmp_path / "file"), "--overwrite"]
    assert train_module.main(argv) == 2
    assert "is a file" in capsys.readouterr().err


def test_resume_without_checkpoint_is_refused(tmp_path, train_module, capsys):
    assert train_module.main(["--resume", "--output-dir", str(tmp_path / "out")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_input_through_the_real_cli(tmp_path):
    """The same through a real process: exit status 2, one error line, no traceback, no output dir."""
    flags, message = bad_inputs(tmp_path)["not_utf8"]
    out = tmp_path / "out"
    proc = subprocess.run(train_cmd(*flags, *TINY, "--output-dir", out), env=train_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "iconv" in proc.stderr  # says how to fix it
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Schedule


def test_run_logs_the_schedule(run_a, train_module):
    """The lr each optimizer step of a real run used is the warmup + cosine curve, ending near --min-lr."""
    logged = [r["lr"] for r in metrics(run_a) if "train_loss" in r and "final" not in r]
    expected, _ = scheduled_lrs(STEPS, lr=3e-3, min_lr=3e-4, warmup_steps=4)
    assert logged == pytest.approx(expected, rel=1e-9)
    assert logged[0] == 0.0 and logged[4] == pytest.approx(3e-3)
    assert 3e-4 < logged[-1] < 3.2e-4  # one step before the end of the cosine


def test_time_budget_fits_the_schedule_and_stops(tmp_path, text_file, training):
    budget_s = 6.0
    out = tmp_path / "model"
    proc = run_train("--input", text_file, "--output-dir", out, *TINY, "--schedule", "cosine", "--time-budget-min", budget_s / 60,
              "--max-steps", 100_000, "--warmup-steps", 2, "--lr", "1e-3", "--min-lr", "1e-4", "--eval-every", 10_000,
              "--eval-batches", 1, "--checkpoint-every", 10_000)
    records = metrics(out)
    final = records[-1]
    assert final["final"] and 0 < final["step"] < 100_000
    # Stops once the budget is spent (one step late at most; the final eval and save come after).
    assert final["elapsed_s"] < budget_s + 5, final
    assert final["step"] > training.FIT_STEPS, "too slow to fit the schedule within 6 s"
    state = json.loads(next((out / "checkpoint").glob("step-*/trainer_state.json")).read_text())
    assert state["budget_fitted"] and final["step"] <= state["total_steps"] < 100_000
    # After the fit at step FIT_STEPS (no refit: eval never runs), the lr follows the cosine ending at the fitted
    # total step count, instead of the 100000-step one it started with.
    lrs = [r["lr"] for r in records if "train_loss" in r and "final" not in r]
    fitted, _ = scheduled_lrs(state["total_steps"], lr=1e-3, min_lr=1e-4, warmup_steps=2)
    fit_step = training.FIT_STEPS
    assert lrs[fit_step:] == pytest.approx(fitted[fit_step:len(lrs)], rel=1e-9)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    # Issue 18: the epochs rule chose --weight-decay at the fit, from the fitted step count, and recorded it.
    epochs = regularization.run_epochs(state["total_steps"], 4 * 32, state["vocab"]["train_tokens"])
    assert state["args"]["weight_decay"] == regularization.by_epochs(epochs, EPOCH_RULES["weight_decay"])
    assert f"{state['total_steps']:,} steps of 128 tokens read the training split's" in proc.stderr
    # Issue 21: the bar's horizon is the budget from the first step (not 100000 steps), and it ends at 100%.
    bars = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("train:")]
    assert bars and all("/6 s of budget" in line for line in bars), bars
    assert bars[0].startswith("train:   0%") and bars[-1].startswith("train: 100%"), bars
    assert f"step={final['step']}/{final['step']}" in bars[-1]


# ----------------------------------------------------------------------------------------------------------------
# Output directory


def test_output_dir_is_complete(run_a):
    names = {p.name for p in run_a.iterdir()}
    assert {"config.json", "configuration_toygpt.py", "modeling_toygpt.py", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "metrics.jsonl", "training_args.json",
            "loss_curve.png", "README.md"} <= names
    assert not list(run_a.parent.glob(".*tmp*")), "temp dirs left beside the output"
    assert not [p for p in run_a.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    config = json.loads((run_a / "config.json").read_text())
    assert config["model_type"] == "toygpt"
    assert (config["n_layer"], config["n_embd"], config["block_size"]) == (2, 32, 32)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_toygpt.ToyGPTForCausalLM"
    generation = json.loads((run_a / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["top_k"] == 50
    args = json.loads((run_a / "training_args.json").read_text())
    assert args["max_steps"] == STEPS and args["seed"] == 7 and args["dropout"] == 0.1
    assert Path(args["input_path"]).is_absolute() and Path(args["input_path"]).is_file()  # quantize.py evaluates on it
    assert (run_a / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = metrics(run_a)
    assert [r["step"] for r in records if "train_loss" in r and "final" not in r] == list(range(1, STEPS + 1))
    # Every --eval-every steps, twice as often in the last 30% (best_model.eval_due); step 24's is the final eval.
    assert [r["step"] for r in records if "val_loss" in r and "final" not in r] == [8, 16, 20, 24]
    final = records[-1]
    assert final["final"] and final["step"] == STEPS and final["tokens_seen"] == STEPS * 4 * 32
    assert final["val_perplexity"] == pytest.approx(math.exp(final["val_loss"]))
    assert 0 < final["val_bits_per_char"] < final["val_loss"] / math.log(2)  # GPT-2 tokens span > 1 character
    assert final["val_loss"] < records[0]["train_loss"]  # it learned something


def test_model_card(run_a):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run_a / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license and "toygpt" in card.data.tags
    final = metrics(run_a)[-1]
    assert f"{final['val_bits_per_char']:.4f}" in card.text and f"{final['val_perplexity']:.2f}" in card.text
    assert "2 layers, 2 heads, 32-dim" in card.text
    assert "loss_curve.png" in card.text
    assert "AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)" in card.text
    assert "AutoTokenizer.from_pretrained(repo, trust_remote_code=True)" in card.text


def test_output_dir_loads_in_a_fresh_process(run_a, tmp_path):
    """From another working directory, without the repo on the path: the remote code in the dir is what runs."""
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(run_a)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(run_a)!r}, trust_remote_code=True)  # as the model card says
assert type(model).__name__ == "ToyGPTForCausalLM", type(model)
assert model.generation_config.top_k == 50 and model.generation_config.do_sample
ids = tok("ROMEO:", return_tensors="pt")
torch.manual_seed(0)
out = model.generate(**ids, max_new_tokens=8)
print(json.dumps([out.shape[1] - ids["input_ids"].shape[1], tok.decode(out[0])]))
"""
    stdout = run_python("import json\n" + code, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    n_new, text = json.loads(stdout.strip().splitlines()[-1])
    assert n_new == 8 and text.startswith("ROMEO:"), stdout


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


@pytest.mark.slow
def test_resume_after_sigkill_matches_the_uninterrupted_run(run_a, tmp_path, text_file):
    out = tmp_path / "model"
    cmd = train_cmd("--input", text_file, "--output-dir", out, *RUN, "--checkpoint-every", 3)
    log = tmp_path / "killed_run.log"  # a file, not a pipe: nobody reads it while the run goes on
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=train_env(), stdout=subprocess.DEVNULL, stderr=f)
    try:
        # Kill it as soon as a checkpoint from step 6 on is complete (trainer_state.json is written last).
        def complete_checkpoints():
            return sorted(p.parent.name for p in out.glob("checkpoint/step-*/trainer_state.json"))

        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if complete_checkpoints() and complete_checkpoints()[-1] >= "step-00000006":
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed:\n{log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "config.json").exists()  # the model directory is only written at the end
    checkpoints = complete_checkpoints()
    assert checkpoints and checkpoints[-1] >= "step-00000006"
    killed_at = int(checkpoints[-1].split("-")[1])
    assert killed_at < STEPS

    # Checkpoints hold safetensors and JSON only: nothing to unpickle.
    for path in (out / "checkpoint" / checkpoints[-1]).iterdir():
        assert path.suffix in (".safetensors", ".json"), path
        if path.suffix == ".safetensors":
            load_file(path)

    resumed = run_train("--resume", "--output-dir", out)  # every setting comes from the checkpoint
    assert f"resumed from {out / 'checkpoint' / checkpoints[-1]} at step {killed_at}" in resumed.stderr

    a, b = load_file(run_a / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The metrics read as one run: each step once (records after the last checkpoint were dropped), same losses.
    train_a = [(r["step"], r["train_loss"], r["lr"]) for r in metrics(run_a) if "lr" in r]
    train_b = [(r["step"], r["train_loss"], r["lr"]) for r in metrics(out) if "lr" in r]
    assert train_b == train_a
    assert metrics(out)[-1]["val_loss"] == metrics(run_a)[-1]["val_loss"]
    # The TensorBoard run (the default tracker) continues too: the killed steps purged, each step once.
    assert tensorboard_scalars(out / "runs") == expected_scalars(metrics(out))


def test_metrics_line_cut_short_by_a_kill_is_skipped(tmp_path):
    from toygpt import run_log

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 10.9}\n{"step": 2, "train_loss": 10.8}\n{"step": 3, "tra')
    assert [r["step"] for r in run_log.read_metrics(path)] == [1, 2]


# ----------------------------------------------------------------------------------------------------------------
# DistributedDataParallel


@pytest.mark.slow
def test_two_process_ddp_over_gloo(tmp_path, text_file):
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN),
           "--input", str(text_file), "--output-dir", str(out), *TINY, "--max-steps", "4", "--warmup-steps", "1",
           "--eval-every", "2", "--eval-batches", "3", "--checkpoint-every", "2"]
    proc = subprocess.run(cmd, env=train_env(TOYGPT_LOG_BATCH_HASH="1"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = dict(re.findall(r"rank (\d) first batch sha256 ([0-9a-f]+)", proc.stderr))
    assert set(hashes) == {"0", "1"} and hashes["0"] != hashes["1"], proc.stderr[-3000:]
    vocabs = dict(re.findall(r"rank (\d) vocab sha256 ([0-9a-f]+)", proc.stderr))  # rank 0's pass, shared
    assert set(vocabs) == {"0", "1"} and vocabs["0"] == vocabs["1"], proc.stderr[-3000:]

    final = metrics(out)[-1]
    assert final["world_size"] == 2 and final["step"] == 4 and final["tokens_seen"] == 4 * 4 * 32 * 2
    state = json.loads(next((out / "checkpoint").glob("step-*/trainer_state.json")).read_text())
    assert [r["stream"]["rank"] for r in state["ranks"]] == [0, 1]  # every rank's stream position, for --resume

    from modeling_toygpt import ToyGPTForCausalLM

    model = ToyGPTForCausalLM.from_pretrained(out)
    ids = torch.tensor([[464, 3290, 318]])
    assert model(input_ids=ids).logits.shape == (1, 3, model.config.vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# Failures: a clear message and exit 1 or 2, never a traceback; nothing of the user's lost, no step lost


def run_train_failing(*args, cwd=None, timeout=300, **env):
    proc = subprocess.run(train_cmd(*args), cwd=cwd, env=train_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, proc.stderr.strip().splitlines()[-1]


def main_in_process(train_module, capsys, *args):
    """train.main(args) in the test process: (exit status, stderr). The code `python train.py` runs, without a fresh
    process importing torch and transformers again (seconds each); an exception escaping main() fails the test, as
    a traceback would. For runs whose point is what they do, not the process: each test keeps a real one."""
    with one_thread():
        code = train_module.main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, err


def main_failing(train_module, capsys, *args):
    """main_in_process for a run that must fail: (exit status, the last line of stderr)."""
    code, err = main_in_process(train_module, capsys, *args)
    assert code != 0, err[-3000:]
    return code, err.strip().splitlines()[-1]


def test_overwrite_never_deletes_the_input_or_the_users_files(tmp_path, text_file, train_module, capsys,
                                                              monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "input.txt").write_text(text_file.read_text())
    code, err = run_train_failing("--input", data_dir / "input.txt", "--output-dir", data_dir, "--overwrite", *TINY)
    assert code == 2 and err.startswith("train.py: error:") and "contains the input" in err
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        code, err = main_failing(train_module, capsys, "--input", "data/input.txt", "--output-dir", ".", "--overwrite",
                                 *TINY)
    assert code == 2 and "is (or contains) the current directory" in err  # once failed at the swap, with EBUSY
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    code, err = main_failing(train_module, capsys, "--input", data_dir / "input.txt", "--output-dir", notes,
                             "--overwrite", *TINY)
    assert code == 2 and "not a directory this project wrote" in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "data", "data/input.txt", "notes", "notes/todo.txt"]


def test_the_users_files_in_the_model_dir_survive_resume_and_overwrite(tmp_path, text_file, train_module, capsys):
    out = tmp_path / "model"
    run_train("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 2, "--eval-batches", 1)
    (out / "int8").mkdir()
    (out / "int8" / "config.json").write_text('{"model_type": "toygpt", "quantization": {}}')
    (out / "int8" / "model.safetensors").write_bytes(b"an int8 copy")
    (out / "notes.txt").write_text("mine")
    code, err = main_in_process(train_module, capsys, "--output-dir", out, "--resume", "--max-steps", 3)
    assert code == 0 and "kept in" in err and "int8, notes.txt" in err
    assert metrics(out)[-1]["step"] == 3
    code, err = main_in_process(train_module, capsys, "--input", text_file, "--output-dir", out, *TINY, "--max-steps",
                                2, "--eval-batches", 1, "--overwrite")
    assert code == 0, err[-3000:]
    assert (out / "notes.txt").read_text() == "mine" and (out / "int8" / "model.safetensors").read_bytes()
    assert metrics(out)[-1]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp, lock or journal left beside it


def test_resume_with_a_changed_architecture_names_the_flags(run_a, train_module, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_a.rglob("*"))
    code = train_module.main(["--resume", "--output-dir", str(run_a), "--n-layer", "3", "--n-embd", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "--n-layer 3 (the checkpoint has 2)" in err and "--n-embd 64 (the checkpoint has 32)" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_a.rglob("*")) == before


def test_a_grad_accum_beyond_one_steps_bound_is_refused_before_any_work(tmp_path, text_file):
    """Issue 17: --grad-accum 1000000000 made one optimizer step that never ends (Ctrl-C stops at a step); a real
    process, so that today's code fails by its timeout rather than hanging the suite."""
    out = tmp_path / "model"
    proc = subprocess.run(train_cmd("--input", text_file, "--output-dir", out, *TINY, "--grad-accum", 1_000_000_000),
                          env=train_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert ("--grad-accum 1000000000 makes one optimizer step 128,000,000,000 tokens per process" in proc.stderr
            and "a step is at most 16,777,216 tokens" in proc.stderr and "Use --grad-accum 131072 or less" in proc.stderr)
    assert not out.exists()


# training_args.json as train.py wrote it up to commit 6bf8614 (a tiny run on a text file): these keys, no more.
RECORD_KEYS_6BF8614 = [
    "input", "dataset", "dataset_config", "split", "text_column", "output_dir", "preset", "init_from", "init_revision",
    "n_layer", "n_head", "n_embd", "block_size", "dropout", "batch_size", "grad_accum", "vocab", "optimizer",
    "schedule", "lr", "embedding_lr", "min_lr", "warmup_steps", "max_steps", "time_budget_min", "weight_decay",
    "grad_clip", "eval_every", "eval_batches", "checkpoint_every", "seed", "device", "dtype", "compile", "overwrite",
    "resume", "data_description", "data_source", "data_fingerprint", "input_path", "input_sha256"]


def test_a_run_recorded_by_the_old_namespace_resumes_and_is_read_back(run_a, tmp_path):
    """A checkpoint and model dir whose records hold exactly the keys train.py wrote before TrainingConfig (no
    vocab_used, no data_holdout) still --resume, and quantize.py and the cards read them."""
    from toygpt import quantization
    from toygpt import model_card

    out = tmp_path / "model"
    shutil.copytree(run_a, out)
    record = json.loads((out / "training_args.json").read_text())
    assert set(RECORD_KEYS_6BF8614) <= set(record)  # today's keys are still written, same names
    old = {key: record[key] for key in RECORD_KEYS_6BF8614}
    (out / "training_args.json").write_text(json.dumps(old, indent=2))
    state_path = next((out / "checkpoint").glob("step-*/trainer_state.json"))
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "args": old}, indent=1))

    assert quantization.training_input(out) == record["input_path"]
    words = " ".join(model_card.dir_card(model_card.read_records(out)).text.split())
    assert "Muon" in words and "20 warmup steps" not in words and "cosine decay to 0.0003" in words
    run_train("--output-dir", out, "--resume", "--max-steps", STEPS + 2)
    assert metrics(out)[-1]["step"] == STEPS + 2
    resumed = json.loads((out / "training_args.json").read_text())
    assert resumed["vocab_used"] == "corpus" and resumed["optimizer"] == "muon" and resumed["max_steps"] == STEPS + 2


def test_resume_after_the_input_changed_is_refused(tmp_path, text_file, train_module, capsys):
    text = tmp_path / "input.txt"
    text.write_text(text_file.read_text())
    out = tmp_path / "model"
    run_train("--input", text, "--output-dir", out, *TINY, "--max-steps", 2, "--eval-batches", 1)
    text.write_text(text_file.read_text().replace("the", "thee"))
    code, err = main_failing(train_module, capsys, "--output-dir", out, "--resume", "--max-steps", 4)
    assert code == 2 and "has changed since the checkpoint" in err


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, text_file, train_module, capsys):
    out = tmp_path / "model"
    cmd = train_cmd("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 100_000, "--eval-every", 100_000,
                    "--checkpoint-every", 100_000)
    proc = subprocess.Popen(cmd, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(metrics(out) if (out / "metrics.jsonl").exists() else []) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    step = int(re.search(r"interrupted by Ctrl-C at step (\d+)", last).group(1))
    assert f"Continue with: python train.py --output-dir {out} --resume" in last
    assert (out / "checkpoint" / f"step-{step:08d}" / "trainer_state.json").is_file()
    code, err = main_in_process(train_module, capsys, "--output-dir", out, "--resume", "--max-steps", step + 2)
    assert code == 0 and f"at step {step}" in err and metrics(out)[-1]["step"] == step + 2


def test_a_diverging_run_stops_at_the_first_non_finite_loss_keeping_the_last_good_checkpoint(tmp_path, text_file):
    out = tmp_path / "model"
    code, err = run_train_failing("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 20,
                                  "--warmup-steps", 0, "--lr", "1e30", "--min-lr", 0, "--checkpoint-every", 1)
    assert code == 1 and "training diverged" in err and "lower --lr" in err
    diverged_at = int(re.search(r"is nan at step (\d+)", err).group(1))
    last_good = load_file(out / "checkpoint" / f"step-{diverged_at - 1:08d}" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in last_good.values())
    assert not (out / "config.json").exists()  # no model dir from a diverged run


def test_the_final_checkpoint_is_saved_before_the_final_eval(tmp_path, text_file, train_module, training,
                                                              monkeypatch):
    def out_of_memory_in_the_final_eval(*args, **kwargs):  # 5 steps, --eval-every 100: the only eval is the final one
        raise MemoryError("simulated")

    monkeypatch.setattr(training, "evaluate_and_log", out_of_memory_in_the_final_eval)
    out = tmp_path / "model"
    with pytest.raises(MemoryError), one_thread():
        train_module.main(["--input", str(text_file), "--output-dir", str(out), *TINY, "--max-steps", "5",
                           "--eval-batches", "1", "--checkpoint-every", "1000"])
    assert (out / "checkpoint" / "step-00000005" / "trainer_state.json").is_file()


def test_a_second_run_into_the_same_dir_is_refused_naming_the_first(tmp_path, text_file, train_module, capsys):
    out = tmp_path / "model"
    first = subprocess.Popen(train_cmd("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 100_000),
                             env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        code, err = main_failing(train_module, capsys, "--input", text_file, "--output-dir", out, *TINY, "--overwrite")
        assert code == 2 and f"being written by another run (pid {first.pid}" in err
    finally:
        first.kill()
        first.wait()


def test_outputs_and_checkpoints_get_the_users_umask(run_a):
    mask = os.umask(0)
    os.umask(mask)
    for path in [run_a, run_a / "checkpoint", *run_a.glob("checkpoint/step-*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask, path
    for path in [run_a / "model.safetensors", *run_a.glob("checkpoint/step-*/*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


# ----------------------------------------------------------------------------------------------------------------
# The corpus vocabulary (toygpt/corpus_vocab.py): the compact run saves the full model, with the numbers it reported


def test_the_saved_full_model_scores_the_last_compact_eval(run_a, text_file):
    """run_a trained the corpus vocabulary (its 48k training characters use a few thousand ids); the model dir holds
    the full 50257-row model, whose own validation loss over the same windows is the final eval's."""
    from toygpt.evaluation import evaluate
    from modeling_toygpt import ToyGPTForCausalLM
    from toygpt.training_loss import CausalLMLoss

    from toygpt.stream import val_windows

    state = json.loads(next((run_a / "checkpoint").glob("step-*/trainer_state.json")).read_text())
    n_seen = len(state["vocab"]["seen_ids"])
    assert 0 < n_seen < 50257 / 2  # the checkpoint trained (and resumes) the compact model
    model = ToyGPTForCausalLM.from_pretrained(run_a)
    assert model.config.vocab_size == 50257 and model.transformer.wte.weight.shape == (50257, 32)
    final = metrics(run_a)[-1]
    val = val_windows(text_file, 32, max_windows=2 * 4)  # --eval-batches x --batch-size
    result = evaluate(CausalLMLoss(model), val, batch_size=4)
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert result["val_bits_per_char"] == pytest.approx(final["val_bits_per_char"], rel=1e-5)


def test_vocab_full_trains_every_row(tmp_path, text_file, run_a):
    out = tmp_path / "model"
    proc = run_train("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 2, "--eval-batches", 1,
                     "--vocab", "full")
    assert "vocab:" not in proc.stderr  # no pass over the data: nothing to choose
    state = json.loads(next((out / "checkpoint").glob("step-*/trainer_state.json")).read_text())
    assert state["vocab"] is None
    auto = (run_a.parent / "train.stderr").read_text()  # run_a: the default --vocab auto, on the same text
    assert re.search(r"vocab: the training split uses [\d,]+ of the 50,257 token ids \(one pass, [\d.]+ s\): "
                     r"training the corpus vocabulary", auto), auto[-2000:]


def test_bf16_autocast_trains_on_the_cpu(tmp_path, text_file):
    """--dtype bfloat16 (the default on a GPU) through the fused head, eager: its fp32 hidden states and bf16
    products (it once stopped with a dtype error here)."""
    out = tmp_path / "model"
    run_train("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 2, "--eval-batches", 1,
              "--dtype", "bfloat16", "--report-to", "none")
    final = metrics(out)[-1]
    assert final["final"] and math.isfinite(final["val_loss"])
    assert json.loads((out / "training_args.json").read_text())["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------------------------
# Tracked runs (--report-to, toygpt/tracking.py) and the first hour of a new user (issue 21)


def test_the_tensorboard_events_in_the_model_dir_equal_metrics_jsonl(run_a):
    """The default tracker: every record of metrics.jsonl, values and steps, in the model dir's runs/ (uploaded)."""
    assert json.loads((run_a / "training_args.json").read_text())["report_to"] == ["tensorboard"]
    scalars = tensorboard_scalars(run_a / "runs")
    assert scalars == expected_scalars(metrics(run_a))
    assert [step for step, _ in scalars["train_loss"]][:STEPS] == list(range(1, STEPS + 1))


def test_a_resumed_run_continues_the_same_tracked_run(tmp_path, text_file):
    """TensorBoard and trackio (its local store in tmp, nothing sent anywhere): one run across --resume."""
    out, store = tmp_path / "model", tmp_path / "trackio"
    common = dict(TRACKIO_DIR=str(store))
    run_train("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 2, "--eval-every", 2,
              "--eval-batches", 1, "--report-to", "tensorboard", "trackio", **common)
    run_name = json.loads((out / "training_args.json").read_text())["run_name"]
    run_train("--output-dir", out, "--resume", "--max-steps", 4, **common)
    assert json.loads((out / "training_args.json").read_text())["run_name"] == run_name
    assert tensorboard_scalars(out / "runs") == expected_scalars(metrics(out))
    code = f"""
import json
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps([SQLiteStorage.get_runs("toygpt"), SQLiteStorage.get_logs("toygpt", {run_name!r})]))
"""
    runs, logs = json.loads(run_python(code, cwd=tmp_path, env=common).strip().splitlines()[-1])
    assert runs == [run_name]
    train_losses = [(log["step"], log["train_loss"]) for log in logs if "lr" in log]
    assert train_losses == [(r["step"], pytest.approx(r["train_loss"])) for r in metrics(out) if "lr" in r]


def test_a_tracker_that_is_not_installed_is_one_line_before_any_work(tmp_path, text_file, train_module, capsys,
                                                                      monkeypatch):
    from toygpt import tracking

    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb")
    out = tmp_path / "out"
    assert train_module.main(["--input", str(text_file), *TINY, "--output-dir", str(out), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: --report-to wandb: the wandb package is not installed")
    assert "pip install wandb" in err[0] and not out.exists()


def test_train_ends_with_a_summary_and_no_library_bars(tmp_path, text_file):
    out = tmp_path / "model"
    proc = run_train("--input", text_file, "--output-dir", out, *TINY, "--max-steps", 3, "--eval-batches", 1,
                     "--eval-every", 2, "--report-to", "none")  # an eval inside the training bar, and the final one
    final = metrics(out)[-1]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"trained: {out}"
    assert re.search(rf"^  bits/char +{final['val_bits_per_char']:.4f}  \(val loss", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^  model card +{re.escape(str(out / 'README.md'))}$", proc.stdout, re.M), proc.stdout
    from toygpt.summary import python_command

    python = python_command()  # `python`, or the project venv's interpreter (.venv/bin/python) as make runs it
    assert f"  {python} quantize.py {out} {out}-int8" in lines
    assert (f"  {python} push_to_hub.py --model-dir {out} --quantized-dir {out}-int8 --repo-id USER/model "
            "--space-id USER/model-demo") in lines
    assert not (out / "runs").exists() and "TensorBoard" not in proc.stdout  # --report-to none
    # ToyGPT's own bars for the waits (the final eval, the save), none of transformers' under them.
    assert "eval step 3:" in proc.stderr and "save: 100%" in proc.stderr
    assert "Writing model shards" not in proc.stderr and "Loading weights" not in proc.stderr
    assert "\x1b[" not in proc.stderr  # stderr is a pipe here, as in a log: no cursor movement for the nested eval bar
