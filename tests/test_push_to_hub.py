"""push_to_hub.py against a stand-in Hub (tests/hub_server.py): push, load back, serve the Space, clear errors."""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import push_to_hub
from conftest import REPO, one_thread, run_python
from hub_server import FakeHub
from toygpt import model_dir as model_dir_module

REPO_ID, SPACE_ID = "alice/toygpt-test", "alice/toygpt-test-demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hub_env(hub_url: str, home: Path, token: str | None = "hf_dummy_token") -> dict:
    """Environment for a client process: the stand-in Hub, a private HF_HOME, no Xet, online."""
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TOYGPT_MODEL", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    if token:
        env["HF_TOKEN"] = token
    return env


def run_push(args, env, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "push_to_hub.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"push_to_hub.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_bytes(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# The records train.py leaves in its output dir: the cards are rendered from these (toygpt/model_card.py).
TRAINING_ARGS = {"preset": "tiny", "lr": 0.003, "min_lr": 0.0003, "warmup_steps": 4, "weight_decay": 0.1,
                 "grad_clip": 1.0, "batch_size": 4, "grad_accum": 1, "seed": 7, "input_path": "/moved/input.txt",
                 "data_description": "tiny Shakespeare (test)"}
FINAL = {"final": True, "step": 10, "train_loss": 9.5, "val_loss": 9.1234, "val_perplexity": 9176.52,
         "val_bits_per_char": 3.2109, "tokens_seen": 1280, "elapsed_s": 12.0, "world_size": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """tiny_model_dir as train.py leaves it: records, a card, a plot, and leftovers that must not be pushed."""
    from toygpt import model_card

    out = tmp_path_factory.mktemp("trained") / "toygpt"
    shutil.copytree(tiny_model_dir, out)
    final = {**FINAL, "n_params": model_card.parameter_count(out / "model.safetensors")}
    (out / "training_args.json").write_text(json.dumps(TRAINING_ARGS, indent=2))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": 9.9}) + "\n" + json.dumps(final) + "\n")
    config = json.loads((out / "config.json").read_text())
    model_card.training_card(config, TRAINING_ARGS, final).save(str(out / "README.md"))
    (out / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (out / "checkpoint" / "step-00000010").mkdir(parents=True)
    (out / "checkpoint" / "step-00000010" / "optimizer.safetensors").write_bytes(b"\0" * 64)
    (out / "__pycache__").mkdir()
    (out / "__pycache__" / "modeling_toygpt.cpython-311.pyc").write_bytes(b"\0")
    return out


@pytest.fixture(scope="module")
def int8_dir(model_dir, tmp_path_factory):
    """`quantize.py MODEL_DIR OUT --speed-tokens 8`, through quantize.main() in this process (test_quantize.py runs
    the real process)."""
    import quantize

    out = tmp_path_factory.mktemp("quantized") / "toygpt-int8"
    with one_thread(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = quantize.main([str(model_dir), str(out), "--speed-tokens", "8"])
    assert code == 0, err.getvalue()[-3000:]
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = FakeHub(tmp_path_factory.mktemp("hub"))
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def pushed(hub, model_dir, int8_dir, tmp_path_factory):
    """Dry run (no token), then the real push of the same dirs, as a subprocess against the stand-in Hub."""
    tmp = tmp_path_factory.mktemp("push")
    args = ["--model-dir", model_dir, "--quantized-dir", int8_dir, "--repo-id", REPO_ID, "--space-id", SPACE_ID]
    dry = run_push([*args, "--dry-run", tmp / "stage"], hub_env(hub.url, tmp / "home-dry", token=None))
    push = run_push(args, hub_env(hub.url, tmp / "home"))
    return dict(stage=tmp / "stage", dry=dry.stdout, stdout=push.stdout, stderr=push.stderr, model_dir=model_dir,
                tmp=tmp, args=args)


@pytest.mark.slow
def test_push_uploads_exactly_the_dry_run_stage(hub, pushed):
    stage = pushed["stage"]
    assert "nothing was uploaded" in pushed["dry"]
    model_files = hub.files("model", REPO_ID)
    assert model_files == tree_bytes(stage / "model")  # byte-identical, and no file more or less
    assert hub.files("space", SPACE_ID) == tree_bytes(stage / "space")
    assert not any(path.startswith(("checkpoint", "__pycache__")) for path in model_files)
    assert {"config.json", "model.safetensors", "int8/config.json", "int8/model.safetensors"} <= set(model_files)
    assert json.loads(model_files["int8/config.json"])["quantization"]
    # One commit per repo on top of the repo's initial commit; the printed URLs are the Hub's.
    assert hub.commit_count("model", REPO_ID) == 2 and hub.commit_count("space", SPACE_ID) == 2
    head = hub.repos[("model", REPO_ID)]["branches"]["main"]
    assert f"{hub.url}/{REPO_ID}/commit/{head}" in pushed["stdout"]
    assert f"{hub.url}/spaces/{SPACE_ID}/commit/" in pushed["stdout"]
    assert hub.repos[("space", SPACE_ID)]["sdk"] == "gradio"
    # Weights went through the LFS basic transfer; Xet was never involved.
    assert any(r.startswith("POST /alice/toygpt-test.git/info/lfs/objects/batch") for r in hub.requests)
    assert any(r.startswith("PUT /lfs-upload/") for r in hub.requests)
    assert not any("xet" in r.lower() for r in hub.requests)


@pytest.mark.slow
def test_pushed_card_combines_both_cards_and_space_names_the_model(hub, pushed, model_dir, int8_dir):
    files = hub.files("model", REPO_ID)
    card = files["README.md"].decode()
    metadata, text = card.split("---")[1], card.split("---", 2)[2]
    for line in ("library_name: transformers", "license: mit", "pipeline_tag: text-generation", "- custom_code"):
        assert line in metadata
    # Each section once: the fp32 card's, then what the int8 card adds (the fp32 card's sections plus its own).
    fp32_headings = [line for line in (model_dir / "README.md").read_text().splitlines() if line.startswith("## ")]
    int8_headings = [line for line in (int8_dir / "README.md").read_text().splitlines()
                     if line.startswith("## ") and line not in fp32_headings]
    assert int8_headings
    for heading in fp32_headings + int8_headings + ["## Files and sizes"]:
        assert text.count(heading + "\n") == 1, heading
    assert "validation loss | 9.1234" in text and "![loss curve](loss_curve.png)" in text
    # Load snippets name the Hub repo, both variants; no local paths survive.
    assert f'repo = "{REPO_ID}"' in text and 'from_pretrained(repo, subfolder="int8", trust_remote_code=True)' in text
    assert "path/to" not in text
    assert "| int8 | `int8/` |" in text and f"spaces/{SPACE_ID}" in text
    # The int8 variant's own card, re-rendered for the Hub: it, too, loads by repo id.
    int8_card = files["int8/README.md"].decode()
    assert "## int8 quantized variant" in int8_card and "validation loss | 9.1234" in int8_card
    assert f'repo = "{REPO_ID}"' in int8_card and "path/to" not in int8_card
    assert 'from_pretrained(repo, subfolder="int8", trust_remote_code=True)' in int8_card
    space = hub.files("space", SPACE_ID)
    assert space["model_id.txt"].decode().strip() == REPO_ID
    assert f"models:\n- {REPO_ID}" in space["README.md"].decode()
    assert b"from transformers" in space["app.py"]


@pytest.mark.slow
def test_model_loads_from_hub_and_generates(hub, pushed):
    """A fresh process loads fp32, int8 and the tokenizer by repo id only, and gets the local model's logits."""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
repo = {REPO_ID!r}
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
fp32 = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
int8 = AutoModelForCausalLM.from_pretrained(repo, subfolder="int8", trust_remote_code=True)
local = AutoModelForCausalLM.from_pretrained({str(pushed["model_dir"])!r}, trust_remote_code=True)
ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
out = {{}}
for name, model in (("fp32", fp32), ("int8", int8)):
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    out[name] = tokenizer.decode(generated[0])
with torch.no_grad():
    out["fp32_matches_local"] = torch.equal(fp32(ids).logits, local(ids).logits)
out["int8_quantization"] = int8.config.quantization is not None
print(json.dumps(out))
"""
    result = json.loads(run_python(code, pushed["tmp"], hub_env(hub.url, pushed["tmp"] / "home-load")).splitlines()[-1])
    assert result["fp32"].startswith("ROMEO:") and len(result["fp32"]) > len("ROMEO:")
    assert result["int8"].startswith("ROMEO:") and len(result["int8"]) > len("ROMEO:")
    assert result["fp32_matches_local"] and result["int8_quantization"]


@pytest.mark.slow
def test_pushed_space_serves_the_pushed_model(hub, pushed):
    """Download the Space from the Hub, run `python app.py` there, call /generate with gradio_client."""
    from gradio_client import Client

    tmp = pushed["tmp"]
    env = hub_env(hub.url, tmp / "home-space")
    space_dir = tmp / "space-checkout"
    run_python(
        f"from huggingface_hub import snapshot_download\n"
        f"snapshot_download({SPACE_ID!r}, repo_type='space', local_dir={str(space_dir)!r})",
        tmp, env,
    )
    assert (space_dir / "model_id.txt").read_text().strip() == REPO_ID
    port = free_port()
    env |= {"GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp / "app.log", "w")
    app = subprocess.Popen([sys.executable, "app.py"], cwd=space_dir, env=env, stdin=subprocess.DEVNULL,
                           stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert app.poll() is None, f"app.py exited:\n{(tmp / 'app.log').read_text()}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, f"app.py never answered:\n{(tmp / 'app.log').read_text()}"
                time.sleep(0.5)
        client = Client(url, verbose=False)
        # prompt, max_new_tokens, temperature (0 = greedy), top_k, top_p, num_sequences, seed -> the texts
        texts = client.predict("ROMEO:", 8, 0.0, 50, 1.0, 1, 0, api_name="/generate")
        assert texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:"), texts
        assert f"serving `{REPO_ID}` · int8" in (tmp / "app.log").read_text()  # the pushed int8 variant
        with pytest.raises(Exception, match="Please type a prompt"):  # gradio_client's AppError
            client.predict("", api_name="/generate")
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()
    assert any(r.startswith("HEAD /alice/toygpt-test/resolve/") for r in hub.requests)


@pytest.mark.slow
def test_second_push_is_idempotent(hub, pushed):
    before_model, before_space = hub.files("model", REPO_ID), hub.files("space", SPACE_ID)
    commits = hub.commit_count("model", REPO_ID), hub.commit_count("space", SPACE_ID)
    # This time without HF_TOKEN: the token `hf auth login` caches in HF_HOME is used.
    home = pushed["tmp"] / "home-login"
    home.mkdir()
    (home / "token").write_text("hf_cached_login_token")
    proc = run_push(pushed["args"], hub_env(hub.url, home, token=None))
    assert "commit:" in proc.stdout
    assert hub.files("model", REPO_ID) == before_model and hub.files("space", SPACE_ID) == before_space
    # Unchanged files are skipped: no new commit at all.
    assert (hub.commit_count("model", REPO_ID), hub.commit_count("space", SPACE_ID)) == commits


# ----------------------------------------------------------------------------------------------------------------
# Clear, early errors


def run_main(capsys, *args) -> tuple[int, str]:
    code = push_to_hub.main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_no_token_says_how_to_log_in(capsys, tiny_model_dir, no_token):
    code, err = run_main(capsys, "--model-dir", tiny_model_dir, "--repo-id", REPO_ID)
    assert code == 2 and err.startswith("push_to_hub.py: error: ")
    assert "No Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err


def test_dry_run_needs_no_token(capsys, tiny_model_dir, no_token, tmp_path):
    code = push_to_hub.main(["--model-dir", str(tiny_model_dir), "--repo-id", REPO_ID, "--space-id", SPACE_ID,
                             "--dry-run", str(tmp_path / "stage")])
    assert code == 0
    assert "nothing was uploaded" in capsys.readouterr().out
    staged = tree_bytes(tmp_path / "stage" / "model")
    # No training records in the dir: a card from its config, with the metadata the Hub needs.
    card = staged["README.md"].decode()
    assert "library_name: transformers" in card and "2 layers, 2 heads, 32-dim" in card
    assert staged["model.safetensors"] == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "stage" / "space" / "model_id.txt").read_text().strip() == REPO_ID


def test_tensorboard_runs_are_staged_for_the_hubs_training_metrics(capsys, tiny_model_dir, no_token, tmp_path):
    """train.py --report-to tensorboard leaves event files in runs/; the Hub shows them as the repo's metrics."""
    model_dir = tmp_path / "toygpt"
    shutil.copytree(tiny_model_dir, model_dir)
    events = model_dir / "runs" / "events.out.tfevents.1.host.1.0"
    events.parent.mkdir()
    events.write_bytes(b"event bytes")
    assert push_to_hub.main(["--model-dir", str(model_dir), "--repo-id", REPO_ID, "--dry-run",
                             str(tmp_path / "stage")]) == 0
    assert tree_bytes(tmp_path / "stage" / "model")["runs/events.out.tfevents.1.host.1.0"] == b"event bytes"


def test_dry_run_stages_a_q8_0_gguf_beside_the_weights_and_the_card_says_how_to_run_it(
        capsys, tiny_model_dir, no_token, tmp_path):
    import gguf

    model_dir = tmp_path / "toygpt"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "old-export.gguf").write_bytes(b"GGUF stale")  # a dir's own GGUF files are not pushed
    assert push_to_hub.main(["--model-dir", str(model_dir), "--repo-id", REPO_ID, "--dry-run",
                             str(tmp_path / "stage")]) == 0
    assert "GGUF file for llama.cpp: toygpt-test-Q8_0.gguf" in capsys.readouterr().out
    stage = tmp_path / "stage" / "model"
    assert sorted(p.name for p in stage.glob("*.gguf")) == ["toygpt-test-Q8_0.gguf"]
    reader = gguf.GGUFReader(stage / "toygpt-test-Q8_0.gguf")
    assert reader.fields["general.architecture"].contents() == "gpt2"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    card = (stage / "README.md").read_text()
    assert "| GGUF Q8_0 (llama.cpp) | `toygpt-test-Q8_0.gguf` |" in card
    assert f"llama-completion -hf {REPO_ID}:Q8_0 -no-cnv" in card and f"ollama run hf.co/{REPO_ID}:Q8_0" in card
    fp32_files = [p for p in stage.iterdir() if p.is_file() and p.suffix != ".gguf" and p.name != "README.md"]
    assert re.search(rf"\| fp32 \| `/` \| [\d.]+ [kM]B \| {len(fp32_files)} \|", card)  # its row counts no GGUF file


@pytest.mark.parametrize("repo_id", ["toygpt", "alice/toy/gpt", "alice/toy gpt", "alice/", "alice/toy--gpt"])
def test_malformed_repo_id(capsys, tiny_model_dir, tmp_path, repo_id):
    code, err = run_main(capsys, "--model-dir", tiny_model_dir, "--repo-id", repo_id, "--dry-run", tmp_path / "s")
    assert code == 2 and "not a valid Hub repo id" in err and "USER/NAME" in err
    assert not (tmp_path / "s").exists()


def test_malformed_space_id(capsys, tiny_model_dir, tmp_path):
    code, err = run_main(capsys, "--model-dir", tiny_model_dir, "--repo-id", REPO_ID, "--space-id", "demo",
                         "--dry-run", tmp_path / "s")
    assert code == 2 and "--space-id 'demo' is not a valid Hub repo id" in err


def broken_copy(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    change(dst)
    return dst


def drop_a_tensor(directory: Path) -> None:
    """Weights that load without error but lack a tensor: from_pretrained would fill it with random values."""
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "model.safetensors")
    del weights["transformer.h.0.attn.c_proj.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "modeling_toygpt.py").unlink(), "lacks modeling_toygpt.py"),
        (lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "n_head": 3})), "cannot be loaded"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}garbage"), "cannot be loaded"),
        (drop_a_tensor, "weights do not match config.json (missing keys: transformer.h.0.attn.c_proj.weight)"),
    ],
    ids=["no-weights", "bad-json", "no-remote-code", "bad-config", "corrupt-weights", "missing-tensor"],
)
def test_bad_model_dir(capsys, tiny_model_dir, tmp_path, change, message):
    model_dir = broken_copy(tiny_model_dir, tmp_path / "model", change)
    code, err = run_main(capsys, "--model-dir", model_dir, "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 2 and err.startswith("push_to_hub.py: error: --model-dir:") and message in err, err
    assert not (tmp_path / "s").exists()


def test_missing_model_dir(capsys, tmp_path):
    code, err = run_main(capsys, "--model-dir", tmp_path / "nope", "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 2 and "is not a directory" in err


@pytest.mark.slow  # needs the quantized dir
def test_variants_swapped(capsys, tiny_model_dir, int8_dir, tmp_path):
    code, err = run_main(capsys, "--model-dir", int8_dir, "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 2 and "holds int8 weights" in err
    code, err = run_main(capsys, "--model-dir", tiny_model_dir, "--quantized-dir", tiny_model_dir,
                         "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 2 and "holds fp32 weights" in err


def test_dry_run_refuses_to_replace_other_dirs(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("keep me")
    code, err = run_main(capsys, "--model-dir", tiny_model_dir, "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 2 and "not a directory this project wrote" in err and ".toygpt-stage" in err
    assert (tmp_path / "s" / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_network_failure_says_nothing_was_pushed(tiny_model_dir, tmp_path):
    env = hub_env(f"http://127.0.0.1:{free_port()}", tmp_path / "home")  # nothing listens there
    proc = run_push(["--model-dir", tiny_model_dir, "--repo-id", REPO_ID, "--space-id", SPACE_ID], env, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("push_to_hub.py: error: Push failed")
    assert "Push failed while creating model repo" in proc.stderr and "ConnectError" in proc.stderr
    assert "nothing was pushed; not pushed: model repo, Space" in proc.stderr


@pytest.mark.slow
def test_partial_failure_says_what_was_pushed(tiny_model_dir, tmp_path):
    hub = FakeHub(tmp_path / "hub")
    hub.refuse_repo_types = {"space"}  # the Hub answers 403 to creating the Space
    hub.start()
    try:
        proc = run_push(["--model-dir", tiny_model_dir, "--repo-id", REPO_ID, "--space-id", SPACE_ID],
                        hub_env(hub.url, tmp_path / "home"), check=False)
    finally:
        hub.stop()
    assert proc.returncode == 1
    head = hub.repos[("model", REPO_ID)]["branches"]["main"]
    assert f"model repo {REPO_ID} pushed at commit {head}; not pushed: Space" in proc.stderr, proc.stderr
    assert ("space", SPACE_ID) not in hub.repos


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer that is pushed is the project's GPT-2 BPE


def test_tokenizer_that_loads_but_is_not_the_bpe_is_refused_with_a_fix_that_works(capsys, tiny_model_dir, tmp_path):
    """Without tokenizer.json, AutoTokenizer still loads: a 1-token tokenizer that encodes everything to []."""
    model_dir = broken_copy(tiny_model_dir, tmp_path / "model", lambda d: (d / "tokenizer.json").unlink())
    code, err = run_main(capsys, "--model-dir", model_dir, "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 2 and err.startswith(f"push_to_hub.py: error: --model-dir: the tokenizer in {model_dir} "), err
    assert "is not the GPT-2 BPE: it encodes a sample text to 0 tokens" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
    # The fix the message names, run as it says (from the checkout), makes the same push go through.
    fix = err.split("`")[1]
    assert fix.startswith("python -c ") and "bpe.save_tokenizer" in fix
    subprocess.run(["bash", "-c", f"{sys.executable} {fix.removeprefix('python ')}"], cwd=REPO, check=True)
    code, err = run_main(capsys, "--model-dir", model_dir, "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "model" / "tokenizer_config.json").read_text())["model_max_length"] == 64


@pytest.mark.slow  # needs the quantized dir
def test_int8_dir_with_a_broken_tokenizer_is_refused(capsys, tiny_model_dir, int8_dir, tmp_path):
    broken = broken_copy(int8_dir, tmp_path / "int8", lambda d: (d / "tokenizer.json").unlink())
    code, err = run_main(capsys, "--model-dir", tiny_model_dir, "--quantized-dir", broken, "--repo-id", REPO_ID,
                         "--dry-run", tmp_path / "s")
    assert code == 2 and err.startswith(f"push_to_hub.py: error: --quantized-dir: the tokenizer in {broken} "), err
    assert "bpe.save_tokenizer" in err and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------------------------
# Nothing uploaded names a local path

TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".py", ".yaml", ".yml")


def local_path_hits(files: dict, paths) -> list:
    return [(name, str(path)) for name, data in files.items() if name.endswith(TEXT_SUFFIXES)
            for path in paths if str(path) in data.decode(errors="replace")]


@pytest.mark.slow
def test_pushed_files_name_no_local_path(hub, pushed, model_dir, int8_dir):
    files = hub.files("model", REPO_ID) | {f"space/{k}": v for k, v in hub.files("space", SPACE_ID).items()}
    assert local_path_hits(files, [model_dir, int8_dir, Path.home(), "/moved/input.txt"]) == []
    # The recorded input (gone since training) by name, its hash unknown; root and int8/ alike.
    for name in ("training_args.json", "int8/training_args.json"):
        args = json.loads(files[name])
        assert "input_path" not in args and args["input_name"] == "input.txt" and args["input_sha256"] is None
        assert args["data_description"] == "tiny Shakespeare (test)"
    assert "note: the training text /moved/input.txt no longer exists" in pushed["dry"]


def test_training_args_name_the_input_by_file_name_and_sha256(capsys, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "al"))  # a prefix of the dirs below, not their parent
    text = tmp_path / "alice" / "corpus.txt"
    text.parent.mkdir()
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak. ünïcödé\n" * 100)
    model_dir = tmp_path / "alice" / "out" / "toygpt"
    shutil.copytree(tiny_model_dir, model_dir)
    recorded = {**TRAINING_ARGS, "input": str(text), "input_path": str(text), "output_dir": str(model_dir)}
    (model_dir / "training_args.json").write_text(json.dumps(recorded, indent=2))
    code, err = run_main(capsys, "--model-dir", model_dir, "--repo-id", REPO_ID, "--space-id", SPACE_ID,
                         "--dry-run", tmp_path / "s")
    assert code == 0, err
    staged = tree_bytes(tmp_path / "s")
    args = json.loads(staged["model/training_args.json"])
    assert args["input_name"] == args["input"] == "corpus.txt" and args["output_dir"] == "toygpt"
    assert args["input_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest() and "input_path" not in args
    assert {k: v for k, v in args.items() if k not in ("input", "input_name", "input_sha256", "output_dir")} == \
        {k: v for k, v in recorded.items() if k not in ("input", "input_path", "output_dir")}  # the rest as recorded
    assert local_path_hits(staged, [tmp_path]) == []
    assert (model_dir / "training_args.json").read_text() == json.dumps(recorded, indent=2)  # the source untouched


@pytest.mark.parametrize(
    "name, line, what",
    [("notes.txt", "trained in {model_dir}/checkpoint", "the --model-dir path"),
     ("metrics.jsonl", '{{"step": 1, "log": "{home}/runs/1.log"}}', "your home directory")],
    ids=["model-dir-in-notes", "home-in-metrics"],
)
def test_a_local_path_left_in_a_file_refuses_the_push(capsys, tiny_model_dir, tmp_path, monkeypatch, name, line, what):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / name).write_text("first line\n" + line.format(model_dir=model_dir, home=tmp_path / "home") + "\n")
    code, err = run_main(capsys, "--model-dir", model_dir, "--repo-id", REPO_ID, "--dry-run", tmp_path / "s")
    assert code == 1 and err.startswith(f"push_to_hub.py: error: the staged model/{name} (from {model_dir / name})")
    assert f"holds {what}" in err and "on line 2" in err and "nothing uploaded to the Hub may name a local path" in err
    assert not (tmp_path / "s").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def dry_run(capsys, model_dir, stage) -> tuple[int, str]:
    return run_main(capsys, "--model-dir", model_dir, "--repo-id", REPO_ID, "--dry-run", stage)


def test_a_users_folder_that_holds_model_is_not_taken_for_a_stage(capsys, tiny_model_dir, tmp_path):
    """Only a directory this script staged (its marker) is replaced: P/model/ of drafts and a thesis is not one."""
    (tmp_path / "P" / "model" / "drafts").mkdir(parents=True)
    (tmp_path / "P" / "model" / "thesis.txt").write_text("thesis")
    code, err = dry_run(capsys, tiny_model_dir, tmp_path / "P")
    assert code == 2 and "not a directory this project wrote" in err, err
    assert (tmp_path / "P" / "model" / "thesis.txt").read_text() == "thesis"
    assert (tmp_path / "P" / "model" / "drafts").is_dir()
    assert dry_run(capsys, tiny_model_dir, tmp_path / "S")[0] == 0  # a stage it wrote is replaced by the next run
    assert (tmp_path / "S" / ".toygpt-stage").is_file()
    assert dry_run(capsys, tiny_model_dir, tmp_path / "S")[0] == 0


def test_links_out_of_the_model_dir_are_refused_and_links_inside_are_copied(capsys, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    (tmp_path / "secret.txt").write_text("s3cr3t-7f1")
    (model_dir / "notes.md").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "outside").mkdir()
    (model_dir / "extra").symlink_to(tmp_path / "outside")
    code, err = dry_run(capsys, model_dir, tmp_path / "S")
    assert code == 2 and "symbolic links that lead out of it" in err and "notes.md ->" in err and "extra ->" in err
    assert not (tmp_path / "S").exists()
    (model_dir / "notes.md").unlink()
    (model_dir / "extra").unlink()
    (model_dir / "docs").mkdir()
    (model_dir / "docs" / "usage.md").write_text("how to use")
    (model_dir / "usage.md").symlink_to(model_dir / "docs" / "usage.md")
    (model_dir / "docs" / "again").symlink_to(model_dir / "docs")  # a cycle: walked once
    assert dry_run(capsys, model_dir, tmp_path / "S")[0] == 0
    staged = tmp_path / "S" / "model" / "usage.md"
    assert not staged.is_symlink() and staged.read_text() == "how to use"
    assert "s3cr3t-7f1" not in "".join(p.read_text(errors="replace") for p in (tmp_path / "S").rglob("*") if p.is_file())


def test_a_stage_that_holds_the_model_dir_or_cannot_be_written_is_one_line(capsys, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    parent = tmp_path / "P"
    shutil.copytree(tiny_model_dir, parent / "model")
    before = tree_bytes(parent)
    code, err = dry_run(capsys, parent / "model", parent)
    assert code == 2 and err.startswith("push_to_hub.py: error: --dry-run") and "contains the input" in err, err
    assert len(err.strip().splitlines()) == 1 and tree_bytes(parent) == before
    real_open = os.open

    def read_only(path, *args, **kwargs):  # root ignores chmod: refuse the way a read-only directory does
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(model_dir_module.os, "open", read_only)
    code, err = dry_run(capsys, tiny_model_dir, tmp_path / "ro" / "S")
    assert code == 2 and "cannot write in" in err and len(err.strip().splitlines()) == 1, err
