"""Quantize a ToyGPT model dir to int8: `python quantize.py SRC_DIR OUT_DIR [--overwrite] [--eval-input PATH]`.

Weights of every Linear and of the tied token embedding / lm_head become int8 with one fp32 scale per output row;
activations are quantized at run time (no calibration data). OUT_DIR is a complete model directory (safetensors
only, config.quantization records the scheme) that `AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True)` loads as an int8 model; its README.md adds an int8 section (size, val loss, tokens/s)
to SRC's model card. The scheme and the kernels live in modeling_toygpt.py, which travels with the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData

from model_dir import ModelDirError, atomic_dir, check_model_dir, write_model_files
from modeling_toygpt import ToyGPTForCausalLM, int8_kernel, quantize_int8

SPEED_PROMPT = "ROMEO:\nIs the day so young?"


class QuantizeError(ValueError):
    """Bad input to quantize.py: the message names the problem and the fix."""


def load_fp32_model(src: Path) -> ToyGPTForCausalLM:
    """The fp32 model in SRC, checked: a ToyGPT dir, not already int8, every weight loaded from model.safetensors."""
    try:
        config = check_model_dir(src)
    except ModelDirError as err:
        raise QuantizeError(str(err)) from err
    if config.get("quantization"):
        raise QuantizeError(
            f"{src} is already quantized ({config['quantization'].get('method')}); pass the fp32 model dir it "
            "came from (the output of train.py or convert_gpt2.py)."
        )
    try:
        model, info = ToyGPTForCausalLM.from_pretrained(str(src), output_loading_info=True)
    except Exception as err:  # truncated/corrupt safetensors, bad shapes, ...: all mean "these weights are unusable"
        raise QuantizeError(
            f"could not load the weights in {src / 'model.safetensors'} ({type(err).__name__}: {err}); "
            "the file is corrupt or incomplete: re-run train.py / convert_gpt2.py to write it again."
        ) from err
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v} or info.get("error_msgs")
    if bad:
        raise QuantizeError(f"{src / 'model.safetensors'} does not match config.json ({bad}); re-create the model dir.")
    return model.eval()


def file_size(path: Path) -> int:
    return path.stat().st_size


@torch.no_grad()
def val_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over (N, block_size+1) validation windows, as train.py's evaluate."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def greedy_tokens_per_second(model, new_tokens: int, prompt: str = SPEED_PROMPT) -> float:
    """Batch-1 greedy generation with the KV cache; EOS is not allowed to stop it early."""
    import bpe

    ids = torch.tensor([bpe.encode(prompt)])
    new_tokens = min(new_tokens, model.config.block_size - ids.shape[1])
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=bpe.EOT_ID)
    model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up: int8 packing, allocator
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def measure(model, windows, batch_size: int, speed_tokens: int) -> dict:
    figures = {"tokens_per_s": greedy_tokens_per_second(model, speed_tokens) if speed_tokens else None}
    figures["val_loss"] = val_loss(model, windows, batch_size) if windows is not None else None
    return figures


def card_section(src: Path, sizes: dict, before: dict, after: dict, eval_note: str, speed_tokens: int) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    def ratio(a, b, spec=".2f"):
        return "n/a" if a is None or b is None else f"{a / b:{spec}}x"

    loss_change = "n/a"
    if before["val_loss"] is not None:
        loss_change = f"{100 * (after['val_loss'] / before['val_loss'] - 1):+.2f}%"
    return f"""
## int8 quantized variant

Produced by `python quantize.py {src.name} <out>` from the fp32 model: the weights of every Linear layer and of the
token embedding (shared with the tied LM head, stored once) are int8 with one fp32 scale per output row (symmetric);
LayerNorms, biases and position embeddings stay fp32. Activations are quantized per call at run time (dynamic, no
calibration data). The int8 matrix products use PyTorch's fbgemm/x86 kernels on CPU (int8 kernel used here:
`{int8_kernel().name}`); without them the weights are dequantized to fp32 at load, with a warning. Weights are in
`model.safetensors` (int8 tensors + fp32 scales; no pickle), the scheme in `config.json` under `quantization`.

| | fp32 | int8 | int8 / fp32 |
|---|---|---|---|
| model.safetensors (MB) | {sizes['fp32'] / 1e6:.1f} | {sizes['int8'] / 1e6:.1f} | {sizes['int8'] / sizes['fp32']:.3f}x |
| validation loss (nats/token) | {fmt(before['val_loss'], '.4f')} | {fmt(after['val_loss'], '.4f')} | {loss_change} |
| greedy tokens/s (batch 1, KV cache) | {fmt(before['tokens_per_s'], '.1f')} | {fmt(after['tokens_per_s'], '.1f')} | {ratio(after['tokens_per_s'], before['tokens_per_s'])} |

{eval_note} Tokens/s: {speed_tokens} new tokens, {torch.get_num_threads()} CPU thread(s), measured by quantize.py on the
machine that ran it.

