"""ToyGPT Space: sample text from a ToyGPT model, streamed token by token, up to five sequences side by side.

Which model: TOYGPT_MODEL (Hub repo id or local directory), else `model_id.txt` beside this file (the push step
writes it), else ../out/toygpt-int8 or ../out/toygpt. On CPU the int8 variant is preferred: subfolder `int8` of
the model repo/dir when present (in a local dir, only if it was quantized from the weights beside it).
TOYGPT_VARIANT=fp32|int8|auto (default auto) overrides; TOYGPT_REVISION picks a Hub branch. The int8 model's
generate() runs a static cache and a compiled decode step (TOYGPT_INT8_COMPILE=0: eager), warmed up before serving;
the app samples top-k itself (TopKSampler). Self-contained on
purpose: a Space is deployed alone, so this imports pip packages only.

    TOYGPT_MODEL=out/toygpt-int8 python space/app.py        # http://127.0.0.1:7860 (GRADIO_SERVER_PORT to change)

API (gradio_client): `/generate` takes the prompt and optional sampling settings and returns the list of generated
texts (prompt + continuation each); the UI streams through its own, private handler.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.utils import logging as transformers_logging

PROG = "app.py"
APP_DIR = Path(__file__).resolve().parent
VARIANTS = ("auto", "fp32", "int8")
INT8_SUBFOLDER = "int8"
MAX_SEQUENCES = 5
MAX_NEW_TOKENS = 512  # slider cap; a smaller model context lowers it further
CONCURRENCY_LIMIT = 1  # one generation at a time: it already uses every CPU core, and seeds stay reproducible
QUEUE_SIZE = 32  # requests waiting beyond this are refused with "queue full" instead of piling up
MAX_PROMPT_CHARS = 100_000  # cut before tokenizing, so a pasted book costs no time; far more than any context
EXAMPLES = [
    "Hello, my name is",
    "ROMEO:",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "To be, or not to be",
]
EMPTY_PROMPT_MESSAGE = "Please type a prompt first, or pick one of the examples (e.g. “ROMEO:”)."


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    precision: str  # "int8" or "fp32"
    device: str
    note: str = ""  # why the precision is not the one asked for, if it is not

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def max_new_tokens(self) -> int:
        return max(1, min(MAX_NEW_TOKENS, self.context - 1))  # at least one prompt token must fit

    def describe(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"`{self.model_id}` · {self.precision}{note} · {self.device} · {self.context}-token context"


class StartupError(SystemExit):
    """Why the app cannot start, as one line: main() prints `app.py: error: <message>` and exits with `status`
    (2: a TOYGPT_* setting names no usable model; 1: a failure at run time, e.g. the Hub unreachable)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.message, self.status = message, status


MODEL_HELP = (
    "a model directory written by train.py or quantize.py (`make demo` writes out/toygpt and out/toygpt-int8) "
    "or a Hub repo id, USER/NAME"
)


def looks_like_path(value: str, base: Path) -> bool:
    """A value meant as a local directory (relative to `base`): shapes a Hub repo id (NAME, USER/NAME) never has."""
    slashes = value.count("/") + value.count("\\")
    return (value.startswith((".", "~", "/", "\\")) or value.endswith(("/", "\\")) or slashes > 1
            or (slashes == 1 and (base / value).parent.is_dir()))  # out/typo where out/ exists


