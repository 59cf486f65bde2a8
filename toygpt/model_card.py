"""Model cards: every README.md ToyGPT writes, rendered from the structured records a model dir holds.

The records (no card is ever parsed back from its Markdown):
- `config.json`: the architecture;
- `training_args.json` (train.py's config, read as a train_config.TrainingConfig) and the `"final": true` record
  of `metrics.jsonl`: how the model was trained (optimizer, schedule, vocabulary, data and its held-out part, as
  the run used them) and how well it does;
- `quantization_report.json` (quantize.py): the int8 figures measured before/after.

    training_card(config, training_args, final)           train.py: the fp32 model dir's card
    dir_card(read_records(model_dir))                      quantize.py: any model dir's card, from its records
    dir_card(records, repo_id, subfolder="int8")           push_to_hub.py: a variant's card, loaded from the Hub
    hub_card(root_records, repo_id, folders, int8, space, gguf)  push_to_hub.py: the Hub repo's card (fp32, int8, GGUF)

A model dir without training records (convert_gpt2.py output) gets a card from its config alone.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from toygpt import regularization
from toygpt.defaults import EPOCH_RULES
from toygpt.optim import WSD_DECAY_FRACTION
from toygpt.run_log import read_metrics
from toygpt.train_config import TRAINING_ARGS, TrainingConfig

METRICS = "metrics.jsonl"
INT8_REPORT = "quantization_report.json"
TRAINING_RECORDS = (TRAINING_ARGS, METRICS)  # what quantize.py copies so the int8 dir's card stands alone
LOSS_CURVE = "loss_curve.png"
TAGS = ["toygpt", "gpt2", "causal-lm", "text-generation", "custom_code"]
INT8_TAGS = ["int8", "quantized"]
LICENSE = "mit"
INT8_SUBFOLDER = "int8"  # where the int8 variant lives in a Hub repo
LOCAL_REPO = "path/to/this/model"  # the load snippet's placeholder in a local dir's card
GGUF_TYPE = "q8_0"  # the GGUF push_to_hub.py uploads: llama.cpp's 8-bit type, close to the fp32 model's outputs


class Records(NamedTuple):
    """What a model dir records about itself; None where a record is absent."""

    config: dict
    training_args: TrainingConfig | None
    final: dict | None
    int8_report: dict | None
    n_params: int  # of the fp32 model

    @property
    def trained(self) -> bool:
        return self.training_args is not None and self.final is not None


class GgufFile(NamedTuple):
    """The GGUF export in the Hub repo's root: file name, llama.cpp's name of its type (Q8_0), bytes."""

    filename: str
    quant: str
    size: int


def gguf_filename(repo_id: str, out_type: str = GGUF_TYPE) -> str:
    """`<repo name>-Q8_0.gguf`: the Hub and llama.cpp's `-hf USER/REPO:Q8_0` read the type from the file name."""
    return f"{repo_id.split('/')[-1]}-{out_type.upper()}.gguf"


class FolderSizes(NamedTuple):
    """One variant's folder in the Hub repo: bytes of model.safetensors, number of files, bytes of all files."""

    weights: int
    files: int
    total: int


# ----------------------------------------------------------------------------------------------------------------
# Reading the records


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def final_record(path: Path) -> dict | None:
    """The last `"final": true` record of metrics.jsonl (run_log reads it; a line cut short by a kill is skipped)."""
    finals = [r for r in read_metrics(path) if isinstance(r, dict) and r.get("final")]
    return finals[-1] if finals else None


