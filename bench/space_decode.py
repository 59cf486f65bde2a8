"""The Space's tokens/s (the figure its status line shows) against llama.cpp q8_0 sampling the same way, in one run.

    flock -x /tmp/toygpt-cpu.lock python bench/space_decode.py --model-dir out/toygpt-int8 --fp32-dir out/toygpt
                                                               [--repeats 5] [--new-tokens 200] [--threads 2]

space/app.py's generate_stream (one sequence, the UI's defaults: temperature 0.8, top-k 50, top-p 1, seeds 0, 1, ..)
with the int8 model's default generate() (static cache, compiled decode step) and with TOYGPT_INT8_COMPILE=0 (eager,
as before), and llama.cpp's server on the q8_0 GGUF of the fp32 dir with the same sampling settings; they take turns,
repeat after repeat; medians of tokens/s (each run's tokens over its wall time, as the status line counts them).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[1:1] = [str(REPO), str(REPO / "space")]  # after bench/ itself: its quantize.py, not the CLI

import app  # noqa: E402  (space/app.py)
from quantize import LlamaCpp  # noqa: E402  (bench/quantize.py)
from toygpt.gguf_export import export_gguf  # noqa: E402

SAMPLING = dict(temperature=0.8, top_k=50, top_p=1.0)


def space_rate(loaded, prompt: str, new_tokens: int, seed: int) -> float:
    *_, (texts, status) = app.generate_stream(loaded, prompt, new_tokens, SAMPLING["temperature"], SAMPLING["top_k"],
                                              SAMPLING["top_p"], 1, str(seed))
    return float(re.search(r"\*\*([0-9.]+) tokens/s\*\*", status).group(1))


def llama_rate(runtime, prompt_ids, new_tokens: int, seed: int) -> float:
    start = time.perf_counter()
    out = runtime.post({"prompt": prompt_ids, "n_predict": new_tokens, "seed": seed, "cache_prompt": False,
                        "return_tokens": True, **SAMPLING})
    return len(out["tokens"]) / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="the int8 model dir the Space serves")
    p.add_argument("--fp32-dir", type=Path, required=True, help="the fp32 dir it was quantized from (for the GGUF)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt", default=app.EXAMPLES[1])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = app.load_model(str(args.model_dir), "int8")
    prompt_ids = loaded.tokenizer(args.prompt, verbose=False)["input_ids"]

    def toygpt(compile_step: bool):
        def run(seed):
            os.environ["TOYGPT_INT8_COMPILE"] = "1" if compile_step else "0"
            return space_rate(loaded, args.prompt, args.new_tokens, seed)
        return run

    with tempfile.TemporaryDirectory(prefix="toygpt-space-decode-") as tmp:
        gguf = export_gguf(args.fp32_dir, Path(tmp) / "q8_0.gguf", "q8_0", log=lambda *a: None)
        runtime = LlamaCpp(gguf, len(prompt_ids) + args.new_tokens, args.threads)
        runs = {"Space, int8 (static cache, compiled step)": toygpt(True),
                "Space, int8 eager (TOYGPT_INT8_COMPILE=0)": toygpt(False),
                "llama.cpp q8_0, same sampling": lambda seed: llama_rate(runtime, prompt_ids, args.new_tokens, seed)}
        start = time.perf_counter()
        app.warm_up(loaded)  # as the app does before serving: compiles the step
        print(f"warm-up (the app's, before serving): {time.perf_counter() - start:.1f} s")
        for run in runs.values():
            run(0)
        rates = {name: [] for name in runs}
        for seed in range(args.repeats):
            for name, run in runs.items():
                rates[name].append(run(seed))
        del runtime
    print(f"{args.model_dir}: prompt {args.prompt!r}, up to {args.new_tokens} new tokens, one sequence, "
          f"temperature {SAMPLING['temperature']} top-k {SAMPLING['top_k']}, {args.threads} thread(s), "
          f"torch {torch.__version__}; median of {args.repeats}")
    median = {name: statistics.median(r) for name, r in rates.items()}
    reference = median["llama.cpp q8_0, same sampling"]
    for name, rate in median.items():
        print(f"  {name:<45} {rate:8.0f} tokens/s   {rate / reference:5.2f}x llama.cpp   "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates[name])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