Load it exactly like the fp32 model; generation, the KV cache, the tokenizer and pipelines work the same:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = "path/to/int8/model"  # a local directory, or a Hub repo id (with subfolder="int8" if it lives there)
tokenizer = AutoTokenizer.from_pretrained(repo)
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)  # int8 weights, int8 CPU kernels
output = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=100)
print(tokenizer.decode(output[0]))
```
"""


def build_card(src: Path, section: str) -> ModelCard:
    """SRC's card (if any) with the int8 section appended; otherwise a minimal card around the section."""
    readme = src / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme)
    else:
        data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                             tags=["toygpt", "gpt2", "text-generation", "custom_code"])
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# ToyGPT (int8)\n")
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), "int8", "quantized"]))
    card.text = card.text.rstrip() + "\n" + section
    return card


def training_input(src: Path) -> str | None:
    """The text file train.py recorded for SRC (training_args.json), if it still exists."""
    try:
        recorded = json.loads((src / "training_args.json").read_text()).get("input_path")
    except (OSError, ValueError):
        return None
    return recorded if recorded and Path(recorded).is_file() else None


def quantize_dir(src, out, overwrite=False, eval_input=None, eval_batches=8, batch_size=8, speed_tokens=128,
                 log=print) -> dict:
    """Write the int8 version of model dir `src` to `out` (atomically); return the measured figures.

    Val loss is measured on eval_batches x batch_size held-out windows of eval_input (every window if eval_batches
    is None)."""
    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise QuantizeError(f"OUT_DIR {out} is SRC_DIR itself; write the int8 model to a new directory.")
    if out.exists() and not overwrite:
        raise QuantizeError(f"{out} already exists; choose another OUT_DIR or pass --overwrite.")
    fp32 = load_fp32_model(src)

    if eval_input is None:  # default: the text train.py trained on (its held-out split), where it is still there
        trained_on = training_input(src)
        if trained_on is not None:
            eval_input = trained_on
            log(f"quantize: evaluating on the held-out split of {eval_input} (from training_args.json)")
    windows, eval_note = None, "Validation loss skipped: no corpus given (pass --eval-input PATH)."
    if eval_input is not None:
        import data

        try:
            max_windows = None if eval_batches is None else eval_batches * batch_size
            windows = data.val_windows(eval_input, fp32.config.block_size, max_windows=max_windows).windows
        except (OSError, ValueError) as err:
            raise QuantizeError(f"--eval-input {eval_input}: {err}") from err
        eval_note = (
            f"Validation loss: mean over the first {len(windows)} windows of {fp32.config.block_size} tokens of the "
            f"held-out last 10% of `{Path(eval_input).name}`, never trained on."
        )

    log(f"quantize: measuring fp32 {src}")
    before = measure(fp32, windows, batch_size, speed_tokens)
    int8 = quantize_int8(fp32)
    del fp32  # the int8 copy owns everything it needs
    log("quantize: measuring int8")
    after = measure(int8, windows, batch_size, speed_tokens)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_files(int8, tmp)
        for figure in src.glob("*.png"):  # plots SRC's card shows (loss curve)
            shutil.copy2(figure, tmp / figure.name)
        sizes = {"fp32": file_size(src / "model.safetensors"), "int8": file_size(tmp / "model.safetensors")}
        build_card(src, card_section(src, sizes, before, after, eval_note, speed_tokens)).save(str(tmp / "README.md"))
        check_written(tmp, int8)
    figures = {"size_fp32": sizes["fp32"], "size_int8": sizes["int8"], "before": before, "after": after}
    def pair(key, spec):  # "not measured" where quantize_dir was asked not to measure (the bench measures itself)
        if before[key] is None or after[key] is None:
            return "not measured"
        return f"{before[key]:{spec}} -> {after[key]:{spec}}"

    log(f"quantize: wrote {out}: model.safetensors {sizes['fp32'] / 1e6:.1f} MB -> {sizes['int8'] / 1e6:.1f} MB; "
        f"val loss {pair('val_loss', '.4f')}; tokens/s {pair('tokens_per_s', '.1f')}")
    return figures


@torch.no_grad()
def check_written(directory: Path, int8) -> None:
    """Reload the written dir and compare logits with the in-memory int8 model: never ship a dir that loads wrong."""
    reloaded, info = ToyGPTForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    ids = torch.arange(min(16, int8.config.block_size))[None] * 997 % int8.config.vocab_size
    if problems or not torch.equal(reloaded(ids).logits, int8(ids).logits):
        raise RuntimeError(f"the written int8 model does not reload identically ({problems or 'logits differ'}).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src_dir", help="fp32 ToyGPT model dir (train.py or convert_gpt2.py output)")
    p.add_argument("out_dir", help="where to write the int8 model dir (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--eval-input", default=None,
                   help="text corpus the model was trained on (default: the input recorded in SRC/training_args.json); "
                        "val loss before/after is measured on its last 10%%")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches to evaluate (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="validation batch size (default 8)")
    p.add_argument("--speed-tokens", type=int, default=128,
                   help="new tokens for the tokens/s figures (default 128; 0 skips them)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("eval_batches", "batch_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"quantize.py: --{name.replace('_', '-')} must be positive")
    try:
        quantize_dir(args.src_dir, args.out_dir, overwrite=args.overwrite, eval_input=args.eval_input,
                     eval_batches=args.eval_batches, batch_size=args.batch_size, speed_tokens=args.speed_tokens)
    except QuantizeError as err:
        print(f"quantize.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