def parameter_count(weights: Path) -> int:
    """Elements of every tensor in a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def read_records(model_dir) -> Records:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    training_args, final = TrainingConfig.load(model_dir), final_record(model_dir / METRICS)
    report = read_json(model_dir / INT8_REPORT)
    if final and "n_params" in final:
        n_params = final["n_params"]
    elif report and "n_params" in report:
        n_params = report["n_params"]
    else:  # an int8 dir counts its scales too; only a dir from before quantization_report.json lands here
        n_params = parameter_count(model_dir / "model.safetensors")
    return Records(config, training_args, final, report, n_params)


# ----------------------------------------------------------------------------------------------------------------
# Cards


def training_card(config: dict, training: TrainingConfig | dict, final: dict) -> ModelCard:
    """The card train.py writes into the fp32 model dir (`training` may be a training_args.json record)."""
    if isinstance(training, dict):
        training = TrainingConfig.from_record(training)
    return dir_card(Records(config, training, final, None, final["n_params"]))


def dir_card(records: Records, repo_id: str | None = None, subfolder: str = "") -> ModelCard:
    """The card of one model dir; its load snippet names `repo_id` (and `subfolder`), else a local placeholder."""
    int8 = bool(records.config.get("quantization"))
    sections = [*description(records, int8=int8), *int8_sections(records),
                usage(repo_id, [(subfolder, int8)])]
    return render(metadata(records.trained, int8, eval_results(records, int8, repo_id)), sections)


def hub_card(records: Records, repo_id: str, folders: dict[str, FolderSizes], int8: Records | None = None,
             space_id: str | None = None, gguf: GgufFile | None = None) -> ModelCard:
    """The Hub repo's card: the fp32 model at the root (`records`), `int8` in INT8_SUBFOLDER, sizes, the Space, and
    the GGUF file beside the weights with its llama.cpp commands."""
    title, *about = description(records, int8=False)
    space = [f"Try it in the browser: [{space_id}](https://huggingface.co/spaces/{space_id})."] if space_id else []
    variants = [("", False)] + ([(INT8_SUBFOLDER, True)] if int8 else [])
    sections = [title, *space, *about, *(int8_sections(int8) if int8 else []), sizes(folders, gguf),
                usage(repo_id, variants), *([gguf_usage(repo_id, gguf)] if gguf else [])]
    return render(metadata(records.trained, int8 is not None, eval_results(records, False, repo_id)), sections)


def metadata(trained: bool, int8: bool, results: tuple[str, list[EvalResult]] | None = None) -> ModelCardData:
    """The card's YAML header; `results` (model name, eval results) become its `model-index`, which the Hub renders
    as the model's evaluation results."""
    model_name, evals = results or (None, None)
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         license=LICENSE if trained else None, tags=TAGS + (INT8_TAGS if int8 else []),
                         model_name=model_name, eval_results=evals or None)


# The figures of one evaluation, as model-index metrics: (metric type, name, record key).
EVAL_METRICS = (("loss", "validation loss (nats/token)", "val_loss"),
                ("perplexity", "validation perplexity", "val_perplexity"),
                ("bits_per_character", "validation bits per character", "val_bits_per_char"))


def eval_dataset(run: TrainingConfig) -> dict:
    """The data set the figures are on, as model-index names it: a Hub dataset by its id (split and commit), any
    other text by its description, split 'validation' (the held-out part held_out() describes)."""
    source = (run.data.source if run.data else None) or {}
    if source.get("dataset"):
        split = "validation"  # its validation split, or the CRC-32 tenth of its rows (held_out() says which)
        return dict(dataset_type=source["dataset"], dataset_name=source["dataset"], dataset_split=split,
                    dataset_config=source.get("dataset_config"), dataset_revision=source.get("dataset_revision"))
    return dict(dataset_type="text", dataset_name=data_description(run).strip("`"), dataset_split="validation")


def eval_results(records: Records, int8: bool, repo_id: str | None) -> tuple[str, list[EvalResult]] | None:
    """model-index results of a trained model: the fp32 model's final evaluation; for an int8 dir, the int8
    figures quantize.py measured and the fp32 ones beside them, on the same windows."""
    if not records.trained:
        return None
    dataset = eval_dataset(records.training_args)
    measured = [("", records.final)]
    if int8 and records.int8_report and records.int8_report.get("eval"):
        measured = [("", records.int8_report["after"]), (" (fp32 model)", records.int8_report["before"])]
    results = [EvalResult(task_type="text-generation", task_name="Language modeling", metric_type=kind,
                          metric_name=name + label, metric_value=round(figures[key], 4), **dataset)
               for label, figures in measured for kind, name, key in EVAL_METRICS if figures.get(key) is not None]
    return (repo_id or "toygpt") + (" (int8)" if int8 else ""), results


def render(data: ModelCardData, sections: list[str]) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(s.strip() + "\n" for s in sections))


# ----------------------------------------------------------------------------------------------------------------
# Sections