def check_model_id(value: str, where: str, base: Path = Path(".")) -> str:
    """`value` as a local directory (relative to `base`, ~ expanded) if it is one, else as a Hub repo id.

    StartupError, naming `where` the value came from, if it is a path that does not exist, a file, or no valid
    repo id: a typo'd directory must not be sent to the Hub as a repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = base / Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise StartupError(f"{where} is a file, not a model directory; point it at {MODEL_HELP}.")
    if looks_like_path(value, base):
        raise StartupError(f"{where} names no directory: {path.absolute()} does not exist. Point it at {MODEL_HELP}.")
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise StartupError(
            f"{where} is neither an existing directory nor a valid Hub repo id ({err}). Point it at {MODEL_HELP} "
            "(letters, digits, '-', '_' and '.', e.g. alice/toygpt)."
        ) from None
    return value


def default_model_id(variant: str = "auto") -> str:
    """TOYGPT_MODEL, else model_id.txt beside this file, else the `make demo` output dirs."""
    if os.environ.get("TOYGPT_MODEL"):
        return check_model_id(os.environ["TOYGPT_MODEL"], f"TOYGPT_MODEL={os.environ['TOYGPT_MODEL']!r}")
    config_file = APP_DIR / "model_id.txt"
    if config_file.is_file() and config_file.read_text().strip():
        value = config_file.read_text().strip()  # a repo id, or a directory relative to this file
        return check_model_id(value, f"{config_file} (holding {value!r})", base=APP_DIR)
    names = ["toygpt"] if variant == "fp32" else ["toygpt-int8", "toygpt"]
    for name in names:
        if (APP_DIR.parent / "out" / name / "config.json").is_file():
            return str(APP_DIR.parent / "out" / name)
    raise StartupError(
        "No model to serve: set TOYGPT_MODEL to a Hub repo id or a model directory (e.g. "
        "`TOYGPT_MODEL=out/toygpt-int8 python space/app.py`), or write one into space/model_id.txt, "
        "or run `make demo` to train and quantize one into out/."
    )


def check_hub_model(model_id: str, revision: str | None = None) -> None:
    """StartupError saying why `model_id` cannot come from the Hub (or, offline, from the cache), else None."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{model_id!r}" + (f" at revision {revision!r}" if revision else "")
    if constants.HF_HUB_OFFLINE:  # only the local cache can answer
        if isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str):
            return
        raise StartupError(
            f"the Hub model {name} is not in the local cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 (or "
            "TRANSFORMERS_OFFLINE=1) forbids downloading it. Unset HF_HUB_OFFLINE to download it once, or set "
            f"TOYGPT_MODEL to a local model directory.", status=1)
    try:
        get_hf_file_metadata(hf_hub_url(model_id, "config.json", revision=revision))
    except GatedRepoError:
        raise StartupError(f"the Hub model {name} is gated: accept its terms on its Hub page and set HF_TOKEN to a "
                           "token of that account.") from None
    except RepositoryNotFoundError:
        raise StartupError(
            f"there is no Hub model {model_id!r} at {constants.ENDPOINT} (or it is private and HF_TOKEN gives no "
            f"access to it). Check the spelling of TOYGPT_MODEL (or space/model_id.txt); for a local directory give "
            f"its path (e.g. ./{model_id}). It must be {MODEL_HELP}.") from None
    except RevisionNotFoundError:
        raise StartupError(f"the Hub model {model_id!r} has no revision {revision!r}; fix or unset "
                           "TOYGPT_REVISION.") from None
    except RemoteEntryNotFoundError:
        raise StartupError(f"the Hub repo {name} has no config.json, so it is no transformers model; push a ToyGPT "
                           "there with push_to_hub.py, or point TOYGPT_MODEL at another repo.") from None
    except Exception as err:  # the Hub's other errors, and transport errors of whichever HTTP stack it uses
        raise StartupError(
            f"cannot reach the Hub at {constants.ENDPOINT} to load {name} ({type(err).__name__}: {err}). Check the "
            "network (and HF_ENDPOINT); a model downloaded before loads from the local cache "
            f"({constants.HF_HUB_CACHE}) with HF_HUB_OFFLINE=1.", status=1) from None


def has_int8_subfolder(model_id: str, revision: str | None = None) -> bool:
    """Whether the model dir / Hub repo carries the int8 variant in subfolder `int8`."""
    if Path(model_id).is_dir():
        return (Path(model_id) / INT8_SUBFOLDER / "config.json").is_file()
    import huggingface_hub
    from huggingface_hub import constants

    filename = f"{INT8_SUBFOLDER}/config.json"
    if constants.HF_HUB_OFFLINE:  # only the local cache can answer
        return isinstance(huggingface_hub.try_to_load_from_cache(model_id, filename, revision=revision), str)
    try:
        return huggingface_hub.file_exists(model_id, filename, revision=revision)
    except Exception as err:  # the Hub answered for config.json a moment ago (check_hub_model)
        raise StartupError(f"cannot ask the Hub whether {model_id!r} has an int8 variant ({type(err).__name__}: "
                           f"{err}); check the network and re-run, or set TOYGPT_VARIANT=fp32.", status=1) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stale_int8_subfolder(model_dir: str) -> str | None:
    """Why the int8 copy in local `model_dir`/int8 is not one of the fp32 weights beside it, or None.

    quantize.py records the sha256 of the fp32 model.safetensors it read (quantization_report.json, source_sha256);
    int8 dirs from before that record are taken as they are. (On the Hub, push_to_hub.py refuses a stale pair.)"""
    try:
        report = json.loads((Path(model_dir) / INT8_SUBFOLDER / "quantization_report.json").read_text())
    except (OSError, ValueError):
        return None
    recorded = report.get("source_sha256") if isinstance(report, dict) else None
    if not recorded or recorded == sha256_of(Path(model_dir) / "model.safetensors"):
        return None
    return (f"{Path(model_dir) / INT8_SUBFOLDER} was quantized from other weights than {model_dir}/model.safetensors "
            f"holds now; re-create it with `python quantize.py {model_dir} {Path(model_dir) / INT8_SUBFOLDER} "
            "--overwrite`")


