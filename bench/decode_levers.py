"""What makes ToyGPT's int8 decode fast: each lever's ms/token on top of the ones before it, and where a token's time
goes (matmuls, attention, the rest of the step, Python around it), all measured in one run.

    flock -x /tmp/toygpt-cpu.lock python bench/decode_levers.py --model-dir out/toygpt-int8 [--threads 1]
                                                                  [--repeats 3] [--new-tokens 256]
    flock -x /tmp/toygpt-cpu.lock python bench/decode_levers.py --preset gpt2   # 124M shape, random weights
    ... --ctypes-op    # the block kernel's operator in Python (where torch's headers do not build): alternate runs
                       # with and without it to see what the operator in C++ buys (the operator is process-wide)

Batch 1, greedy, a 16-token prompt, exactly --new-tokens tokens (bench/generate.py). Each lever is its own loaded
copy of the model (generate() keeps one compiled step per model); after a warm-up (which compiles, timed apart),
the copies take turns, repeat after repeat, so contention from other processes hits them alike; medians. Every
lever must give the eager greedy tokens (reported; int8 activations round per token, so on random weights an
exact tie may still flip one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import create_masks_for_generate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configuration_toygpt import ToyGPTConfig  # noqa: E402
import int8_toygpt  # noqa: E402
from int8_toygpt import BLOCK_OP, decode_compile_config  # noqa: E402
from modeling_toygpt import ToyGPTForCausalLM  # noqa: E402
from toygpt import quantization  # noqa: E402
from toygpt.model_dir import save_model_dir  # noqa: E402
from generate import PROMPT_TOKENS, generate_tokens  # noqa: E402

MATMULS = (f"toygpt::{BLOCK_OP}", "aten::_int_mm", "aten::mm", "aten::addmm", "aten::linear",
           "quantized::linear_dynamic")
ATTENTION = "scaled_dot_product"


def compile_config(**options):
    """The default decode step's compile config with inductor `options` replacing its own."""
    config = decode_compile_config()
    config.options = options
    return config


# (label, generate() kwargs, keep transformers' 4-D mask), cumulative: each adds one lever to the one above
LEVERS = [
    ("eager, dynamic cache (transformers' default)", lambda: dict(cache_implementation="dynamic"), False),
    ("static cache, eager", lambda: dict(cache_implementation="static", disable_compile=True), True),
    ("+ compiled decode step (transformers' 4-D mask)", lambda: dict(compile_config=compile_config()), True),
    ("+ own 2-D mask, reads the filled slots only", lambda: dict(compile_config=compile_config()), False),
    ("+ inductor size_asserts off", lambda: dict(compile_config=compile_config(size_asserts=False)), False),
    ("+ inductor cpp_wrapper (the default path)", lambda: {}, False),
]