def description(records: Records, int8: bool) -> list[str]:
    """Title, architecture and, for a model train.py wrote, its data, training and results."""
    run, final = records.training_args, records.final
    size = f"{records.n_params / 1e6:.1f}M parameters" + (", int8" if int8 else "")
    if not records.trained:
        return [f"# ToyGPT ({size})\n\nA ToyGPT model packaged as transformers remote code "
                "(`trust_remote_code=True`).", architecture(records)]
    return [
        f"# ToyGPT ({run.preset} preset, {size})\n\nA small GPT-2-style language model {origin(run)} "
        "with `train.py`, packaged as a transformers remote-code model (`trust_remote_code=True`).",
        architecture(records),
        f"## Training data\n\n{data_description(run)}. {held_out(run)}",
        training(records.config, run, final),
        results(final),
    ]


def origin(run: TrainingConfig) -> str:
    """How the training started: from scratch, or from the checkpoint train.py --init-from names."""
    if not run.init_from:
        return "trained from scratch"
    revision = run.start.revision if run.start else None
    commit = f" (commit {revision[:12]})" if revision else ""
    return f"fine-tuned from `{run.init_from}`{commit}"


def data_description(run: TrainingConfig) -> str:
    if run.data and run.data.description:
        return run.data.description
    return f"`{Path(run.data.input_path).name}`" if run.data and run.data.input_path else "The training text"


def held_out(run: TrainingConfig) -> str:
    """What validation read, never trained on: recorded by the run, else what its kind of source holds out."""
    kind = run.data.fingerprint.get("type") if run.data and run.data.fingerprint else "file"
    if run.data and run.data.holdout:
        part = run.data.holdout
    elif kind == "text_files":
        part = "the last 10% of each file's characters"
    elif kind in ("hub_dataset", "dataset_dir"):
        part = "its 'validation' split if it has one, else the rows whose text has CRC-32 % 10 == 0"
    else:
        part = "the last 10% of its characters"
    return f"Validation used {part}, never trained on; training used the rest."


def architecture(records: Records) -> str:
    c = records.config
    tied = "LM head tied to the token embedding" if c.get("tie_word_embeddings", True) else "separate LM head"
    return f"""## Architecture

GPT-2 decoder as nanoGPT writes it: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']}-dim embeddings,
context {c['block_size']} tokens, learned positions, pre-LayerNorm, GELU MLP (4x), dropout {c.get('dropout', 0.0)},
{tied}. Tokenizer: GPT-2 BPE ({c['vocab_size']} tokens). {records.n_params:,} parameters."""


def optimizer_text(run: TrainingConfig) -> str:
    if run.weight_decay is None:  # the run ended before the epochs rule chose: it trained at the rule's first value
        first = regularization.first_value(EPOCH_RULES["weight_decay"])
        value = f"{first:g} (the epochs rule's first; the run ended before it chose)"
    else:
        value = f"{run.weight_decay:g}"
    decay = f"weight decay {value} on matrices and embeddings"
    if run.optimizer == "muon":
        return (f"Muon (orthogonalised momentum, AdamW-matched update size) for the blocks' weight matrices and AdamW "
                f"(betas 0.9/0.95) for the embeddings, gains and biases, {decay}")
    return f"AdamW (betas 0.9/0.95), {decay}"


def schedule_text(run: TrainingConfig) -> str:
    lrs = f"peak LR {run.lr:g}" + (f" (tied embedding {run.embedding_lr:g})"
                                   if run.embedding_lr is not None and run.embedding_lr != run.lr else "")
    if run.schedule == "wsd":
        return (f"{lrs}, warmup-stable-decay: {run.warmup_steps} warmup steps, constant, then cosine decay to "
                f"{run.min_lr:g} over the last {WSD_DECAY_FRACTION:.0%} of the steps")
    return f"{lrs} with {run.warmup_steps} warmup steps and cosine decay to {run.min_lr:g}"


def vocabulary_text(run: TrainingConfig, vocab_size: int) -> str:
    used = run.vocab_used or (run.vocab if run.vocab in ("corpus", "full") else None)
    if used == "corpus":
        return (f"Vocabulary: the corpus vocabulary (the rows of the token ids the training split uses, plus one "
                f"shared row for the rest; exact), saved as the full {vocab_size:,} rows")
    if used == "full":
        return f"Vocabulary: all {vocab_size:,} rows trained"
    return f"Vocabulary: --vocab {run.vocab or 'auto'} (the choice it made was not recorded)"


