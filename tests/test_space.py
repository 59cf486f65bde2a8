"""The Space (space/app.py): a real `python app.py` server, driven by gradio_client and by headless Chromium."""

import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from transformers import TextIteratorStreamer

from conftest import REPO, one_thread, run_python, small_config

SPACE = REPO / "space"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CONTEXT = 64  # conftest.small_config's block_size
SEED = 1234


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    """One `python space/app.py` process for the module, run outside the repo so only pip packages import."""
    workdir = tmp_path_factory.mktemp("space")
    port = free_port()
    env = {
        **os.environ,
        "TOYGPT_MODEL": str(tiny_model_dir),
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    log_path = workdir / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SPACE / "app.py")], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while "Running on local URL" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"app.py did not start (exit code {proc.poll()}):\n{log_path.read_text()}")
            time.sleep(0.5)
        assert url in log_path.read_text()  # it prints the URL it serves on
        urllib.request.urlopen(url + "/", timeout=30).read()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=False)


def generate(client, prompt, **settings):
    """The documented API call: /generate(prompt, max_new_tokens=, temperature=, top_k=, top_p=, num_sequences=,
    seed=) returns the list of generated texts, one per sequence."""
    texts = client.predict(prompt, **{"max_new_tokens": 8, "seed": SEED, **settings}, api_name="/generate")
    assert isinstance(texts, list) and len(texts) == settings.get("num_sequences", 1)
    return texts


@pytest.mark.slow
def test_generate_api_returns_the_prompt_continuations(client):
    texts = generate(client, "ROMEO:", num_sequences=3)
    for text in texts:
        assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert len(set(texts)) == 3  # three independent samples
    assert generate(client, "ROMEO:", num_sequences=3) == texts  # same seed, same texts
    assert generate(client, "ROMEO:", num_sequences=3, seed=SEED + 1) != texts
    greedy = generate(client, "ROMEO:", temperature=0.0, seed=None)
    assert generate(client, "ROMEO:", temperature=0.0, seed=None) == greedy  # greedy ignores the seed


@pytest.mark.slow
def test_api_refuses_an_empty_prompt_with_a_friendly_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Please type a prompt"):
        generate(client, "   ")


@pytest.mark.slow
def test_too_long_prompt_is_cut_from_the_left(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "".join(f" line {i}" for i in range(100))  # ~300 tokens > the 64-token context
    max_new_tokens = 10
    text = generate(client, prompt, max_new_tokens=max_new_tokens)[0]
    kept = tokenizer.decode(tokenizer(prompt)["input_ids"][-(CONTEXT - max_new_tokens):])
    assert kept.endswith(" line 99") and text.startswith(kept) and len(text) > len(kept)


@pytest.mark.slow
def test_out_of_range_inputs_are_rejected_clearly(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="max_new_tokens must be from 1 to 63"):  # context 64 - 1 prompt token
        generate(client, "ROMEO:", max_new_tokens=10**6)
    with pytest.raises(AppError, match="temperature must be from 0.0 to 2.0.*got -1.0"):
        generate(client, "ROMEO:", temperature=-1.0)
    with pytest.raises(AppError, match="num_sequences must be from 1 to 5"):
        generate(client, "ROMEO:", num_sequences=50)
    with pytest.raises(AppError, match="seed must be a whole number"):
        generate(client, "ROMEO:", seed=-3)


@pytest.mark.slow
def test_api_needs_only_the_prompt_and_names_its_parameters_and_result(client):
    texts = client.predict("ROMEO:", api_name="/generate")
    assert len(texts) == 1 and texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:")
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/generate"] and not api["unnamed_endpoints"]  # the UI's handler is private
    endpoint = api["named_endpoints"]["/generate"]
    info = endpoint["parameters"]
    assert [p["parameter_name"] for p in info if not p["parameter_has_default"]] == ["prompt"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in info if p["parameter_has_default"]}
    assert defaults == {"max_new_tokens": CONTEXT // 2, "temperature": 0.8, "top_k": 50, "top_p": 1.0,
                        "num_sequences": 1, "seed": None}
    assert [r["label"] for r in endpoint["returns"]] == ["texts"]


@pytest.mark.slow
def test_twenty_concurrent_api_clients_get_answers_or_queue_full_and_the_app_keeps_serving(app_url, client):
    from gradio_client import Client

    def ask(i):
        try:
            job = Client(app_url, verbose=False, download_files=False).submit(
                f"ROMEO {i}:", max_new_tokens=8, seed=i, api_name="/generate")
            return "answer", job.result(timeout=240)[0]  # the first (only) text
        except Exception as err:  # gradio_client raises the app's refusal, e.g. "Queue is full"
            return "refused", f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(20) as pool:
        results = [future.result(timeout=300) for future in [pool.submit(ask, i) for i in range(20)]]
    for i, (kind, text) in enumerate(results):
        assert (kind == "answer" and text.startswith(f"ROMEO {i}:")) or re.search("queue.*full", text, re.I), text
    assert sum(kind == "answer" for kind, _ in results) >= 1
    assert generate(client, "ROMEO:")[0].startswith("ROMEO:")  # still serving


def test_generate_stream_clamps_out_of_range_values(tiny_model_dir):
    """Called directly (no slider checks in between), the generator clamps instead of failing."""
    app = import_app()
    loaded = app.load_model(str(tiny_model_dir))
    with one_thread():
        *_, (texts, status) = app.generate_stream(loaded, "ROMEO:", 10**6, -3.0, -5, 7.0, 99, 0)
    # 5 sequences (max), greedy (temperature 0) and 63 new tokens: what fits the 64-token context after the prompt.
    assert len(texts) == 5 and "last answer: 63 tokens × 5" in status


def test_int8_subfolder_is_preferred_on_cpu_unless_fp32_is_asked_for(tiny_model_dir, tmp_path):
    app = import_app()
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, repo)
    assert not app.has_int8_subfolder(str(repo))
    shutil.copytree(tiny_model_dir, repo / "int8")
    assert app.has_int8_subfolder(str(repo))
    # The copy in int8/ is fp32, so an explicit int8 request loads it and then refuses it by name.
    with pytest.raises(SystemExit, match="TOYGPT_VARIANT=int8.*holds fp32 weights"):
        app.load_model(str(repo), variant="int8")
    assert app.load_model(str(repo), variant="fp32").precision == "fp32"
    with pytest.raises(ValueError, match="TOYGPT_VARIANT must be one of"):
        app.load_model(str(repo), variant="fp16")


