"""train.py with a checkpoint it cannot use: one line naming the file and what to do (the previous complete checkpoint
where one is kept), never a traceback; and a disk that fills up while a checkpoint is written. Real `python train.py`
processes on test_train.py's tiny model (most refusals through train.main() in the test process: same code, no
second import of torch and transformers)."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO, one_thread
from test_train import TINY, run_train, train_cmd, train_env

STEP = "step-00000002"  # the run's checkpoint; "step-00000001" is the previous one, put back where a case wants it


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shakespeare_path):
    """A run of 2 steps (its checkpoint: step 2) and a copy of its step-1 checkpoint, which rotation deleted."""
    tmp = tmp_path_factory.mktemp("resume_errors")
    text = tmp / "input.txt"
    text.write_text(shakespeare_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = tmp / "model"
    run_train("--input", text, "--output-dir", out, *TINY, "--max-steps", 1, "--eval-batches", 1)
    shutil.copytree(out / "checkpoint" / "step-00000001", tmp / "step-00000001")
    import train  # the resume in this process: train.main() without importing torch and transformers again

    with one_thread(), contextlib.redirect_stderr(io.StringIO()) as err:
        assert train.main(["--output-dir", str(out), "--resume", "--max-steps", "2"]) == 0, err.getvalue()[-3000:]
    return out, tmp / "step-00000001"


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def cut_short(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


CASES = {  # what is done to the step-2 checkpoint, and what the error says about which file
    "weights_cut_short": (lambda d: cut_short(d / "model.safetensors"), "model.safetensors is cut short or damaged"),
    "optimizer_cut_short": (lambda d: cut_short(d / "optimizer.safetensors", 0.9),
                            "optimizer.safetensors is cut short or damaged"),
    "step_not_a_number": (lambda d: edit_json(d / "trainer_state.json", lambda s: s.update(step="abc")),
                          'trainer_state.json has "step": "abc", which is not an integer'),
    "state_half_written": (lambda d: cut_short(d / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "n_embd_edited_in_config": (lambda d: edit_json(d / "config.json", lambda c: c.update(n_embd=64)),
                                "config.json does not match the model that trainer_state.json's args build: n_embd 64 "
                                "(the run's model has 32)"),
    "n_embd_edited_in_args": (lambda d: edit_json(d / "trainer_state.json", lambda s: s["args"].update(n_embd=64)),
                              "config.json does not match the model that trainer_state.json's args build: n_embd 32 "
                              "(the run's model has 64)"),
}


def resume_failing(out, capsys=None):
    """--resume refused: exit status 2, the last stderr line returned, no traceback. A real process; or, with capsys,
    train.main() in this one (the same refusal, without a fresh process importing torch and transformers again)."""
    argv = ["--output-dir", str(out), "--resume", "--max-steps", "3"]
    if capsys is None:
        proc = subprocess.run(train_cmd(*argv), env=train_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr.strip().splitlines()[-1]
    import train

    code = train.main(argv)  # an exception escaping main() is the traceback a process would print
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_checkpoint_is_one_line_offering_the_previous_one(case, finished_run, tmp_path, capsys):
    """weights_cut_short runs train.py as the user does; the other damages, and the resume the error suggests, go
    through train.main() in this process."""
    damage, message = CASES[case]
    out = tmp_path / "model"
    shutil.copytree(finished_run[0], out)
    shutil.copytree(finished_run[1], out / "checkpoint" / "step-00000001")
    damage(out / "checkpoint" / STEP)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    err = resume_failing(out, capsys=None if case == "weights_cut_short" else capsys)
    assert err.startswith(f"train.py: error: {out / 'checkpoint' / STEP}/") and message in err, err
    aside = out / f"{STEP}.damaged"
    assert (f"The previous checkpoint, {out / 'checkpoint' / 'step-00000001'}, is complete: move this one out of "
            f"the way (mv {out / 'checkpoint' / STEP} {aside}) and --resume again continues from step-00000001") in err
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing touched
    if case != "weights_cut_short":
        return
    # Doing what it says resumes from the previous checkpoint (once: each resume is a training run; in this process).
    shutil.move(out / "checkpoint" / STEP, aside)
    import train

    with one_thread():
        code = train.main(["--output-dir", str(out), "--resume", "--max-steps", "3"])
    err = capsys.readouterr().err
    assert code == 0 and f"resumed from {out / 'checkpoint' / 'step-00000001'} at step 1" in err, err[-3000:]


def test_a_damaged_checkpoint_without_a_previous_one_says_what_to_do(finished_run, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(finished_run[0], out)
    cut_short(out / "checkpoint" / STEP / "model.safetensors")
    err = resume_failing(out, capsys)
    assert f"{out / 'checkpoint' / STEP / 'model.safetensors'} is cut short or damaged" in err, err
    assert "No earlier checkpoint is kept: restore the file from a copy, or start the run again (--overwrite)." in err


# What safetensors raises when the disk fills up mid-write (seen on a full tmpfs); it is no OSError.
DISK_FULL = """
import sys
from safetensors import SafetensorError
from toygpt import checkpoint
import train

real, written = checkpoint.save_file, []
def save_file(tensors, path, *args, **kwargs):
    if str(path).endswith("optimizer.safetensors"):
        written.append(path)
        if len(written) == 2:  # the second checkpoint
            open(path, "wb").write(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return real(tensors, path, *args, **kwargs)
checkpoint.save_file = save_file
sys.exit(train.main(sys.argv[1:]))
"""


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(finished_run, tmp_path):
    text = finished_run[0].parent / "input.txt"
    out = tmp_path / "model"
    argv = ["--input", text, "--output-dir", out, *TINY, "--max-steps", 4, "--checkpoint-every", 1, "--eval-batches", 1]
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, *map(str, argv)], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("train.py: error: No space left on device: the checkpoint of step 2 needs about "), err
    assert f"the previous checkpoint, step-00000001, is intact ({out / 'checkpoint'})" in err, err
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["step-00000001"]  # no temp dir left
    for path in (out / "checkpoint" / "step-00000001").glob("*.safetensors"):
        load_file(path)
    assert not (out / "config.json").exists()