def training(config: dict, run: TrainingConfig, final: dict) -> str:
    text = (f"{optimizer_text(run)}; {schedule_text(run)}; gradient clipping {run.grad_clip:g}. "
            f"{vocabulary_text(run, config['vocab_size'])}. Batch {run.batch_size} x {run.grad_accum} accumulation x "
            f"{final['world_size']} process(es) of {config['block_size']} tokens, seed {run.seed}. {final['step']} "
            f"optimizer steps, {final['tokens_seen']:,} training tokens, {final['elapsed_s'] / 60:.1f} minutes on "
            f"{final['device']}.")
    return "## Training\n\n" + textwrap.fill(text, width=116, break_on_hyphens=False)


def results(final: dict) -> str:
    return f"""## Results

| metric | value | unit |
|---|---|---|
| validation loss | {final['val_loss']:.4f} | nats/token |
| validation perplexity | {final['val_perplexity']:.2f} | |
| validation bits per character | {final['val_bits_per_char']:.4f} | bits/char |
| final training loss | {final['train_loss']:.4f} | nats/token |
{saved_weights(final)}
![loss curve]({LOSS_CURVE})"""


def saved_weights(final: dict) -> str:
    """Which step's weights the model is, where train.py kept the best eval's (--keep-best)."""
    average = (f" an exponential moving average of the trained weights (decay {final['ema_decay']:g}), as it was at"
               if final.get("ema_decay") else "")
    if "best_step" not in final:
        return f"\nThe weights are{average} the last step.\n" if average else ""
    return (f"\nThe weights are{average or ' those of'} step {final['best_step']}, the eval with the lowest validation "
            f"loss (the figures above); the last step's{' average' if average else ' weights'} (step {final['step']}) "
            f"scored a validation loss of {final['last_val_loss']:.4f}.\n")