def check_tokenizer(tokenizer, model, where: str) -> None:
    """StartupError if the tokenizer cannot serve the model: without tokenizer.json, AutoTokenizer still loads, a
    1-token tokenizer that encodes every prompt to no tokens at all, and every request would then fail."""
    vocab, sample = model.config.vocab_size, EXAMPLES[2]
    ids = tokenizer(sample, verbose=False)["input_ids"]
    if ids and max(ids) < vocab and tokenizer.decode(ids, clean_up_tokenization_spaces=False) == sample:
        return
    raise StartupError(f"the tokenizer in {where!r} has {len(tokenizer)} token(s), the model {vocab}: its "
                       "tokenizer.json is missing or broken. Re-create the model directory with train.py / "
                       "quantize.py (they write the GPT-2 tokenizer files), or push it again with push_to_hub.py.")


def load_model(model_id: str, variant: str = "auto", revision: str | None = None) -> LoadedModel:
    """Load model + tokenizer with the auto classes, from subfolder `int8` when that variant is chosen.

    Every reason the model cannot load is a StartupError (a SystemExit) with one line that says what to fix."""
    if variant not in VARIANTS:
        raise ValueError(f"TOYGPT_VARIANT must be one of {', '.join(VARIANTS)}; got {variant!r}.")
    model_id = check_model_id(model_id, f"the model {model_id!r}")
    local = Path(model_id).is_dir()
    if not local:
        check_hub_model(model_id, revision)
    cuda = torch.cuda.is_available()
    # int8 kernels are a CPU speed-up; on a GPU the fp32 weights are the fast choice.
    want_int8 = variant == "int8" or (variant == "auto" and not cuda)
    subfolder = INT8_SUBFOLDER if want_int8 and has_int8_subfolder(model_id, revision) else ""
    note = ""
    if subfolder and local and (stale := stale_int8_subfolder(model_id)):
        if variant == "auto":  # the int8 copy of older weights is no copy of this model: serve the fp32 weights
            subfolder, note = "", "its int8 copy is stale"
        print(f"warning: {stale}" + ("; serving the fp32 weights." if variant == "auto" else "."), file=sys.stderr)
    # trust_remote_code for the tokenizer too: AutoTokenizer reads config.json, whose auto_map names the remote code.
    kwargs = dict(subfolder=subfolder, revision=revision, trust_remote_code=True)
    transformers_logging.disable_progress_bar()  # its "Loading weights" bar; the line below says what is served
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
    except Exception as err:  # a traceback helps no one here: say what failed and what to do
        where = f"{model_id}/{subfolder}" if subfolder else model_id
        fix = ("it is not a complete model directory; re-create it with train.py / quantize.py" if local else
               "check the network and TOYGPT_MODEL (or space/model_id.txt), and that the repo was pushed with "
               "push_to_hub.py")
        what = " ".join(str(err).split())  # transformers' messages span lines; this one is one line
        raise StartupError(f"could not load the model from {where!r} ({type(err).__name__}: {what}); {fix}.",
                           status=2 if local else 1) from None
    check_tokenizer(tokenizer, model, f"{model_id}/{subfolder}" if subfolder else model_id)
    precision = "int8" if getattr(model.config, "quantization", None) else "fp32"
    if variant != "auto" and precision != variant:
        raise StartupError(
            f"TOYGPT_VARIANT={variant}, but {model_id!r} holds {precision} weights and no {variant} variant; "
            "point TOYGPT_MODEL at the other model dir, or leave TOYGPT_VARIANT unset (auto)."
        )
    device = "cuda" if cuda and precision == "fp32" else "cpu"
    return LoadedModel(model.to(device).eval(), tokenizer, model_id, precision, device, note)


