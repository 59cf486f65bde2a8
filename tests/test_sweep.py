"""Issue 17's sweep: a hostile or careless user's new cases of the kinds fixed before (data loss, leaks, tracebacks),
each run as the user runs it (a real process on a tiny config) where that is how it went wrong."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, one_thread

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--eval-every", "2"]


def run_cli(script, *args, cwd, env=None, timeout=120):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_one_line(proc, status, prog, *fragments):
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], proc.stderr


@pytest.fixture
def text_file(tmp_path, shakespeare_path):
    path = tmp_path / "small.txt"
    path.write_text(shakespeare_path.read_text()[:60_000])
    return path


# ----------------------------------------------------------------------------------------------------------------
# train.py


@pytest.mark.parametrize("device", ["meta", "xpu"])
def test_train_refuses_a_device_type_it_cannot_train_on_and_leaves_no_dir(tmp_path, text_file, device):
    """torch names meta, xpu, hpu, ...: they passed the device check and failed mid-run with a traceback, leaving a
    dir of one metrics.jsonl that every later run (even --overwrite) refused."""
    out = tmp_path / "out"
    proc = run_cli("train.py", "--input", text_file, "--output-dir", out, *TINY, "--max-steps", 2, "--device", device,
                   cwd=tmp_path)
    assert_one_line(proc, 2, "train.py", f"--device {device}", "cpu, cuda or mps")
    assert not out.exists()


def test_a_run_that_diverges_before_its_first_checkpoint_can_be_run_again(tmp_path, text_file, monkeypatch, capsys):
    """The error says "start again with a lower --lr"; the dir it left (metrics.jsonl only) then refused that. The
    first run is a real process; the two after it run train.main() in this process (the same code, without
    importing torch and transformers again)."""
    import train

    out = tmp_path / "out"
    args = ["--input", text_file, "--output-dir", out, *TINY, "--max-steps", 3, "--optimizer", "adamw",
            "--warmup-steps", 0]
    proc = run_cli("train.py", *args, "--lr", 1e30, "--embedding-lr", 1e30, cwd=tmp_path)
    assert_one_line(proc, 1, "train.py", "No checkpoint was written yet")
    assert not out.exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()  # an empty dir the user made stays, emptied of what the run wrote
    with one_thread():
        code = train.main([*map(str, args), "--lr", "1e30", "--embedding-lr", "1e30", "--output-dir",
                           str(tmp_path / "mine")])
    assert code == 1 and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    with one_thread():
        code = train.main([*map(str, args)])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (out / "model.safetensors").is_file()


def test_an_empty_input_path_is_refused_not_read_as_the_current_directory(tmp_path):
    """`--input "$TEXT"` with TEXT unset: Path("") is the current directory, read as a dataset directory."""
    (tmp_path / "notes.jsonl").write_text('{"text": "my private notes, not training text"}\n' * 50)
    proc = run_cli("train.py", "--input", "", "--output-dir", tmp_path / "out", *TINY, "--max-steps", 1, cwd=tmp_path)
    assert_one_line(proc, 2, "train.py", "the input path '' is empty")
    assert not (tmp_path / "out").exists()


def test_init_from_dir_is_an_input_that_output_dir_overwrite_never_replaces(tmp_path, text_file, tiny_model_dir):
    start = tmp_path / "start"
    shutil.copytree(tiny_model_dir, start)
    before = (start / "model.safetensors").read_bytes()
    proc = run_cli("train.py", "--input", text_file, "--init-from", start, "--output-dir", start, "--overwrite",
                   "--block-size", 32, "--max-steps", 1, cwd=tmp_path)
    assert_one_line(proc, 2, "train.py", f"--output-dir {start} is the input itself")
    assert (start / "model.safetensors").read_bytes() == before


def test_ctrl_c_while_train_starts_or_steps_is_one_line(tmp_path, text_file):
    """Ctrl-C once the run prints its data line: while it counts the vocabulary, builds the model, or steps."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--input", str(text_file), "--output-dir",
                             str(out), *TINY, "--max-steps", "3"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("data:"):
            proc.send_signal(signal.SIGINT)
            break
    stderr = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=60)
    completed = SimpleNamespace(returncode=proc.returncode, stderr=stderr)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode in (1, 130), stderr  # 1: the loop's own stop, with a checkpoint
    assert_one_line(completed, proc.returncode, "train.py", "Ctrl-C")


