"""Quantize a ToyGPT model dir to int8: `python quantize.py SRC_DIR OUT_DIR [--overwrite] [--eval-input PATH]`.

Weights of every Linear and of the tied token embedding / lm_head become int8 with one fp32 scale per output row;
activations are quantized at run time (no calibration data). OUT_DIR is a complete model directory (safetensors
only, config.quantization records the scheme) that `AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True)` loads as an int8 model. The measured figures (size, val loss, tokens/s before and after) go to
OUT_DIR/quantization_report.json, beside SRC's training records; toygpt/model_card.py renders README.md from them.
Quantizing (fp32 rows -> int8 rows + scales) happens here; the int8 modules and kernels a loaded model runs on live
in int8_toygpt.py, which travels with the model beside modeling_toygpt.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from toygpt.evaluation import evaluate
from int8_toygpt import INT8_SCHEME, Int8Rows, int8_kernel
from toygpt import model_card
from toygpt.model_dir import ModelDirError, OutputDir, OutputDirError, check_model_dir, write_model_files
from modeling_toygpt import ToyGPTForCausalLM
from toygpt.train_config import TrainingConfig
from toygpt.training_loss import CausalLMLoss

SPEED_PROMPT = "ROMEO:\nIs the day so young?"


class QuantizeError(ValueError):
    """Bad input to quantize.py: the message names the problem and the fix."""


def quantize_rows(weight):
    """Symmetric per-row int8: (q (R, K) int8, scale (R,) fp32) with weight ~= q * scale[:, None]."""
    scale = (weight.detach().float().abs().amax(dim=1) / 127).clamp(min=1e-12)  # an all-zero row takes any scale
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int8(model):
    """An int8 copy of an fp32 ToyGPTForCausalLM: int8 weights + scales, everything else copied in fp32."""
    config = copy.deepcopy(model.config)
    config.quantization = copy.deepcopy(INT8_SCHEME)
    with torch.device("meta"):  # no throwaway fp32 init: every tensor is assigned below
        qmodel = ToyGPTForCausalLM(config)
    int8_modules = {name for name, module in qmodel.named_modules() if isinstance(module, Int8Rows)}
    wanted = set(qmodel.state_dict())
    state = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in int8_modules and leaf == "weight":
            state[name], state[module_name + ".weight_scale"] = quantize_rows(tensor)
        elif name in wanted:  # lm_head.weight is not: the int8 head reads wte's rows
            state[name] = tensor.detach().float().clone()
    qmodel.load_state_dict(state, strict=True, assign=True)
    qmodel.generation_config = copy.deepcopy(model.generation_config)
    return qmodel.eval()


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
def greedy_tokens_per_second(model, new_tokens: int, prompt: str = SPEED_PROMPT) -> float:
    """Batch-1 greedy generation with the KV cache; EOS is not allowed to stop it early."""
    from toygpt import bpe

    ids = torch.tensor([bpe.encode(prompt)])
    new_tokens = min(new_tokens, model.config.block_size - ids.shape[1])
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=bpe.EOT_ID)
    model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up: int8 packing, allocator
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def measure(model, val, batch_size: int, speed_tokens: int) -> dict:
    figures = {"tokens_per_s": greedy_tokens_per_second(model, speed_tokens) if speed_tokens else None}
    figures["val_loss"] = None if val is None else evaluate(CausalLMLoss(model), val, batch_size)["val_loss"]
    return figures


def quantization_report(src: Path, sizes: dict, before: dict, after: dict, eval_input, val,
                        speed_tokens: int) -> dict:
    """The measured figures as quantization_report.json records them; toygpt/model_card.py renders the card from it."""
    evaluated = None if val is None else {  # None: no corpus, val loss not measured
        "text": Path(eval_input).name, "windows": len(val.windows), "window_tokens": val.windows.shape[1] - 1}
    return {
        "source": src.name, "n_params": model_card.parameter_count(src / "model.safetensors"),
        "size_fp32": sizes["fp32"], "size_int8": sizes["int8"], "before": before, "after": after, "eval": evaluated,
        "kernel": int8_kernel().name, "threads": torch.get_num_threads(), "speed_tokens": speed_tokens,
    }


def write_card(src: Path, out: Path, report: dict) -> None:
    """The report, SRC's training records and plots (OUT's card stands alone), and README.md rendered from them."""
    (out / model_card.INT8_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    for path in [*(src / name for name in model_card.TRAINING_RECORDS), *src.glob("*.png")]:
        if path.is_file():
            shutil.copy2(path, out / path.name)
    model_card.dir_card(model_card.read_records(out)).save(str(out / "README.md"))


def training_input(src: Path) -> str | None:
    """The text file train.py recorded for SRC (training_args.json), if it still exists."""
    training = TrainingConfig.load(src)
    recorded = training.data.input_path if training and training.data else None
    return recorded if recorded and Path(recorded).is_file() else None


def quantize_dir(src, out, overwrite=False, eval_input=None, eval_batches=8, batch_size=8, speed_tokens=128,
                 log=print) -> dict:
    """Write the int8 version of model dir `src` to `out` (atomically); return the measured figures.

    `out` is claimed first (model_dir.OutputDir: never an input, replaced only with --overwrite and only if this project
    wrote it, locked). Val loss is measured on eval_batches x batch_size held-out windows of eval_input (every window
    if eval_batches is None)."""
    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise QuantizeError(f"OUT_DIR {out} is SRC_DIR itself; write the int8 model to a new directory.")
    with OutputDir(out, inputs=[src, eval_input], replace=overwrite, flag="OUT_DIR", log=log) as output:
        fp32 = load_fp32_model(src)
        if eval_input is None:  # default: the text train.py trained on (its held-out split), where it is still there
            eval_input = training_input(src)
            if eval_input is not None:
                log(f"quantize: evaluating on the held-out split of {eval_input} (from training_args.json)")
                output.refuse_inputs([eval_input])
        val = held_out_windows(eval_input, fp32.config.block_size, eval_batches, batch_size)

        log(f"quantize: measuring fp32 {src}")
        before = measure(fp32, val, batch_size, speed_tokens)
        int8 = quantize_int8(fp32)
        del fp32  # the int8 copy owns everything it needs
        log("quantize: measuring int8")
        after = measure(int8, val, batch_size, speed_tokens)

        with output.write() as tmp:
            write_model_files(int8, tmp)
            sizes = {"fp32": file_size(src / "model.safetensors"), "int8": file_size(tmp / "model.safetensors")}
            write_card(src, tmp, quantization_report(src, sizes, before, after, eval_input, val, speed_tokens))
            check_written(tmp, int8)
    figures = {"size_fp32": sizes["fp32"], "size_int8": sizes["int8"], "before": before, "after": after}

    def pair(key, spec):  # "not measured" where quantize_dir was asked not to measure (the bench measures itself)
        if before[key] is None or after[key] is None:
            return "not measured"
        return f"{before[key]:{spec}} -> {after[key]:{spec}}"

    log(f"quantize: wrote {out}: model.safetensors {sizes['fp32'] / 1e6:.1f} MB -> {sizes['int8'] / 1e6:.1f} MB; "
        f"val loss {pair('val_loss', '.4f')}; tokens/s {pair('tokens_per_s', '.1f')}")
    return figures


def held_out_windows(eval_input, block_size: int, eval_batches, batch_size: int):
    """The first eval_batches x batch_size validation windows of eval_input (all if eval_batches is None), or None."""
    if eval_input is None:
        return None
    from toygpt.stream import val_windows

    try:
        max_windows = None if eval_batches is None else eval_batches * batch_size
        return val_windows(eval_input, block_size, max_windows=max_windows)
    except (OSError, ValueError) as err:
        raise QuantizeError(f"--eval-input {eval_input}: {err}") from err


@torch.no_grad()
def check_written(directory: Path, int8) -> None:
    """Reload the written dir and compare logits with the in-memory int8 model: never ship a dir that loads wrong."""
    reloaded, info = ToyGPTForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    ids = torch.arange(min(16, int8.config.block_size))[None] * 997 % int8.config.vocab_size
    if problems or not torch.equal(reloaded(ids).logits, int8(ids).logits):
        raise RuntimeError(f"the written int8 model does not reload identically ({problems or 'logits differ'}).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantize.py", description=__doc__.split("\n\n")[0])
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
    try:
        for name in ("eval_batches", "batch_size"):
            if getattr(args, name) <= 0:
                raise QuantizeError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
        quantize_dir(args.src_dir, args.out_dir, overwrite=args.overwrite, eval_input=args.eval_input,
                     eval_batches=args.eval_batches, batch_size=args.batch_size, speed_tokens=args.speed_tokens)
    except (QuantizeError, OutputDirError) as err:
        print(f"quantize.py: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as err:  # a failure at run time: OUT_DIR is as it was (written atomically)
        print(f"quantize.py: error: quantizing {args.src_dir} failed ({type(err).__name__}: {err}); {args.out_dir} "
              "was left as it was.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