class BatchTextStreamer(TextIteratorStreamer):
    """transformers' TextIteratorStreamer for a batch (it takes batch size 1 only): after each step it queues every
    sequence's new text so far, and iterating yields the newest such list.

    Whole-sequence decoding each step keeps multi-byte characters split over tokens correct once complete.
    """

    def __init__(self, tokenizer, batch_size: int):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        self.token_ids = [[] for _ in range(batch_size)]

    def put(self, value):
        if self.next_tokens_are_prompt:  # generate() hands over the prompt first
            self.next_tokens_are_prompt = False
            return
        for ids, token in zip(self.token_ids, value.reshape(-1).tolist()):
            ids.append(token)
        self.on_finalized_text([self.tokenizer.decode(ids, **self.decode_kwargs) for ids in self.token_ids])

    def end(self):
        self.text_queue.put(self.stop_signal)

    def __iter__(self):
        queue = self.text_queue
        while (texts := queue.get()) is not self.stop_signal:
            while not queue.empty():  # skip snapshots the browser has not had time for
                if (newer := queue.get()) is self.stop_signal:
                    yield texts
                    return
                texts = newer
            yield texts

    @property
    def steps(self) -> int:
        return len(self.token_ids[0])


class StopOnEvent(StoppingCriteria):
    """Ends generation early once the request is gone (Stop button, closed tab, client timeout)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TopKSampler(LogitsProcessor):
    """Samples each next token itself (temperature, then top-k, then top-p among those k) and leaves only that token
    for generate()'s greedy pick. The same distribution as generate()'s own sampling, without its torch.multinomial
    over all 50,257 tokens, which takes about 1 ms a step on a CPU, longer than a tiny model's whole compiled step;
    over the k candidates it takes microseconds."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids, scores):
        k = min(self.top_k, scores.size(-1))
        values, indices = (scores / self.temperature).topk(k, dim=-1)  # (B, k), most likely first
        probs = values.softmax(dim=-1)
        if self.top_p < 1.0:  # the nucleus: tokens until top_p is reached (the first always stays)
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= self.top_p, 0.0)
        choice = indices.gather(-1, torch.multinomial(probs, 1))  # (B, 1)
        return torch.full_like(scores, -float("inf")).scatter_(-1, choice, 0.0)


def sampling_kwargs(temperature: float, top_k: int, top_p: float) -> dict:
    """generate()'s sampling settings: temperature 0 is greedy; with top-k, TopKSampler draws the token."""
    if temperature <= 0:
        return dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    if top_k > 0:
        return dict(do_sample=False, temperature=None, top_k=None, top_p=None,
                    logits_processor=LogitsProcessorList([TopKSampler(temperature, top_k, top_p)]))
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p)


def clamp(value, low, high):
    return max(low, min(high, value))


def generate_stream(loaded: LoadedModel, prompt, max_new_tokens, temperature, top_k, top_p, num_sequences, seed):
    """Yield (texts, status) as tokens arrive: `texts` has one prompt+continuation per sequence.

    Out-of-range values are clamped (the sliders reject them first in the app); temperature 0 means greedy;
    `seed` is a whole number (as text or int) or blank for a random one.
    """
    if not prompt or not prompt.strip():
        yield [], EMPTY_PROMPT_MESSAGE
        return
    num_sequences = int(clamp(int(num_sequences), 1, MAX_SEQUENCES))
    max_new_tokens = int(clamp(int(max_new_tokens), 1, loaded.max_new_tokens))
    temperature = max(0.0, float(temperature))
    top_k = max(0, int(top_k))  # 0 = no top-k filtering
    top_p = clamp(float(top_p), 0.01, 1.0)
    seed = str(seed if seed is not None else "").strip()
    if not seed:
        seed = random.randrange(2**32)
    elif not (seed.isascii() and seed.isdigit()) or int(seed) >= 2**32:
        yield [], f"The seed must be a whole number from 0 to {2**32 - 1}, or blank for a random one; got {seed!r}."
        return
    seed = int(seed)

    notes = []
    cut = len(prompt) > MAX_PROMPT_CHARS
    prompt = prompt[-MAX_PROMPT_CHARS:]
    prompt_ids = loaded.tokenizer(prompt, verbose=False)["input_ids"]  # long ones are cut below
    room = loaded.context - max_new_tokens  # prompt + new tokens must fit the context
    if cut or len(prompt_ids) > room:
        prompt_ids = prompt_ids[-room:]
        prompt = loaded.tokenizer.decode(prompt_ids, clean_up_tokenization_spaces=False)
        notes.append(
            f"⚠️ The prompt was cut to its last {len(prompt_ids)} tokens so that it plus {max_new_tokens} new tokens "
            f"fit the model's {loaded.context}-token context."
        )

    streamer = BatchTextStreamer(loaded.tokenizer, num_sequences)
    stop = threading.Event()
    input_ids = torch.tensor([prompt_ids] * num_sequences, device=loaded.device)
    generate_kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        **sampling_kwargs(temperature, top_k, top_p),
        pad_token_id=loaded.tokenizer.eos_token_id,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
    )
    errors = []

    def run():
        try:
            torch.manual_seed(seed)  # the global generator: CONCURRENCY_LIMIT = 1 keeps this reproducible
            with torch.inference_mode():
                loaded.model.generate(**generate_kwargs)
        except Exception as err:  # surfaced to the user below instead of hanging the stream
            errors.append(err)
            streamer.end()

    start = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    texts = [""] * num_sequences
    try:
        for texts in streamer:
            progress = f"Generating… {streamer.steps}/{max_new_tokens} tokens"
            yield [prompt + text for text in texts], "\n\n".join([progress, *notes])
    finally:
        stop.set()
        thread.join()
    if errors:
        raise gr.Error(f"Generation failed: {errors[0]}")
    seconds = time.perf_counter() - start
    tokens = streamer.steps * num_sequences
    status = (
        f"{loaded.describe()} · last answer: {streamer.steps} tokens × {num_sequences} in {seconds:.2f} s "
        f"= **{tokens / seconds:.1f} tokens/s** · seed {seed}"
    )
    yield [prompt + text for text in texts], "\n\n".join([status, *notes])