def import_app():
    sys.path.insert(0, str(SPACE))
    try:
        import app
    finally:
        sys.path.remove(str(SPACE))
    return app


def test_app_wiring_queue_limit_named_api_examples(tiny_model_dir):
    """What a Space needs beyond the UI: one generation at a time, a bounded queue, `/generate` for gradio_client."""
    app = import_app()
    demo = app.build_demo(str(tiny_model_dir))
    public = {fn.api_name: fn for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert list(public) == ["generate"]
    ui = [fn for fn in demo.fns.values() if fn.fn is not None and fn.fn.__name__ == "stream_to_ui"]
    assert len(ui) == 1 and ui[0].api_visibility == "private"
    for fn in (public["generate"], ui[0]):  # one generation at a time, UI and API together
        assert fn.concurrency_limit == 1 and fn.concurrency_id == "generation"
    assert demo._queue.max_size == app.QUEUE_SIZE
    assert {"Hello, my name is", "ROMEO:"} <= set(app.EXAMPLES)
    # The UI streams: its handler is a generator, fed by a TextIteratorStreamer.
    assert ui[0].fn.__code__.co_flags & inspect.CO_GENERATOR
    assert issubclass(app.BatchTextStreamer, TextIteratorStreamer)
    # The prompt box's hint does not look like a prompt already typed.
    prompt = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "prompt")
    assert not prompt.value and prompt.placeholder.startswith("Type ")


def test_space_card_and_requirements_match_installed_gradio():
    import gradio

    header = (SPACE / "README.md").read_text().split("---")[1]
    card = yaml.safe_load(header)
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py"
    assert card["sdk_version"] == gradio.__version__
    requirements = (SPACE / "requirements.txt").read_text().split()
    assert f"gradio=={gradio.__version__}" in requirements
    # The project pins the Space's gradio.
    project = [Requirement(line) for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert [str(r.specifier) for r in project if r.name == "gradio"] == [f"=={card['sdk_version']}"]
    # Self-contained: app.py imports only packages the Space installs, none of the repo's modules.
    for module in ("bpe", "model_dir", "configuration_toygpt", "modeling_toygpt"):
        assert f"import {module}" not in (SPACE / "app.py").read_text()


@pytest.mark.slow
def test_browser_types_a_prompt_and_sees_generated_text(app_url, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM}; install it (apt-get install chromium) for the browser test")
    from playwright.sync_api import sync_playwright  # requirements-dev.txt: only Chromium may be missing

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app_url + "/", timeout=60_000)
            # Components by elem_id (set in app.py): gradio's own labels on a slider's number box vary by version.
            sequences = page.locator("#num-sequences input[type=number]")
            sequences.fill("2")
            sequences.press("Enter")
            page.locator("#seed input").fill("7")
            page.locator("#prompt textarea").fill("ROMEO:")
            page.locator("#generate").click()
            page.locator("#status").get_by_text("tokens/s").wait_for(timeout=60_000)
            for i in (1, 2):
                text = page.locator(f"#sequence-{i} textarea").input_value()
                assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
            assert not page.locator("#sequence-3").is_visible()  # only as many boxes as sequences
            status = page.locator("#status").inner_text()
            assert "fp32" in status and "seed 7" in status, status
            screenshot = tmp_path / "space.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("TOYGPT_SCREENSHOT_DIR"):
        target = REPO / os.environ["TOYGPT_SCREENSHOT_DIR"]  # relative paths are relative to the repo
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / "space.png")