# ----------------------------------------------------------------------------------------------------------------
# Ctrl-C in every CLI (in-process: the interrupt arrives in the middle of the work)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("script, target, argv", [
    ("quantize", "toygpt.quantization.quantize_dir", ["SRC", "OUT"]),
    ("convert_gpt2", "toygpt.gguf_export.export_gguf", ["to-gguf", "SRC", "OUT.gguf"]),
    ("push_to_hub", "toygpt.hub_push.push", ["--model-dir", "SRC", "--repo-id", "a/b", "--dry-run", "OUT"]),
    ("train", "toygpt.training.train", ["--output-dir", "OUT"]),
])
def test_ctrl_c_in_the_middle_of_a_command_is_one_line(monkeypatch, capsys, tmp_path, script, target, argv):
    monkeypatch.chdir(tmp_path)
    module_name, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module_name), name, interrupt)
    cli = importlib.import_module(script)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{script}.py: error: interrupted (Ctrl-C)"), err


# ----------------------------------------------------------------------------------------------------------------
# quantize.py, convert_gpt2.py


def test_quantize_refuses_negative_speed_tokens(tmp_path, tiny_model_dir):
    proc = run_cli("quantize.py", tiny_model_dir, tmp_path / "int8", "--speed-tokens", -5, cwd=tmp_path)
    assert_one_line(proc, 2, "quantize.py", "--speed-tokens must be 0")
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize("damage", ["cut short", "missing", "no vocab"])
def test_to_gguf_with_a_broken_tokenizer_json_is_one_line(tmp_path, tiny_model_dir, damage):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    tokenizer = src / "tokenizer.json"
    if damage == "cut short":
        tokenizer.write_text(tokenizer.read_text()[:1000])
    elif damage == "missing":
        tokenizer.unlink()
    else:
        tokenizer.write_text(json.dumps({"model": {"vocab": {}, "merges": []}}))
    proc = run_cli("convert_gpt2.py", "to-gguf", src, tmp_path / "m.gguf", cwd=tmp_path)
    assert_one_line(proc, 2, "convert_gpt2.py", str(tokenizer))
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------------------------------------------
# push_to_hub.py, the Space


def test_dry_run_with_an_empty_stage_path_never_pushes(tmp_path, tiny_model_dir):
    """`--dry-run "$STAGE"` with STAGE unset was a real push (with a token at hand)."""
    proc = run_cli("push_to_hub.py", "--model-dir", tiny_model_dir, "--repo-id", "a/b", "--dry-run", "", cwd=tmp_path,
                   env={"HF_TOKEN": "hf_dummy", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert_one_line(proc, 2, "push_to_hub.py", "--dry-run needs the directory", "nothing was uploaded")


def test_staged_training_args_name_relative_inputs_by_file_name(tmp_path):
    """--input as typed, relative (deep/secret/diary.txt), names local folders as much as an absolute path does."""
    from toygpt.hub_push import publishable_training_args

    record = {"input": "deep/secret/diary.txt", "output_dir": "../runs/mine", "dataset": "owner/name",
              "data_source": {"input": "deep/secret/diary.txt"}, "preset": "tiny"}
    staged = tmp_path / "training_args.json"
    staged.write_text(json.dumps(record))
    publishable_training_args(staged, tmp_path / "source.json")
    published = json.loads(staged.read_text())
    assert published["input"] == "diary.txt" and published["data_source"] == {"input": "diary.txt"}
    assert published["output_dir"] == "mine" and published["dataset"] == "owner/name"
    assert "secret" not in staged.read_text()


def test_app_load_error_is_one_line(tmp_path, tiny_model_dir):
    """transformers' own message for an unknown architecture spans lines; `app.py: error:` promises one."""
    sys.path.insert(0, str(REPO / "space"))
    try:
        import app
    finally:
        sys.path.remove(str(REPO / "space"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    del config["auto_map"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(app.StartupError) as err:
        app.load_model(str(model))
    assert "\n" not in err.value.message and "could not load the model" in err.value.message