def warm_up(loaded: LoadedModel) -> float:
    """One short generation before serving; returns its seconds. The int8 model's generate() compiles its decode step
    on its first call (seconds; inductor caches it on disk, so later starts are quicker): done here, that is no
    visitor's wait, and no status line's tokens/s counts it. Its static cache holds the whole context, as a visitor's
    longest call needs (int8 sizes it per call otherwise, and a longer call would compile again); a batch of another
    size compiles once more, on first use."""
    start = time.perf_counter()
    ids = torch.tensor([loaded.tokenizer(EXAMPLES[1], verbose=False)["input_ids"]], device=loaded.device)
    whole_context = {"max_cache_len": loaded.context} if loaded.precision == "int8" else {}
    with torch.inference_mode():
        loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                              pad_token_id=loaded.tokenizer.eos_token_id, **sampling_kwargs(0.8, 50, 1.0),
                              **whole_context)
    return time.perf_counter() - start


def api_problem(loaded: LoadedModel, max_new_tokens, temperature, top_k, top_p, num_sequences) -> str | None:
    """Why the API's sampling settings are out of range (the UI's sliders enforce the same ranges), or None."""
    limits = [("max_new_tokens", max_new_tokens, 1, loaded.max_new_tokens), ("temperature", temperature, 0.0, 2.0),
              ("top_k", top_k, 0, 200), ("top_p", top_p, 0.05, 1.0), ("num_sequences", num_sequences, 1, MAX_SEQUENCES)]
    for name, value, low, high in limits:
        if not low <= value <= high:
            return f"{name} must be from {low} to {high} (this model's limits), got {value}."
    return None


