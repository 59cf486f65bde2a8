"""model_dir.OutputDir: the one place that decides what a command may write, replace or delete (README: "What is
safe"): never the user's files or inputs, complete-old or complete-new at every instant (kills between renames
included), one writer at a time, the user's umask."""

import json
import os
import stat
import subprocess
import sys

import pytest

from toygpt import model_dir
from conftest import REPO
from toygpt.model_dir import OutputDir, OutputDirError, atomic_dir


def fake_model_dir(path, **extra_files):
    """What the project writes, as far as the rule looks: a ToyGPT config beside model.safetensors."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toygpt"}))
    (path / "model.safetensors").write_bytes(b"old weights")
    for name, content in extra_files.items():
        (path / name).write_text(content)
    return path


def write_new(out, **kwargs):
    with atomic_dir(out, overwrite=True, **kwargs) as tmp:
        (tmp / "config.json").write_text(json.dumps({"model_type": "toygpt"}))
        (tmp / "model.safetensors").write_bytes(b"new weights")


def listing(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_overwrite_refuses_a_directory_the_project_did_not_write(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"not a directory this project wrote \(it holds notes.txt\)"):
        write_new(out)
    assert listing(out) == ["notes.txt"] and listing(tmp_path) == ["data", "data/notes.txt"]
    with pytest.raises(OutputDirError, match="already exists.*--overwrite"):  # and without --overwrite, nothing
        OutputDir(out)


def test_output_that_is_or_contains_an_input_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("text")
    with pytest.raises(OutputDirError, match="contains the input"):
        write_new(data, inputs=[data / "input.txt"])
    src = fake_model_dir(tmp_path / "out" / "toygpt")
    with pytest.raises(OutputDirError, match="contains the input"):  # quantize.py out/toygpt out --overwrite
        write_new(tmp_path / "out", inputs=[src])
    with pytest.raises(OutputDirError, match="is the input itself"):
        write_new(src, inputs=[src])
    write_new(src / "int8", inputs=[src])  # inside SRC, as the Space expects: allowed
    step = src / "checkpoint" / "step-20"  # quantize.py SRC SRC/checkpoint/step-20 --overwrite: the resumable state
    fake_model_dir(step)
    with pytest.raises(OutputDirError, match="inside .*checkpoint/, the state `train.py --resume` continues from"):
        write_new(step, inputs=[src])
    assert (step / "model.safetensors").read_bytes() == b"old weights"
    monkeypatch.chdir(src)
    with pytest.raises(OutputDirError, match="current directory"):  # --output-dir . --overwrite
        write_new(src.parent / "toygpt")
    assert (src / "model.safetensors").read_bytes() == b"old weights"


def test_the_users_entries_in_a_replaced_model_dir_survive(tmp_path, capsys):
    out = fake_model_dir(tmp_path / "toygpt", **{"notes.txt": "mine"})
    fake_model_dir(out / "int8")
    with OutputDir(out, replace=True) as output:
        with output.write() as tmp:
            (tmp / "config.json").write_text(json.dumps({"model_type": "toygpt"}))
            (tmp / "model.safetensors").write_bytes(b"new weights")
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert (out / "notes.txt").read_text() == "mine" and (out / "int8" / "model.safetensors").is_file()
    said = capsys.readouterr().out
    assert "kept in" in said and "int8, notes.txt" in said and "int8 came from the previous model" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toygpt"]  # no temp, lock or journal left


def test_a_failed_write_leaves_the_old_directory_as_it_was(tmp_path):
    out = fake_model_dir(tmp_path / "toygpt", **{"notes.txt": "mine"})
    before = listing(out)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert listing(out) == before and (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toygpt"]


KILL_AT_RENAME = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from toygpt import model_dir
out, kill_at, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "exchange"
if not exchange:
    model_dir._exchange = lambda a, b: False  # a filesystem without renameat2: two renames
real_replace, real_rmtree, calls = os.replace, model_dir.shutil.rmtree, []
def replace(a, b):
    calls.append((a, b))
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(a, b)
def rmtree(path, *a, **k):
    if kill_at == 0:  # killed while deleting the old tree
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *a, **k)
model_dir.os.replace, model_dir.shutil.rmtree = replace, rmtree
with model_dir.atomic_dir(out, overwrite=True) as tmp:
    (tmp / "config.json").write_text('{{"model_type": "toygpt"}}')
    (tmp / "model.safetensors").write_bytes(b"new weights")
"""


@pytest.mark.parametrize("mode,kill_at", [("renames", 1), ("renames", 2), ("renames", 3), ("renames", 4),
                                          ("exchange", 2), ("exchange", 0)])
