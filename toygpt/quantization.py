"""fp32 ToyGPT model dir -> int8 model dir: quantizing, measuring before/after, the report, and the record of which
fp32 weights an int8 dir came from.

Weights of every Linear, of the tied token embedding / lm_head and of the position embedding become int8 with one
fp16 scale per 32 weights of a row (q8_0's rounding); activations are rounded at run time, per token (no calibration
data). Quality is measured as llama.cpp measures
it (LogitQuality: mean KLD, same top token, PPL ratio over kld_chunks), one implementation for bench and tests. The int8 dir is a complete model directory (safetensors
only, config.quantization records the scheme) that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
loads as an int8 model. The measured figures (size, val loss, tokens/s before and after) and the sha256 of the source
model.safetensors go to quantization_report.json, beside the source's training records; toygpt/model_card.py renders
README.md from them. The int8 modules and kernels a loaded model runs on live in int8_toygpt.py (remote code).
"""

from __future__ import annotations

import copy
import fcntl
import inspect
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from int8_toygpt import GROUP_SIZE, INT8_SCHEME, Int8Rows, compile_allowed, int8_kernel, static_cache_length
from modeling_toygpt import ToyGPTForCausalLM
from toygpt import model_card, progress
from toygpt.dataset_source import file_sha256
from toygpt.errors import UsageError
from toygpt.evaluation import evaluate, validation_windows
from toygpt.model_dir import OutputDir, check_model_dir, load_fp32_model, write_model_files
from toygpt.training_loss import CausalLMLoss

SPEED_PROMPT = "ROMEO:\nIs the day so young?"
SOURCE_SHA256 = "source_sha256"  # quantization_report.json: sha256 of the fp32 model.safetensors it was made from