def build_demo(model_id: str | None = None, variant: str | None = None, revision: str | None = None) -> gr.Blocks:
    """The Gradio app around one loaded model; `model_id=None` picks it as `python app.py` does."""
    variant = variant or os.environ.get("TOYGPT_VARIANT", "auto")
    revision = revision or os.environ.get("TOYGPT_REVISION") or None
    loaded = load_model(model_id or default_model_id(variant), variant, revision)
    print(f"{PROG}: serving {loaded.describe()}", flush=True)  # which model and variant, also for API users' logs
    print(f"{PROG}: warmed up in {warm_up(loaded):.1f} s (int8 on the CPU compiles its decode step then)", flush=True)

    default_new_tokens = min(100, loaded.context // 2)  # leaves half the context for the prompt

    def stream_to_ui(prompt, max_new_tokens, temperature, top_k, top_p, num_sequences, seed):
        for texts, status in generate_stream(
            loaded, prompt, max_new_tokens, temperature, top_k, top_p, num_sequences, seed
        ):
            if not texts:  # the input was refused: say why in a toast too
                gr.Warning(status)
            yield *texts, *[""] * (MAX_SEQUENCES - len(texts)), status

    def generate(prompt: str, max_new_tokens: int = default_new_tokens, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 1.0, num_sequences: int = 1, seed: int | None = None) -> list[str]:
        """Sample `num_sequences` continuations of `prompt`; returns the texts, each the prompt + its continuation.

        temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off; seed None picks a random one. A prompt
        longer than the model's context allows is cut from the left."""
        if problem := api_problem(loaded, max_new_tokens, temperature, top_k, top_p, num_sequences):
            raise gr.Error(problem)
        seed = "" if seed is None else str(seed)
        for texts, status in generate_stream(loaded, prompt, max_new_tokens, temperature, top_k, top_p,
                                             num_sequences, seed):
            if not texts:  # refused: empty prompt, bad seed
                raise gr.Error(status)
        return texts

    with gr.Blocks(title="ToyGPT", analytics_enabled=False) as demo:
        gr.Markdown(
            "# ToyGPT\nA small GPT-2-style language model. Type a prompt and press **Generate**; "
            "the text streams in as it is sampled."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=4, autofocus=True, elem_id="prompt",
                                    placeholder="Type the start of a text here, or pick an example below")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                gr.Examples(EXAMPLES, inputs=prompt, cache_examples=False)
            with gr.Column(scale=2):
                max_new_tokens = gr.Slider(
                    1, loaded.max_new_tokens, value=default_new_tokens, step=1, label="Max new tokens",
                    elem_id="max-new-tokens",
                )
                temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature", info="0 = greedy",
                                        elem_id="temperature")
                top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k", info="0 = off", elem_id="top-k")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", info="1 = off", elem_id="top-p")
                num_sequences = gr.Slider(1, MAX_SEQUENCES, value=1, step=1, label="Number of sequences",
                                          elem_id="num-sequences")
                # A Textbox, not a Number: gradio's Number shows (and sends) 0 when left empty.
                seed = gr.Textbox(value="", label="Seed", placeholder="blank = random", max_lines=1, elem_id="seed")
        with gr.Row():
            outputs = [
                gr.Textbox(
                    label=f"Sequence {i + 1}", lines=12, visible=i == 0, buttons=["copy"], elem_id=f"sequence-{i + 1}"
                )
                for i in range(MAX_SEQUENCES)
            ]
        status = gr.Markdown(f"{loaded.describe()} · ready", elem_id="status")

        num_sequences.change(
            lambda n: [gr.Textbox(visible=i < n) for i in range(MAX_SEQUENCES)],
            inputs=num_sequences,
            outputs=outputs,
            api_visibility="private",
        )
        event = gr.on(  # the UI's streaming handler; API users get /generate below
            [generate_button.click, prompt.submit],
            stream_to_ui,
            inputs=[prompt, max_new_tokens, temperature, top_k, top_p, num_sequences, seed],
            outputs=[*outputs, status],
            api_visibility="private",
            concurrency_limit=CONCURRENCY_LIMIT,
            concurrency_id="generation",
            show_progress="minimal",
        )
        stop_button.click(None, cancels=[event])
        # One generation at a time, UI and API together: the same concurrency group.
        endpoint = gr.api(generate, api_name="generate", concurrency_limit=CONCURRENCY_LIMIT,
                          concurrency_id="generation")
    for block_id in endpoint["outputs"]:  # gr.api labels its result "1st"; view_api() shows this name instead
        demo.blocks[block_id].label = "texts"
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def main() -> int:
    """`python app.py`: serve until stopped. Whatever keeps the app from starting is one line on stderr,
    `app.py: error: <what and how to fix it>`, exit 2 for a bad setting and 1 for a failure at run time."""
    host, port = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), os.environ.get("GRADIO_SERVER_PORT", "7860")
    try:
        variant = os.environ.get("TOYGPT_VARIANT", "auto")  # as build_demo reads it
        if variant not in VARIANTS:
            raise StartupError(f"TOYGPT_VARIANT must be one of {', '.join(VARIANTS)}; got {variant!r} (unset it: "
                               "auto serves int8 on CPU where the model has it).")
        demo = build_demo()
        print(f"{PROG}: starting on http://{host}:{port} (Ctrl+C stops it)", flush=True)
        try:
            demo.launch(server_name=host, server_port=int(port))
        except OSError as err:  # the port is taken, or the host is not this machine's
            raise StartupError(f"cannot serve on {host}:{port} ({err}); set GRADIO_SERVER_PORT to a free port "
                               "(and GRADIO_SERVER_NAME to an address of this machine).", status=1) from None
    except StartupError as err:
        print(f"{PROG}: error: {err.message}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:  # while loading the model (serving, gradio itself handles Ctrl-C)
        print(f"{PROG}: error: interrupted (Ctrl-C) before serving; nothing was changed.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
