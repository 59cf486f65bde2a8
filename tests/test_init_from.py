"""toygpt/init_from.py (train.py --init-from): a run starts from a GPT-2 or ToyGPT checkpoint, a local dir or a Hub repo.

A small random GPT-2 (2 layers, width 64, GPT-2's 50257-token vocabulary) is saved locally and served by the stand-in
Hub (tests/hub_server.py). Every way of naming it loads GPT2LMHeadModel's function, and the first eval of the loaded
model is GPT2LMHeadModel's own loss; every error is met through a real case.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, GPT2Config, GPT2LMHeadModel

from toygpt.stream import val_windows
from toygpt import init_from
from configuration_toygpt import ToyGPTConfig
from conftest import REPO, one_thread, run_python
from toygpt.gpt2_conversion import convert_from_gpt2
from toygpt.evaluation import evaluate
from hub_server import FakeHub
from toygpt.init_from import InitFromError, architecture_conflicts, find_init_model, load_init_model
from toygpt.model_dir import ModelDirError, save_model_dir
from toygpt.quantization import quantize_int8
from toygpt.training_loss import CausalLMLoss

N_POSITIONS = 64
GPT2_REPO, TOYGPT_REPO, FIND_ONLY_REPO = "alice/tiny-gpt2", "alice/tiny-toygpt", "alice/find-only"


def random_gpt2(**overrides) -> GPT2LMHeadModel:
    config = GPT2Config(**{**dict(n_layer=2, n_head=2, n_embd=64, n_positions=N_POSITIONS), **overrides})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init zeroes biases and sets LayerNorms to 1: randomize so every tensor counts
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def gpt2():
    return random_gpt2()


@pytest.fixture(scope="module")
def dirs(gpt2, tmp_path_factory):
    """The same GPT-2 as a safetensors dir, a pytorch_model.bin dir, a float16 dir and a converted ToyGPT dir."""
    root = tmp_path_factory.mktemp("init")
    gpt2.save_pretrained(root / "gpt2")
    (root / "gpt2_bin").mkdir()
    gpt2.config.save_pretrained(root / "gpt2_bin")
    torch.save(gpt2.state_dict(), root / "gpt2_bin" / "pytorch_model.bin")  # the format of older Hub checkpoints
    random_gpt2().half().save_pretrained(root / "gpt2_fp16")
    convert_from_gpt2(root / "gpt2", root / "toygpt")
    return root


@pytest.fixture(scope="module")
def windows(shakespeare_path, tmp_path_factory):
    """Held-out windows of 33 tokens, as train.py's evals read them at --block-size 32."""
    text = tmp_path_factory.mktemp("text") / "input.txt"
    text.write_text(shakespeare_path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return text, val_windows(text, 32, max_windows=16)


def max_logit_diff(model, reference) -> float:
    torch.manual_seed(1)
    input_ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        return (model.eval()(input_ids).logits - reference(input_ids).logits).abs().max().item()


def gpt2_loss(gpt2, windows) -> float:
    """GPT2LMHeadModel's own mean loss on the windows: inputs window[:-1], targets window[1:] (shift_labels)."""
    with torch.no_grad():
        x, y = windows[:, :-1], windows[:, 1:].contiguous()
        return gpt2(input_ids=x, labels=y, shift_labels=y).loss.item()


# ----------------------------------------------------------------------------------------------------------------
# Local directories


@pytest.mark.parametrize("name", ["gpt2", "gpt2_bin", "toygpt"])
def test_local_dir_gives_gpt2s_logits(name, dirs, gpt2):
    model, description = load_init_model(str(dirs / name))
    assert type(model).__name__ == "ToyGPTForCausalLM" and model.training  # ready to train
    assert max_logit_diff(model, gpt2) <= 1e-4
    kind = "ToyGPT" if name == "toygpt" else "GPT-2"
    assert description == (f"the {kind} model in directory {name}: 2 layers, 2 heads, width 64, context 64")


def test_weights_are_fp32_whatever_the_checkpoint_stores(dirs):
    model, _ = load_init_model(str(dirs / "gpt2_fp16"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the master weights


def test_first_eval_equals_gpt2s_own_loss_on_the_same_windows(dirs, gpt2, windows):
    """What train.py's first eval computes (evaluation.evaluate over CausalLMLoss), at --block-size 32: the positions
    past 32 are cropped, and on windows that fit the function is GPT-2's."""
    _, val = windows
    model, _ = load_init_model(str(dirs / "gpt2"), block_size=32)
    assert model.transformer.wpe.weight.shape == (32, 64) and model.config.block_size == 32
    result = evaluate(CausalLMLoss(model), val, batch_size=4)
    assert result["val_tokens"] == val.windows[:, 1:].numel()
    assert result["val_loss"] == pytest.approx(gpt2_loss(gpt2, val.windows), rel=1e-5)


def test_dropout_is_set_freely_and_the_checkpoints_is_kept_otherwise(dirs):
    start = find_init_model(str(dirs / "gpt2"))
    assert start.config.dropout == 0.1  # GPT2Config's default resid/embd/attn_pdrop
    assert start.load().config.dropout == 0.1
    model = start.load(dropout=0.0)
    assert model.config.dropout == 0.0 and all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_architecture_conflicts_name_each_flag_and_the_checkpoints_value(dirs):
    config = find_init_model(str(dirs / "gpt2")).config
    assert architecture_conflicts(config) == []
    assert architecture_conflicts(config, n_layer=2, n_head=2, n_embd=64, block_size=64) == []
    assert architecture_conflicts(config, block_size=16) == []  # cropped by load()
    assert architecture_conflicts(config, n_layer=6, n_head=4, n_embd=64, block_size=128) == [
        "--n-layer 6 (the checkpoint has 2)",
        "--n-head 4 (the checkpoint has 2)",
        "--block-size 128 (the checkpoint has 64 positions; a smaller --block-size crops them)",
    ]


def test_record_names_the_start(dirs):
    start = find_init_model(str(dirs / "toygpt"))
    record = start.record()
    assert record == {"init_from": str(dirs / "toygpt"), "init_from_revision": None,
                      "init_from_description": start.description, "init_config": record["init_config"]}
    json.dumps(record)  # it goes into training_args.json
    # --resume rebuilds the model from init_config (with the run's block_size and dropout): the same architecture
    rebuilt = ToyGPTConfig(**{**record["init_config"], "block_size": 32, "dropout": 0.0})
    loaded = start.load(block_size=32, dropout=0.0)
    assert {k: getattr(rebuilt, k) for k in init_from.CONFIG_FIELDS} == {
        k: getattr(loaded.config, k) for k in init_from.CONFIG_FIELDS}


# ----------------------------------------------------------------------------------------------------------------
# Local errors, each through a real case


def local_error_cases(root, dirs):
    """{case: (id_or_dir, words the message must hold)}, each made for real under `root`."""
    (root / "file.txt").write_text("not a model")
    (root / "empty").mkdir()
    shutil.copytree(dirs / "gpt2", root / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    random_gpt2(activation_function="relu").save_pretrained(root / "relu")
    random_gpt2(vocab_size=1000).save_pretrained(root / "vocab")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        root / "bert")
    toygpt, _ = load_init_model(str(dirs / "toygpt"))
    save_model_dir(quantize_int8(toygpt.eval()), root / "int8")
    return {
        "missing_path": (str(root / "nope"), ["is not a directory, nor a Hub repo id", "check the path"]),
        "relative_path": ("./out/nope", ["is not a directory, nor a Hub repo id"]),
        "too_deep_for_an_id": ("a/b/c", ["is not a directory, nor a Hub repo id (owner/name"]),
        "file": (str(root / "file.txt"), ["is a file; pass a model directory"]),
        "no_config": (str(root / "empty"), ["has no config.json"]),
        "no_weights": (str(root / "no_weights"), ["has no weights", "model.safetensors"]),
        "unrepresentable": (str(root / "relu"), ["cannot be represented as ToyGPT", "activation_function='relu'"]),
        "vocabulary": (str(root / "vocab"), ["vocabulary of 1000 tokens", "50257"]),
        "model_type": (str(root / "bert"), ["holds a 'bert' model", "openai-community/gpt2"]),
        "int8": (str(root / "int8"), ["int8-quantized", "start from the fp32 model"]),
    }


def test_unusable_local_sources_are_refused_before_loading_weights(tmp_path, dirs):
    for case, (given, words) in local_error_cases(tmp_path, dirs).items():
        with pytest.raises(ModelDirError) as err:
            find_init_model(given)
        assert given in str(err.value), (case, str(err.value))
        for word in words:
            assert word in str(err.value), (case, str(err.value))
    with pytest.raises(InitFromError, match="a revision applies to a Hub repo only"):
        find_init_model(str(dirs / "gpt2"), revision="main")


@pytest.mark.parametrize("name, weights", [("gpt2", "model.safetensors"), ("gpt2_bin", "pytorch_model.bin"),
                                           ("toygpt", "model.safetensors")])
def test_truncated_weights_are_refused_naming_the_dir_and_the_fix(name, weights, tmp_path, dirs):
    damaged = tmp_path / name
    shutil.copytree(dirs / name, damaged)
    path = damaged / weights
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    start = find_init_model(str(damaged))  # the config is fine: the damage shows when the weights load
    with pytest.raises(ModelDirError) as err:
        start.load()
    message = str(err.value)
    assert f"The weights in {damaged} cannot be loaded" in message and "copy or download them again" in message


# ----------------------------------------------------------------------------------------------------------------
# The Hub: downloads through huggingface_hub / from_pretrained, in fresh processes (HF_ENDPOINT is read at import)

HUB_PROBE = """
import json, torch
from transformers import GPT2LMHeadModel
from toygpt import init_from
reference = GPT2LMHeadModel.from_pretrained(REFERENCE).eval()
torch.manual_seed(1)
input_ids = torch.randint(0, 50257, (2, 24))
out = {}
for given, revision in CASES:
    key = given + ("@" + revision if revision else "")
    try:
        if given == FIND_ONLY:
            out[key] = {"record": init_from.find_init_model(given, revision).record()}
            continue
        model, description = init_from.load_init_model(given, revision)
        with torch.no_grad():
            diff = (model.eval()(input_ids).logits - reference(input_ids).logits).abs().max().item()
        out[key] = {"diff": diff, "description": description}
    except init_from.ModelDirError as err:  # InitFromError, or the dir's own
        out[key] = {"error": str(err)}
print(json.dumps(out))
"""


# huggingface_hub retries a connection error 5 times, sleeping 1+2+4+8+8 s between tries (no setting shortens it):
# the retries still run, against a port where nothing listens, without the 23 s of waiting.
NO_RETRY_WAIT = """
import types
import huggingface_hub.utils._http as _http
_http.time = types.SimpleNamespace(sleep=lambda seconds: None)
"""


def hub_probe(cases, reference, env, preamble="") -> dict:
    code = preamble + (HUB_PROBE.replace("REFERENCE", repr(str(reference))).replace("CASES", repr(cases))
                       .replace("FIND_ONLY", repr(FIND_ONLY_REPO)))
    return json.loads(run_python(code, cwd=REPO, env=env).splitlines()[-1])


def hub_env(url, home, offline=False) -> dict:
    return {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}


def repo_files(directory) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub(dirs, tmp_path_factory):
    hub = FakeHub(tmp_path_factory.mktemp("hub"))
    hub.start()
    hub.gpt2_commit = hub.add_repo("model", GPT2_REPO, repo_files(dirs / "gpt2"))
    hub.add_repo("model", TOYGPT_REPO, repo_files(dirs / "toygpt"))
    hub.find_only_commit = hub.add_repo("model", FIND_ONLY_REPO, repo_files(dirs / "gpt2"))
    hub.add_repo("model", "alice/no-config", {"README.md": b"# just a card\n"})
    yield hub
    hub.stop()


def test_repo_id_downloads_from_the_hub_and_then_loads_offline_from_the_cache(hub, dirs, tmp_path):
    home = tmp_path / "home"
    cases = [(GPT2_REPO, None), (TOYGPT_REPO, None), (GPT2_REPO, hub.gpt2_commit), (FIND_ONLY_REPO, None),
             ("alice/missing", None), (GPT2_REPO, "no-such-branch"), ("alice/no-config", None)]
    out = hub_probe(cases, dirs / "gpt2", hub_env(hub.url, home))
    for key in (GPT2_REPO, TOYGPT_REPO, f"{GPT2_REPO}@{hub.gpt2_commit}"):
        assert out[key].get("diff", 1) <= 1e-4, (key, out[key])
    commit = hub.gpt2_commit[:12]
    assert out[GPT2_REPO]["description"] == (f"the GPT-2 model in Hub repo {GPT2_REPO} (commit {commit}): 2 layers, "
                                             "2 heads, width 64, context 64")
    assert out[TOYGPT_REPO]["description"].startswith(f"the ToyGPT model in Hub repo {TOYGPT_REPO} (commit ")
    # Finding reads config.json alone: a wrong flag or an unusable model fails before any weights are downloaded.
    assert out[FIND_ONLY_REPO]["record"]["init_from_revision"] == hub.find_only_commit  # pinned to what it found
    find_only = [r for r in hub.requests if f"/{FIND_ONLY_REPO}/" in r]
    assert find_only and all(r.endswith("/config.json") for r in find_only), find_only
    missing, revision, no_config = (out[k]["error"] for k in ("alice/missing", f"{GPT2_REPO}@no-such-branch",
                                                               "alice/no-config"))
    assert "alice/missing is not a local directory" in missing and "does not exist" in missing and hub.url in missing
    assert "HF_TOKEN" in missing
    assert "has no revision 'no-such-branch'" in revision
    assert "has no config.json: it is not a transformers model repo" in no_config

    offline = hub_probe([(GPT2_REPO, None), ("alice/missing", None)], dirs / "gpt2", hub_env(hub.url, home, True))
    assert offline[GPT2_REPO].get("diff", 1) <= 1e-4, offline[GPT2_REPO]  # the cache, as downloaded above
    assert offline["alice/missing"]["error"] == (
        f"HF_HUB_OFFLINE is set and alice/missing is not in the Hub cache ({home / 'hub'}): unset HF_HUB_OFFLINE to "
        "download it, or pass a local model directory.")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_hub_is_reported_with_the_endpoint_and_the_fix(dirs, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    out = hub_probe([(GPT2_REPO, None)], dirs / "gpt2", hub_env(url, tmp_path / "home"), preamble=NO_RETRY_WAIT)
    error = out[GPT2_REPO]["error"]
    assert error.startswith(f"{GPT2_REPO} is not a local directory, and cannot reach {GPT2_REPO} on the Hub ({url}) (")
    assert f"{GPT2_REPO} is not in the Hub cache" in error and "check the network and HF_ENDPOINT" in error


# ----------------------------------------------------------------------------------------------------------------
# train.py --init-from, end to end (runs once train.py has the flag)

needs_train_flag = pytest.mark.skipif("--init-from" not in (REPO / "train.py").read_text(),
                                      reason="needs train.py --init-from")
TRAIN_FLAGS = ["--block-size", "32", "--batch-size", "4", "--grad-accum", "1", "--eval-batches", "2",
               "--warmup-steps", "0", "--seed", "7"]


def run_train(*args, check=True, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOYGPT_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@needs_train_flag
@pytest.mark.slow
def test_train_init_from_gpt2_dir_first_eval_is_gpt2s_loss_and_resume_does_not_reload(dirs, gpt2, windows, tmp_path,
                                                                                       capsys):
    """At --lr 0 the weights stay GPT-2's, so every eval is GPT2LMHeadModel's own loss on the same windows. --resume
    continues the checkpoint: the start is recorded, not reloaded (here it is gone by then); train.main() in this
    process, the first run being a real one."""
    text, _ = windows
    start, out = tmp_path / "gpt2", tmp_path / "run"
    shutil.copytree(dirs / "gpt2", start)
    run_train("--init-from", start, "--input", text, "--output-dir", out, *TRAIN_FLAGS, "--max-steps", "2",
              "--eval-every", "1", "--lr", "0", "--min-lr", "0")
    first = next(r for r in metrics(out) if "val_loss" in r)
    val = val_windows(text, 32, max_windows=2 * 4)  # --eval-batches x --batch-size
    assert first["step"] == 1 and first["val_loss"] == pytest.approx(gpt2_loss(gpt2, val.windows), rel=1e-5)
    args = json.loads((out / "training_args.json").read_text())
    assert args["init_from"] == str(start) and (args["n_layer"], args["n_embd"], args["block_size"]) == (2, 64, 32)
    assert "fine-tuned from" in (out / "README.md").read_text().lower()

    shutil.rmtree(start)
    import train

    with one_thread():
        code = train.main(["--output-dir", str(out), "--resume", "--max-steps", "3"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert metrics(out)[-1]["step"] == 3
    assert json.loads((out / "training_args.json").read_text())["init_from"] == str(start)


@needs_train_flag
def test_train_init_from_a_hub_repo_id_records_the_commit(hub, windows, tmp_path):
    text, _ = windows
    out = tmp_path / "run"
    run_train("--init-from", GPT2_REPO, "--input", text, "--output-dir", out, *TRAIN_FLAGS, "--max-steps", "1",
              "--eval-every", "1", env=hub_env(hub.url, tmp_path / "home"))
    args = json.loads((out / "training_args.json").read_text())
    assert (args["init_from"], args["init_from_revision"]) == (GPT2_REPO, hub.gpt2_commit)
    assert f"fine-tuned from `{GPT2_REPO}` (commit {hub.gpt2_commit[:12]})" in (out / "README.md").read_text()


@needs_train_flag
def test_train_init_from_refuses_conflicting_architecture_flags_before_any_work(dirs, windows, tmp_path):
    text, _ = windows
    out = tmp_path / "run"
    proc = run_train("--init-from", dirs / "gpt2", "--input", text, "--output-dir", out, "--n-layer", "3",
                     "--block-size", "128", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--n-layer 3 (the checkpoint has 2)" in proc.stderr and "--block-size 128 (the checkpoint has 64" in proc.stderr
    assert not out.exists()