# ----------------------------------------------------------------------------------------------------------------
# A model the app cannot serve: one `app.py: error:` line, exit 2 (bad setting) or 1 (run time), no traceback


def run_app(cwd: Path, env: dict, app: Path = SPACE / "app.py") -> subprocess.CompletedProcess:
    """`python app.py` expected to refuse to start: it must exit (not serve) well within the timeout."""
    full = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_SERVER_PORT": str(free_port()), "HF_HOME": str(cwd / "hf-home"),
            "HF_HUB_CACHE": str(cwd / "hf-home" / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    for name in ("HF_TOKEN", "TOYGPT_MODEL", "TOYGPT_VARIANT", "TOYGPT_REVISION", "TRANSFORMERS_OFFLINE"):
        full.pop(name, None)
    return subprocess.run([sys.executable, str(app)], cwd=cwd, env={**full, **env}, capture_output=True, text=True,
                          timeout=180)


def assert_refused(proc, status: int, *messages: str) -> str:
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("app.py: error: ") and all(m in last for m in messages), proc.stderr
    return last


@pytest.mark.parametrize(
    "model, offline, status, messages",
    [
        # A typo'd directory is never taken for a repo id (no Hub is asked: none is reachable here).
        ("out/toygpt-int9", "0", 2, ["TOYGPT_MODEL='out/toygpt-int9' names no directory: {cwd}/out/toygpt-int9 "
                                     "does not exist", "make demo"]),
        ("alice/toy gpt", "0", 2, ["TOYGPT_MODEL='alice/toy gpt' is neither an existing directory nor a valid Hub "
                                   "repo id", "USER/NAME"]),
        ("alice/toygpt", "1", 1, ["'alice/toygpt' is not in the local cache ({cwd}/hf-home/hub)", "HF_HUB_OFFLINE=1"]),
        ("alice/toygpt", "0", 1, ["cannot reach the Hub at {endpoint} to load 'alice/toygpt' (ConnectError",
                                  "HF_HUB_OFFLINE=1"]),
    ],
    ids=["typo-dir", "invalid-repo-id", "offline-not-cached", "hub-unreachable"],
)
def test_app_refuses_a_model_it_cannot_find(tmp_path, model, offline, status, messages):
    (tmp_path / "out" / "toygpt-int8").mkdir(parents=True)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_app(tmp_path, {"TOYGPT_MODEL": model, "HF_HUB_OFFLINE": offline, "HF_ENDPOINT": endpoint})
    assert_refused(proc, status, *(m.format(cwd=tmp_path, endpoint=endpoint) for m in messages))


def test_app_refuses_a_hub_repo_that_does_not_exist(tmp_path):
    from hub_server import FakeHub

    hub = FakeHub(tmp_path / "hub")
    hub.start()
    try:
        proc = run_app(tmp_path, {"TOYGPT_MODEL": "alice/toygtp", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
    finally:
        hub.stop()
    assert_refused(proc, 2, f"there is no Hub model 'alice/toygtp' at {hub.url}", "HF_TOKEN", "./alice/toygtp")


def test_app_refuses_a_model_id_txt_naming_no_directory(tmp_path):
    """The pushed Space reads model_id.txt beside app.py; a relative dir there is relative to that file."""
    space = tmp_path / "space"
    space.mkdir()
    shutil.copy(SPACE / "app.py", space / "app.py")
    (space / "model_id.txt").write_text("../out/toygpt\n")
    proc = run_app(tmp_path, {}, app=space / "app.py")
    assert_refused(proc, 2, f"{space / 'model_id.txt'} (holding '../out/toygpt') names no directory")


def test_load_model_says_what_is_wrong_with_a_local_path(tmp_path, monkeypatch, tiny_model_dir):
    app = import_app()
    (tmp_path / "empty").mkdir()
    with pytest.raises(app.StartupError, match=r"could not load the model from .*empty.*re-create it") as err:
        app.load_model(str(tmp_path / "empty"))
    assert err.value.status == 2
    with pytest.raises(app.StartupError, match="is a file, not a model directory"):
        app.load_model(str(tiny_model_dir / "config.json"))
    monkeypatch.chdir(tmp_path)
    for typo in ("./toygpt", "toygpt/", "empty/toygpt", "a/b/c"):  # shapes no repo id has: never sent to the Hub
        with pytest.raises(app.StartupError, match=f"the model '{typo}' names no directory: {tmp_path}/"):
            app.load_model(typo)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TOYGPT_MODEL", "~/models/toygpt")
    with pytest.raises(app.StartupError, match=f"names no directory: {tmp_path}/home/models/toygpt does not exist"):
        app.default_model_id()
    (tmp_path / "home" / "models" / "toygpt").mkdir(parents=True)
    assert app.default_model_id() == str(tmp_path / "home" / "models" / "toygpt")  # ~ expanded for from_pretrained


def test_app_refuses_a_model_dir_without_tokenizer_json(tiny_model_dir, tmp_path):
    """Without tokenizer.json, AutoTokenizer loads a 1-token tokenizer and every request would fail: refuse at start."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "tokenizer.json").unlink()
    proc = run_app(tmp_path, {"TOYGPT_MODEL": str(model), "HF_HUB_OFFLINE": "1"})
    assert_refused(proc, 2, f"the tokenizer in '{model}' has 1 token(s), the model 50257", "tokenizer.json",
                   "Re-create the model directory")


def test_auto_serves_fp32_when_the_int8_subfolder_is_of_older_weights(tiny_model_dir, tmp_path, capsys):
    from modeling_toygpt import ToyGPTForCausalLM
    from toygpt.model_dir import save_model_dir
    from toygpt.quantization import quantize_dir

    from conftest import small_config

    app = import_app()
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    quantize_dir(model, model / "int8", speed_tokens=0, log=lambda *a: None)
    assert app.load_model(str(model)).precision == "int8" and "warning" not in capsys.readouterr().err

    torch.manual_seed(1)  # retrained: `train.py --overwrite` keeps int8/ (not its own), now a copy of older weights
    save_model_dir(ToyGPTForCausalLM(small_config()), model, overwrite=True)
    loaded = app.load_model(str(model))
    assert loaded.precision == "fp32" and "int8 copy is stale" in loaded.describe()
    err = capsys.readouterr().err
    assert "quantized from other weights" in err and f"python quantize.py {model} {model / 'int8'} --overwrite" in err
    assert app.load_model(str(model), variant="int8").precision == "int8"  # asked for by name: served, with the warning
    assert "quantized from other weights" in capsys.readouterr().err

    report = json.loads((model / "int8" / "quantization_report.json").read_text())
    del report["source_sha256"]  # int8 dirs from before the record: taken as they are
    (model / "int8" / "quantization_report.json").write_text(json.dumps(report))
    assert app.load_model(str(model)).precision == "int8"


def test_top_k_sampler_draws_from_temperature_top_k_and_top_p_as_generate_would():
    """The app's own sampler (generate()'s multinomial over the whole vocabulary takes ~1 ms a step): same
    distribution, the drawn token left alone for the greedy pick."""
    app = import_app()
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)

    def frequencies(temperature, top_k, top_p, n=4000):
        sampler = app.TopKSampler(temperature, top_k, top_p)
        counts = torch.zeros(4)
        for _ in range(n):
            out = sampler(None, logits.clone())
            assert torch.isfinite(out).sum() == 1  # one token left for the greedy pick
            counts[out.argmax()] += 1
        return counts / n

    torch.testing.assert_close(frequencies(1.0, 2, 1.0), torch.tensor([0.625, 0.375, 0, 0]), rtol=0, atol=0.03)
    torch.testing.assert_close(frequencies(1.0, 4, 0.7), torch.tensor([0.625, 0.375, 0, 0]), rtol=0, atol=0.03)
    sharp = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(frequencies(0.5, 4, 1.0), sharp / sharp.sum(), rtol=0, atol=0.03)


def test_the_int8_warm_up_compiles_for_the_whole_context(tmp_path, monkeypatch):
    """int8's generate() sizes its static cache per call (256 slots at least); the app's warm-up asks for the whole
    context, so no visitor's longer call compiles again."""
    from modeling_toygpt import ToyGPTForCausalLM
    from toygpt.model_dir import save_model_dir
    from toygpt.quantization import quantize_dir

    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    torch.manual_seed(0)
    fp32 = save_model_dir(ToyGPTForCausalLM(small_config(block_size=512)), tmp_path / "fp32")
    quantize_dir(fp32, tmp_path / "int8", speed_tokens=0, log=lambda message: None)
    app = import_app()
    loaded = app.load_model(str(tmp_path / "int8"))
    assert loaded.precision == "int8"
    with one_thread():
        app.warm_up(loaded)
    assert loaded.model._previous_max_cache_length == 512