class QuantizeError(UsageError):
    """Bad input to quantizing: the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Quantizing


def quantize_rows(weight):
    """Symmetric per-row int8 (int8 dirs of versions 1 and 2): (q (R, K) int8, scale (R,) fp32), weight ~= q * scale."""
    scale = (weight.detach().float().abs().amax(dim=1) / 127).clamp(min=1e-12)  # an all-zero row takes any scale
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_groups(weight, group=GROUP_SIZE):
    """Symmetric int8 with one fp16 scale per `group` columns of a row (llama.cpp's q8_0): (q (R, K) int8,
    scale (R, ceil(K / group)) fp16), weight ~= q * scale repeated over each group. The scale is rounded to fp16
    before the weights are divided by it, so the stored pair reproduces what was rounded."""
    w = weight.detach().float()
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w, (0, -cols % group)).view(rows, -1, group)
    # 2**-24: fp16's smallest step; a group whose weights are all below it is stored as zeros
    scale = (padded.abs().amax(dim=2) / 127).clamp(min=2**-24).half()
    q = torch.round(padded / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(rows, -1)[:, :cols].contiguous(), scale


ROW_SCALED_SCHEME = {"method": INT8_SCHEME["method"], "version": 2}  # what quantize.py wrote before version 3


def quantize_int8(model, group_size: int | None = GROUP_SIZE):
    """An int8 copy of an fp32 ToyGPTForCausalLM: int8 weights + scales, everything else copied in fp32.
    group_size=None writes the version-2 layout instead (one scale per row, fp32 positions): what int8 dirs of
    earlier releases hold, for measuring the two against each other and testing that such dirs still load."""
    if group_size not in (None, GROUP_SIZE):
        raise ValueError(f"group_size {group_size}: the int8 runtime computes with {GROUP_SIZE} weights per scale")
    config = copy.deepcopy(model.config)
    config.quantization = copy.deepcopy(INT8_SCHEME if group_size else ROW_SCALED_SCHEME)
    quantize = quantize_groups if group_size else quantize_rows
    with torch.device("meta"):  # no throwaway fp32 init: every tensor is assigned below
        qmodel = ToyGPTForCausalLM(config)
    int8_modules = {name for name, module in qmodel.named_modules() if isinstance(module, Int8Rows)}
    wanted = set(qmodel.state_dict())
    state = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in int8_modules and leaf == "weight":
            state[name], state[module_name + ".weight_scale"] = quantize(tensor)
        elif name in wanted:  # lm_head.weight is not: the int8 head reads wte's rows
            state[name] = tensor.detach().float().clone()
    qmodel.load_state_dict(state, strict=True, assign=True)
    qmodel.generation_config = copy.deepcopy(model.generation_config)
    return qmodel.eval()


# ----------------------------------------------------------------------------------------------------------------
# The source: its weights, who is writing it, which weights an int8 dir came from


def check_not_being_written(src: Path) -> None:
    """QuantizeError if a command holds SRC's OutputDir lock (`.SRC.lock`, toygpt/model_dir.py): a train.py run
    writing SRC would replace the weights right after we read them, leaving an int8 copy of the old ones."""
    src = Path(src).absolute()
    try:
        fd = os.open(src.with_name(f".{src.name}.lock"), os.O_RDONLY)
    except OSError:  # no lock file: nobody is writing SRC
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)  # free: a lock file a killed run left behind
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        raise QuantizeError(f"{src} is being written by another run ({holder}); wait for it to finish, then "
                            "quantize the model it wrote.") from None
    finally:
        os.close(fd)


def _stamp(path: Path):
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def load_source(src: Path) -> tuple[ToyGPTForCausalLM, str]:
    """The fp32 model in SRC and the sha256 of the model.safetensors it was loaded from.

    QuantizeError if SRC is being written, or if model.safetensors was replaced while we read it (model dirs are
    replaced by an atomic swap, which gives the path a new inode)."""
    check_not_being_written(src)
    weights = Path(src) / "model.safetensors"
    stamp = _stamp(weights) if weights.is_file() else None
    model = load_fp32_model(Path(src), "pass the fp32 model dir it came from (the output of train.py or convert_gpt2.py).")
    sha256 = file_sha256(weights)
    if _stamp(weights) != stamp:
        raise QuantizeError(f"{weights} was replaced while it was being read (a train.py run saving into {src}?); "
                            "re-run quantize.py once that run has finished.")
    return model, sha256


def recorded_source(int8_dir) -> str | None:
    """The sha256 of the fp32 model.safetensors that `int8_dir` was made from; None where it is not recorded (dirs
    written before quantize.py recorded it)."""
    report = model_card.read_json(Path(int8_dir) / model_card.INT8_REPORT)
    return report.get(SOURCE_SHA256) if isinstance(report, dict) else None


def stale_int8(model_dir, int8_dir) -> str | None:
    """Why `int8_dir` is not an int8 copy of the weights in `model_dir` now (one sentence with the fix), or None:
    it is one, or it does not record its source (dirs from before the record still pair, unchecked)."""
    recorded = recorded_source(int8_dir)
    if recorded is None:
        return None
    current = file_sha256(Path(model_dir) / "model.safetensors")
    if current == recorded:
        return None
    return (f"{int8_dir} was quantized from other weights than {Path(model_dir) / 'model.safetensors'} holds now "
            f"(sha256 {recorded[:12]}… then, {current[:12]}… now: the model was retrained or replaced since). "
            f"Quantize it again: `python quantize.py {model_dir} {int8_dir} --overwrite`.")


def training_input(src: Path) -> str | None:
    """The text file train.py recorded for SRC (training_args.json), if it still exists."""
    try:
        recorded = json.loads((Path(src) / "training_args.json").read_text()).get("input_path")
    except (OSError, ValueError):
        return None
    return recorded if recorded and Path(recorded).is_file() else None


def held_out_windows(eval_input, block_size: int, eval_batches, batch_size: int, src: Path | None = None):
    """The validation windows of eval_input (evaluation.validation_windows: train.py's validation loss), or None:
    eval_batches x batch_size of them if given, else those the run that wrote `src` evaluated on."""
    if eval_input is None:
        return None
    if eval_batches is None and src is not None:  # the subset the run stated (None: the whole split)
        try:
            run = json.loads((Path(src) / "training_args.json").read_text())
            eval_batches, batch_size = run.get("eval_batches"), run.get("batch_size")
        except (OSError, ValueError, AttributeError):
            pass
    try:
        return validation_windows(eval_input, block_size, eval_batches, batch_size)
    except (OSError, ValueError) as err:
        raise QuantizeError(f"--eval-input {eval_input}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Quality as llama.cpp measures it (`llama-perplexity --kl-divergence`): the held-out text cut into chunks of n_ctx
# tokens, each evaluated from scratch, the second half of each chunk scored against the reference model's logits.

KLD_CONTEXT = 256


def kld_chunks(source, n_ctx: int = KLD_CONTEXT) -> torch.Tensor:
    """(chunks, n_ctx) token ids: the held-out split of `source` (a text file or a sources.resolve_source source) cut
    into consecutive chunks of n_ctx tokens, as llama-perplexity cuts its text."""
    return validation_windows(source, n_ctx - 1).windows


def scored(chunks: torch.Tensor) -> tuple[slice, torch.Tensor]:
    """The positions llama-perplexity scores in each chunk (first = n_ctx/2 .. n_ctx-2, each predicting the next
    token) and those next tokens, flattened: (chunks * (n_ctx/2 - 1),)."""
    n_ctx = chunks.shape[1]
    positions = slice(n_ctx // 2, n_ctx - 1)
    return positions, chunks[:, n_ctx // 2 + 1:].reshape(-1)


class LogitQuality:
    """Mean KLD(reference || other), same top token and PPL(other)/PPL(reference) over scored positions, accumulated
    batch by batch: the numbers `llama-perplexity --kl-divergence` prints (Mean KLD, Same top p, Mean PPL(Q)/PPL(base)).

    `other` is either full logits (exact), or only its top-k token ids and log-probabilities (llama.cpp's server
    returns no more): then the tokens outside the top-k form one remainder bucket on both sides, so the KLD is a
    lower bound of the exact one (merging outcomes never raises a KLD), and a target outside the top-k is charged the
    whole remainder's probability (an upper bound of its own), so the PPL ratio is left out (None) unless every target
    was in the top-k; `outside_top_k` is the share of such targets, `remainder_mass` other's mean probability outside
    its top-k."""

    def __init__(self):
        self.sums = torch.zeros(6, dtype=torch.float64)  # kld, same top, nll ref, nll other, outside top-k, remainder
        self.positions = 0

    @torch.no_grad()
    def add(self, reference_logits, targets, other_logits=None, other_top=None) -> None:
        ref = torch.log_softmax(reference_logits.double(), dim=-1)  # (N, V)
        rows = torch.arange(len(targets))
        nll_ref = -ref[rows, targets]
        outside = remainder = torch.zeros(len(targets), dtype=torch.float64)
        if other_logits is not None:
            other = torch.log_softmax(other_logits.double(), dim=-1)
            kld = (ref.exp() * (ref - other)).sum(-1)
            top = other.argmax(-1)
            nll_other = -other[rows, targets]
        else:
            ids, logq = other_top[0].long(), other_top[1].double()  # (N, k), best first
            logp = ref.gather(1, ids)
            p_rest = (1 - logp.exp().sum(-1)).clamp(min=1e-12)
            remainder = (1 - logq.exp().sum(-1)).clamp(min=1e-12)
            kld = (logp.exp() * (logp - logq)).sum(-1) + p_rest * (p_rest.log() - remainder.log())
            top = ids[:, 0]
            hit = ids == targets[:, None]
            outside = (~hit.any(-1)).double()
            nll_other = -torch.where(hit.any(-1), (logq * hit).sum(-1), remainder.log())
        same = (top == ref.argmax(-1)).double()
        for i, term in enumerate((kld, same, nll_ref, nll_other, outside, remainder)):
            self.sums[i] += term.sum()
        self.positions += len(targets)

    def figures(self) -> dict:
        kld, same, nll_ref, nll_other, outside, remainder = (self.sums / max(self.positions, 1)).tolist()
        exact_ppl = outside == 0  # a target outside the top-k has no probability of its own: no PPL then
        return {"mean_kld": kld, "same_top": same, "ppl_ratio": math.exp(nll_other - nll_ref) if exact_ppl else None,
                "ppl_reference": math.exp(nll_ref), "ppl": math.exp(nll_other) if exact_ppl else None, "positions": self.positions,
                "outside_top_k": outside, "remainder_mass": remainder}


@torch.no_grad()
def scored_logits(model, chunks: torch.Tensor, batch_size: int = 4):
    """(logits (n, V), targets (n,)) at the scored positions of `chunks`, batch_size chunks at a time."""
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        positions, targets = scored(batch)
        logits = model(batch).logits[:, positions].float()
        yield logits.reshape(-1, logits.shape[-1]), targets


def logit_quality(reference, others: dict, chunks: torch.Tensor, batch_size: int = 4) -> dict:
    """{name: LogitQuality.figures()} of each model in `others` against `reference` over `chunks` (kld_chunks)."""
    quality = {name: LogitQuality() for name in others}
    batches = {name: scored_logits(model, chunks, batch_size) for name, model in others.items()}
    for ref_logits, targets in scored_logits(reference, chunks, batch_size):
        for name, batch in batches.items():
            quality[name].add(ref_logits, targets, other_logits=next(batch)[0])
    return {name: q.figures() for name, q in quality.items()}


# ----------------------------------------------------------------------------------------------------------------
# Measuring and the report


class NoEndOfText(LogitsProcessor):
    """<|endoftext|> never wins, so a timed generation runs its full length (llama.cpp's ignore_eos). transformers'
    min_new_tokens does the same but builds a vocabulary-sized mask every step (~0.5 ms, most of a tiny int8 model's
    token), which would be timed as decode."""

    def __init__(self, end_of_text_id: int):
        self.end_of_text_id = end_of_text_id

    def __call__(self, input_ids, scores):
        scores[:, self.end_of_text_id] = -float("inf")
        return scores


# LogitsProcessorList reads each processor's signature every step: stored, it is not worked out again (~10 us)
NoEndOfText.__call__.__signature__ = inspect.signature(NoEndOfText.__call__)


@torch.no_grad()
def greedy_tokens_per_second(model, new_tokens: int, prompt: str = SPEED_PROMPT, label: str = "") -> float:
    """Batch-1 greedy generation with the KV cache; EOS is not allowed to stop it early."""
    from toygpt import bpe

    ids = torch.tensor([bpe.encode(prompt)])
    new_tokens = min(new_tokens, model.config.block_size - ids.shape[1])
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, pad_token_id=bpe.EOT_ID,
                  logits_processor=LogitsProcessorList([NoEndOfText(bpe.EOT_ID)]))
    # Warm-up: int8 packing, allocator; the int8 model's generate() compiles its decode step here (seconds the first
    # time, then in inductor's on-disk cache, so the app this model is served in next starts quicker), never timed.
    what, warm_up = "", {**kwargs, "max_new_tokens": 2}
    if compiles_decode(model):  # its static cache as large as the timed call's: the same graph, no compile timed
        what = " (compiles the decode step)"
        warm_up["max_cache_len"] = static_cache_length(model.config.block_size, model.generation_config, kwargs, ids)
    with progress.bar(total=1, desc=f"{label} warm-up{what}", unit="run") as bar:
        model.generate(ids, **warm_up)
        bar.update(1)
    with progress.bar(total=new_tokens, desc=f"{label} tokens/s", unit="token") as bar:
        start = time.perf_counter()
        out = model.generate(ids, streamer=TokenCounter(bar), **kwargs)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def compiles_decode(model) -> bool:
    """Whether generate() compiles its decode step: the int8 model, unless TOYGPT_INT8_COMPILE=0."""
    return bool(model.config.quantization) and compile_allowed()


class TokenCounter(BaseStreamer):
    """generate()'s streamer hook as a progress bar: one tick per new token (the prompt comes first, uncounted)."""

    def __init__(self, bar):
        self.bar, self.prompt_seen = bar, False

    def put(self, value):
        if self.prompt_seen:
            self.bar.update(value.numel())
        self.prompt_seen = True

    def end(self):
        pass


def measure(model, val, batch_size: int, speed_tokens: int, label: str) -> dict:
    """tokens/s and the validation figures (loss, perplexity, bits/char; None without a corpus), with progress bars."""
    speed = greedy_tokens_per_second(model, speed_tokens, label=label) if speed_tokens else None
    figures = {"tokens_per_s": speed, "val_loss": None, "val_perplexity": None, "val_bits_per_char": None}
    if val is not None:
        batches = -(-len(val.windows) // batch_size)
        with progress.bar(total=batches, desc=f"{label} val loss", unit="batch") as bar:
            figures.update(evaluate(CausalLMLoss(model), val, batch_size, progress=bar))
    return figures


def quantization_report(src: Path, source_sha256: str, sizes: dict, before: dict, after: dict, eval_input, val,
                        speed_tokens: int) -> dict:
    """The measured figures as quantization_report.json records them; toygpt/model_card.py renders the card from it."""
    evaluated = None if val is None else {  # None: no corpus, val loss not measured
        "text": Path(eval_input).name, "windows": len(val.windows), "window_tokens": val.windows.shape[1] - 1}
    return {
        "source": src.name, SOURCE_SHA256: source_sha256,
        "n_params": model_card.parameter_count(src / "model.safetensors"),
        "size_fp32": sizes["fp32"], "size_int8": sizes["int8"], "before": before, "after": after, "eval": evaluated,
        "kernel": int8_kernel(grouped=True).name, "threads": torch.get_num_threads(), "speed_tokens": speed_tokens,
    }


def write_card(src: Path, out: Path, report: dict) -> None:
    """The report, SRC's training records and plots (OUT's card stands alone), and README.md rendered from them."""
    (out / model_card.INT8_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    for path in [*(src / name for name in model_card.TRAINING_RECORDS), *src.glob("*.png")]:
        if path.is_file():
            shutil.copy2(path, out / path.name)
    model_card.dir_card(model_card.read_records(out)).save(str(out / "README.md"))


@torch.no_grad()
def check_written(directory: Path, int8) -> None:
    """Reload the written dir and compare logits with the in-memory int8 model: never ship a dir that loads wrong."""
    reloaded, info = ToyGPTForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    ids = torch.arange(min(16, int8.config.block_size))[None] * 997 % int8.config.vocab_size
    if problems or not torch.equal(reloaded(ids).logits, int8(ids).logits):
        raise RuntimeError(f"the written int8 model does not reload identically ({problems or 'logits differ'}).")


# ----------------------------------------------------------------------------------------------------------------
# The whole step


def quantize_dir(src, out, overwrite=False, eval_input=None, eval_batches=None, batch_size=8, speed_tokens=128,
                 log=print) -> dict:
    """Write the int8 version of model dir `src` to `out` (atomically); return the measured figures.

    `out` is claimed first (model_dir.OutputDir: never an input, replaced only with overwrite and only if this project
    wrote it, locked). Val loss is measured on eval_batches x batch_size held-out windows of eval_input (if None: the
    windows train.py's validation loss read, held_out_windows); eval_input None means the text train.py recorded for `src`, where it still exists."""
    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise QuantizeError(f"OUT_DIR {out} is SRC_DIR itself; write the int8 model to a new directory.")
    # transformers' own "Loading weights"/"Writing model shards" bars off: quantize.py reports each phase itself
    with progress.quiet_library_bars(), \
            OutputDir(out, inputs=[src, eval_input], replace=overwrite, flag="OUT_DIR", log=log) as output:
        fp32, source_sha256 = load_source(src)
        if eval_input is None:
            eval_input = training_input(src)
            if eval_input is not None:
                log(f"quantize: evaluating on the held-out split of {eval_input} (from training_args.json)")
                output.refuse_inputs([eval_input])
        val = held_out_windows(eval_input, fp32.config.block_size, eval_batches, batch_size, src)

        before = measure(fp32, val, batch_size, speed_tokens, label="fp32")
        int8 = quantize_int8(fp32)
        del fp32  # the int8 copy owns everything it needs
        after = measure(int8, val, batch_size, speed_tokens, label="int8")

        with output.write() as tmp:
            write_model_files(int8, tmp)
            sizes = {"fp32": (src / "model.safetensors").stat().st_size,
                     "int8": (tmp / "model.safetensors").stat().st_size}
            report = quantization_report(src, source_sha256, sizes, before, after, eval_input, val, speed_tokens)
            write_card(src, tmp, report)
            check_written(tmp, int8)
    return {"size_fp32": sizes["fp32"], "size_int8": sizes["int8"], "before": before, "after": after,
            SOURCE_SHA256: source_sha256}