def per_token_split(model, prompt, new_tokens: int, **kwargs) -> dict:
    """ms per token of one profiled generation: matmuls and attention (their ops' own time), the rest of the compiled
    step (LayerNorm, GELU, activation rounding, cache writes), and everything else (generate()'s Python, logits
    processing, graph guards; in an eager model also the small ops, which run from Python one by one). Inductor's C++
    wrapper calls aten's CPU kernels below the dispatcher, where the profiler does not see them: there attention is
    counted in the rest of the step (its key says so); operators (the block kernel's) are still seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        generate_tokens(model, prompt, new_tokens, **kwargs)
        total = time.perf_counter() - start
    events = prof.key_averages()
    own = lambda match: sum(e.self_cpu_time_total for e in events if match(e.key)) / 1e3  # noqa: E731
    matmuls = own(lambda k: k in MATMULS)
    attention = own(lambda k: ATTENTION in k)
    step = sum(e.cpu_time_total for e in events if e.key.startswith("Torch-Compiled Region")) / 1e3
    rest = max(step - matmuls - attention, 0.0) if step else 0.0
    split = {"total": total * 1e3, "matmuls": matmuls}
    if not step or sum(e.count for e in events if ATTENTION in e.key) >= new_tokens:  # seen in the decode steps
        split.update({"attention": attention, "rest of compiled step": rest})
    else:
        split["rest of compiled step incl. attention"] = rest
    split["Python and other ops"] = total * 1e3 - matmuls - attention - rest
    return {k: v / new_tokens for k, v in split.items()}


def load_levers(int8_dir: Path, ctypes_op: bool) -> dict:
    models = {}
    for label, kwargs, transformers_mask in LEVERS:
        if ctypes_op:  # this repo's int8_toygpt (patched in main), not the dir's copy of it
            model = ToyGPTForCausalLM.from_pretrained(str(int8_dir)).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(int8_dir), trust_remote_code=True).eval()
        if transformers_mask:  # generate() then builds its 4-D (B, 1, T, max_cache_len) mask every step
            model.create_masks_for_generate = create_masks_for_generate
        models[label] = (model, kwargs)
    return models


def random_int8(preset: str, work: Path) -> Path:
    torch.manual_seed(0)
    fp32_dir = save_model_dir(ToyGPTForCausalLM(ToyGPTConfig.from_preset(preset)), work / f"{preset}-fp32")
    quantization.quantize_dir(fp32_dir, work / f"{preset}-int8", speed_tokens=0, log=lambda *a: None)
    return work / f"{preset}-int8"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="an int8 model dir (quantize.py)")
    source.add_argument("--preset", choices=["tiny", "gpt2"], help="random weights of this preset, quantized here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--ctypes-op", action="store_true",
                   help="the block kernel's operator implemented in Python (ctypes), as where torch's headers do not "
                        "build, instead of in C++: run once with and once without to compare")
    args = p.parse_args(argv)
    if args.ctypes_op:
        plain_build = int8_toygpt._compile_block_kernel
        int8_toygpt._compile_block_kernel = lambda torch_op: plain_build(torch_op=False)
        int8_toygpt.block_kernel_library()  # defines the operator with the Python implementation, process-wide
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # one compiled step per lever's model, all of one code object

    with tempfile.TemporaryDirectory(prefix="toygpt-decode-levers-") as tmp:
        int8_dir = args.model_dir or random_int8(args.preset, Path(tmp))
        models = load_levers(int8_dir, args.ctypes_op)
        config = next(iter(models.values()))[0].config
        new_tokens = min(args.new_tokens, config.block_size - PROMPT_TOKENS)
        prompt = torch.randint(0, 5000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
        first_call = {}
        for label, (model, kwargs) in models.items():
            start = time.perf_counter()
            generate_tokens(model, prompt, 8, **kwargs())  # warm-up: packing, allocator, compiling
            first_call[label] = time.perf_counter() - start
        seconds, tokens = {label: [] for label in models}, {}
        for _ in range(args.repeats):
            for label, (model, kwargs) in models.items():
                tokens[label], elapsed = generate_tokens(model, prompt, new_tokens, **kwargs())
                seconds[label].append(elapsed)
        split = {label: per_token_split(model, prompt, new_tokens, **kwargs())
                 for label, (model, kwargs) in list(models.items())[::len(models) - 1]}  # the first and the last

    operator = "Python (ctypes)" if args.ctypes_op else "C++"
    print(f"{int8_dir if args.model_dir else args.preset + ' (random weights)'}: n_layer={config.n_layer} "
          f"n_embd={config.n_embd} vocab={config.vocab_size}; torch {torch.__version__}, {args.threads} thread(s); "
          f"batch 1, greedy, {PROMPT_TOKENS}-token prompt, {new_tokens} new tokens, median of {args.repeats}; the "
          f"block kernel's operator in {operator}")
    reference = tokens[LEVERS[0][0]]
    base = None
    print(f"  {'lever (cumulative)':<50} {'ms/token':>9} {'vs eager':>9} {'first call s':>13}  same tokens")
    for label, runs in seconds.items():
        ms = statistics.median(runs) / new_tokens * 1e3
        base = base or ms
        same = sum(a == b for a, b in zip(tokens[label], reference)) / new_tokens
        print(f"  {label:<50} {ms:9.2f} {base / ms:8.2f}x {first_call[label]:13.1f}  {same:.0%}")
    print("\n  per-token split, ms (one profiled generation each; the profiler adds its own overhead):")
    for label, parts in split.items():
        print(f"  {label:<50} " + "   ".join(f"{name} {ms:.2f}" for name, ms in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