def test_a_kill_during_the_swap_is_finished_by_the_next_command(tmp_path, mode, kill_at):
    """Killed (SIGKILL) at each point of the swap, the next command that claims OUT finds a complete OUT (the old one
    before the journal is in place, else the new one), says what it did, and cleans up. os.replace calls: 1 the
    journal, 2 notes.txt carried into the new tree, 3 OUT aside, 4 the new tree into place; 0: killed while the
    old tree is deleted after the exchange."""
    out = fake_model_dir(tmp_path / "toygpt", **{"notes.txt": "mine"})
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_RENAME.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), str(out), str(kill_at), mode], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    said = []
    with OutputDir(out, replace=True, log=said.append):
        pass
    expected = b"old weights" if kill_at == 1 else b"new weights"
    assert (out / "model.safetensors").read_bytes() == expected, (listing(tmp_path), said)
    assert (out / "notes.txt").read_text() == "mine"
    assert said and any("interrupted" in s for s in said), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill.py", "toygpt"]


def test_stale_temp_trees_of_killed_runs_are_removed_and_reported(tmp_path):
    out = fake_model_dir(tmp_path / "toygpt")
    stale = tmp_path / ".toygpt.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    said = []
    with OutputDir(out, replace=True, log=said.append):
        pass
    assert not stale.exists() and len(said) == 1 and ".toygpt.tmp-abc123" in said[0]


def test_one_writer_at_a_time_and_the_refusal_names_the_holder(tmp_path):
    out = tmp_path / "toygpt"
    with OutputDir(out):
        with pytest.raises(OutputDirError, match=rf"being written by another run \(pid {os.getpid()} "):
            OutputDir(out)
        proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from toygpt import model_dir; "
                               "model_dir.OutputDir(sys.argv[2])", str(REPO), str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr
    with OutputDir(out):  # released: the next one may write
        pass
    assert not (tmp_path / ".toygpt.lock").exists()


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):  # root ignores chmod: refuse the way a read-only directory does
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(model_dir.os, "open", read_only)
    with pytest.raises(OutputDirError, match=rf"cannot write in {tmp_path} \(Permission denied\)"):
        OutputDir(tmp_path / "toygpt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="cannot write in"):
            OutputDir(parent / "toygpt")
    finally:
        parent.chmod(0o755)


def test_outputs_get_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_new(tmp_path / "toygpt")
    finally:
        os.umask(previous)
    out = tmp_path / "toygpt"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # tempfile would have made it 0700
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o640


def test_recovery_never_replaces_an_entry_changed_after_the_interrupted_swap(tmp_path):
    """train --overwrite killed between the journal and the exchange leaves OUT without its carried int8/ (it sits in
    the hidden new tree). A new int8/ made then (quantize.py OUT OUT/int8) must survive the next command's recovery;
    the stale copy is kept beside it and named."""
    out = fake_model_dir(tmp_path / "toygpt")
    fake_model_dir(out / "int8")
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_RENAME.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), str(out), "3", "renames"], capture_output=True, text=True)
    assert proc.returncode == -9 and not (out / "int8").exists(), proc.stderr  # carried into the temp tree
    with atomic_dir(out / "int8", overwrite=True) as tmp:  # the user's new int8
        (tmp / "config.json").write_text(json.dumps({"model_type": "toygpt"}))
        (tmp / "model.safetensors").write_bytes(b"newest int8")
    said = []
    with OutputDir(out, replace=True, log=said.append):
        pass
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert (out / "int8" / "model.safetensors").read_bytes() == b"newest int8"
    assert (out / "int8.interrupted-save" / "model.safetensors").read_bytes() == b"old weights"
    assert any("int8.interrupted-save" in s and "changed after" in s for s in said), said


def test_a_symlinked_output_is_written_where_it_points_and_stays_a_link(tmp_path, capsys):
    target = fake_model_dir(tmp_path / "project" / "toygpt", **{"notes.txt": "mine"})
    link = tmp_path / "out"
    link.symlink_to(target)
    write_new(link)
    assert link.is_symlink() and (target / "model.safetensors").read_bytes() == b"new weights"
    assert (target / "notes.txt").read_text() == "mine"
    write_new(link)  # no journal or lock left to wedge the next write
    assert sorted(p.name for p in target.parent.iterdir()) == ["toygpt"]
    assert f"writing its target {target}" in capsys.readouterr().out
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputDirError, match="symbolic link to .*nowhere, which does not exist"):
        write_new(tmp_path / "dangling")
    assert not (tmp_path / "nowhere").exists()


def test_a_full_disk_during_the_save_is_one_line_and_the_old_output_stays(tmp_path):
    out = fake_model_dir(tmp_path / "toygpt", **{"notes.txt": "mine"})
    before = listing(out)
    with pytest.raises(model_dir.DiskFullError, match=rf"the disk holding {tmp_path} is full .* toygpt is as it was"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError(28, "No space left on device")  # what save_pretrained raises on a full disk
    assert listing(out) == before and (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toygpt"]


def test_a_users_file_ending_in_part_survives_a_replace(tmp_path):
    out = fake_model_dir(tmp_path / "toygpt", **{"draft.part": "mine"})
    write_new(out)
    assert (out / "draft.part").read_text() == "mine"