def int8_sections(records: Records) -> list[str]:
    """The int8 section: quantize.py's measured figures, or the scheme alone where none were recorded."""
    report = records.int8_report
    if report is None:
        scheme = records.config.get("quantization")
        if not scheme:
            return []
        return [f"## int8 quantized variant\n\nWeights quantized by quantize.py: `{json.dumps(scheme)}`."]
    before, after = report["before"], report["after"]

    def row(label, fp32, int8, spec, compare):
        cells = ["n/a" if value is None else format(value, spec) for value in (fp32, int8)]
        return f"| {label} | {cells[0]} | {cells[1]} | {'n/a' if None in (fp32, int8) else compare(fp32, int8)} |"

    table = "\n".join([
        "| | fp32 | int8 | int8 / fp32 |", "|---|---|---|---|",
        row("model.safetensors (MB)", report["size_fp32"] / 1e6, report["size_int8"] / 1e6, ".1f",
            lambda a, b: f"{b / a:.3f}x"),
        row("validation loss (nats/token)", before["val_loss"], after["val_loss"], ".4f",
            lambda a, b: f"{100 * (b / a - 1):+.2f}%"),
        row("greedy tokens/s (batch 1, KV cache)", before["tokens_per_s"], after["tokens_per_s"], ".1f",
            lambda a, b: f"{b / a:.2f}x"),
    ])
    evaluated = report.get("eval")
    if evaluated:
        eval_note = (f"Validation loss: mean over the first {evaluated['windows']} windows of "
                     f"{evaluated['window_tokens']} tokens of the held-out last 10% of `{evaluated['text']}`, "
                     "never trained on.")
    else:
        eval_note = "Validation loss skipped: no corpus given (pass --eval-input PATH)."
    if report["speed_tokens"]:
        speed_note = (f"Tokens/s: {report['speed_tokens']} new tokens, {report['threads']} CPU thread(s), measured "
                      "by quantize.py on the machine that ran it.")
    else:
        speed_note = "Tokens/s not measured (--speed-tokens 0)."
    sha256 = report.get("source_sha256")  # absent in dirs quantized before it was recorded
    source_note = f"\n\nQuantized from the fp32 `model.safetensors` with sha256 `{sha256}`." if sha256 else ""
    return [f"""## int8 quantized variant

Produced by `python quantize.py {report['source']} <out>` from the fp32 model: the weights of every Linear layer, of
the token embedding (shared with the tied LM head, stored once) and of the position embedding are int8 with one fp16
scale per 32 weights of a row (symmetric, llama.cpp's q8_0 rounding); LayerNorms and biases stay fp32. Activations
are rounded per token at run time (dynamic, no calibration data). The int8 matrix products run on a small C kernel
that `int8_toygpt.py` compiles on first use with the C++ compiler PyTorch's inductor uses (int8 kernel used here:
`{report['kernel']}`); without a compiler the weights are dequantized to fp32 at load, with a warning. Weights are in
`model.safetensors` (int8 tensors + fp16 scales; no pickle), the scheme in `config.json` under `quantization`.{source_note}

{table}

{eval_note} {speed_note}

It loads exactly like the fp32 model; generation, the KV cache, the tokenizer and pipelines work the same."""]


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def sizes(folders: dict[str, FolderSizes], gguf: GgufFile | None = None) -> str:
    """The Hub repo's variants: "" is the fp32 root, INT8_SUBFOLDER the int8 copy, and the GGUF file."""
    fp32 = folders[""].weights
    rows = []
    for subfolder, folder in folders.items():
        name, ratio = ("int8", f" ({folder.weights / fp32:.2f}x fp32)") if subfolder else ("fp32", "")
        rows.append(f"| {name} | `{subfolder}/` | {human_size(folder.weights)}{ratio} | {folder.files} | "
                    f"{human_size(folder.total)} |")
    if gguf:
        rows.append(f"| GGUF {gguf.quant} (llama.cpp) | `{gguf.filename}` | {human_size(gguf.size)} "
                    f"({gguf.size / fp32:.2f}x fp32) | 1 | {human_size(gguf.size)} |")
    return ("## Files and sizes\n\n| variant | folder | weights (model.safetensors) | files | total |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


def usage(repo_id: str | None, variants: list[tuple[str, bool]]) -> str:
    """A load snippet: one line per (subfolder, int8) variant; a local placeholder where repo_id is None."""
    where = f'"{repo_id}"' if repo_id else f'"{LOCAL_REPO}"  # this directory, or the Hub repo id it was pushed to'
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "", f"repo = {where}",
             "tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)  # else it asks before "
             "reading config.json"]
    for subfolder, int8 in variants:
        name = "model_int8" if int8 and len(variants) > 1 else "model"
        arg = f', subfolder="{subfolder}"' if subfolder else ""
        comment = "int8 weights, int8 CPU kernels" if int8 else "fp32"
        lines.append(f"{name} = AutoModelForCausalLM.from_pretrained(repo{arg}, trust_remote_code=True)  # {comment}")
    lines += ['inputs = tokenizer("ROMEO:", return_tensors="pt")',
              "output = model.generate(**inputs, max_new_tokens=100)  # samples with top-k 50 (generation_config.json)",
              "print(tokenizer.decode(output[0]))", "```"]
    return "## Usage\n\n" + "\n".join(lines)


def gguf_usage(repo_id: str, gguf: GgufFile) -> str:
    """How to run the GGUF file: llama.cpp straight from the Hub, a downloaded copy, Ollama."""
    return f"""## GGUF: llama.cpp, Ollama, LM Studio

`{gguf.filename}` is this model in llama.cpp's GPT-2 architecture, {gguf.quant} weights and the tokenizer in one file
(`python convert_gpt2.py to-gguf DIR OUT.gguf --type {gguf.quant.lower()}` in the ToyGPT repo writes it). It continues
text; it has no chat template. With the shipped sampling (top-k 50, temperature 1):

```bash
llama-completion -hf {repo_id}:{gguf.quant} -no-cnv -p "ROMEO:" -n 100 --top-k 50 --temp 1.0  # fetches it from the Hub
llama-completion -m {gguf.filename} -no-cnv -p "ROMEO:" -n 100 --top-k 50 --temp 1.0          # a downloaded copy
ollama run hf.co/{repo_id}:{gguf.quant}
```"""
