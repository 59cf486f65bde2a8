"""int8 (quantize.py) against fp32, in one run: size on disk, greedy tokens/s, peak RSS at load, val loss, fidelity.

    flock -s /tmp/toygpt-cpu.lock python train.py --preset tiny --time-budget-min 3 \
        --input ../shared/data/tinyshakespeare.txt --output-dir /tmp/toygpt-tiny
    flock -x /tmp/toygpt-cpu.lock python bench/quantize.py --trained-dir /tmp/toygpt-tiny [--repeats 3] [--threads 2]

Without --trained-dir it first trains that model itself (3 minutes). Every figure is a ratio against fp32
measured in the same run, with its target:
- 124M `gpt2` preset, random weights (seeded), written by save_model_dir, quantized by quantization.quantize_dir:
  * size of model.safetensors, int8 / fp32                                       (target <= 0.27x)
  * greedy tokens/s, batch 1, 16-token prompt, 256 new tokens, KV cache, both loaded with from_pretrained; fp32 and
    int8 take turns, repeat after repeat, so contention hits both alike; medians  (target >= 2.0x)
  * peak RSS (VmHWM) of a fresh process over from_pretrained + one greedy token (mmapped weights become resident
    only when used), counted above the RSS it had before loading (interpreter, torch, transformers: the same for
    both), int8 / fp32 (target <= 0.5x); the whole-process figures are printed too
- the trained model (tiny Shakespeare), quantized the same way:
  * val loss over every window of the held-out last 10% (val_windows), relative rise   (target <= 1%)
  * greedy continuations (64 new tokens) of 20 prompts (the first 32 tokens of 20 evenly spaced held-out
    windows): share of positions where int8 emits fp32's token                                (target >= 90%)
Exit status 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toygpt import quantization  # noqa: E402
from toygpt.stream import val_windows  # noqa: E402
from configuration_toygpt import ToyGPTConfig  # noqa: E402
from int8_toygpt import int8_kernel  # noqa: E402
from toygpt.model_dir import save_model_dir  # noqa: E402
from modeling_toygpt import ToyGPTForCausalLM  # noqa: E402
from generate import generate_tokens, greedy_agreement  # noqa: E402  (bench/generate.py: exact-length greedy)

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPT_TOKENS = 16
TARGETS = {"size": 0.27, "speed": 2.0, "rss": 0.5, "loss_rise": 0.01, "agreement": 0.90}

# Peak RSS of loading in a fresh interpreter: from_pretrained, then one greedy token (safetensors are mmapped
# lazily, so only a first forward makes the weights resident: that is the memory a loaded model costs).
# transformers' loading modules are imported first, so "before" is the interpreter + torch + transformers.
# Linux's ru_maxrss survives exec (a child forked from this big process would start at our RSS), so read the
# high-water mark of the new address space, VmHWM, instead.
RSS_CODE = r"""
import json, sys
import torch
import transformers.modeling_utils
from transformers import AutoModelForCausalLM
def hwm_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
torch.set_num_threads(int(sys.argv[2]))
before = hwm_mb()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
loaded = hwm_mb()
with torch.inference_mode():
    model.generate(torch.arange(16)[None], max_new_tokens=1, do_sample=False, pad_token_id=0)
print(json.dumps({"before_mb": before, "loaded_mb": loaded, "peak_mb": hwm_mb()}))
"""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load(directory):
    return AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True).eval()


def load_rss(directory, threads):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", RSS_CODE, str(directory), str(threads)], cwd=directory.parent,
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_124m(work: Path, repeats: int, new_tokens: int, threads: int) -> dict:
    torch.manual_seed(0)
    fp32_dir = save_model_dir(ToyGPTForCausalLM(ToyGPTConfig.from_preset("gpt2")), work / "gpt2-fp32")
    int8_dir = work / "gpt2-int8"
    start = time.perf_counter()
    quantization.quantize_dir(fp32_dir, int8_dir, speed_tokens=0, log=lambda *a: None)
    print(f"124M: quantizing took {time.perf_counter() - start:.1f} s (no measurements)")
    dirs = {"fp32": fp32_dir, "int8": int8_dir}
    sizes = {k: (d / "model.safetensors").stat().st_size for k, d in dirs.items()}

    rss = {k: load_rss(d, threads) for k, d in dirs.items()}

    models = {k: load(d) for k, d in dirs.items()}
    assert type(models["int8"].lm_head).__name__ == "Int8TiedLMHead", "int8 dir did not load as int8"
    prompt = torch.randint(0, 50257, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up: int8 packing, allocator, thread pool
        generate_tokens(model, prompt, 8, use_cache=True)
    seconds = {k: [] for k in models}
    tokens = {}
    for _ in range(repeats):
        for k, model in models.items():
            tokens[k], elapsed = generate_tokens(model, prompt, new_tokens, use_cache=True)
            seconds[k].append(elapsed)
    rate = {k: new_tokens / statistics.median(s) for k, s in seconds.items()}
    same = sum(a == b for a, b in zip(tokens["fp32"], tokens["int8"])) / new_tokens
    return {"sizes": sizes, "rss": rss, "rate": rate, "seconds": seconds, "same": same}


def train_tiny(work: Path, corpus: Path) -> Path:
    out = work / "tiny-trained"
    cmd = [sys.executable, str(REPO / "train.py"), "--preset", "tiny", "--time-budget-min", "3", "--input",
           str(corpus), "--output-dir", str(out)]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


def bench_trained(trained: Path, work: Path, corpus: Path, prompts: int, continuation: int, batch_size: int):
    int8_dir = work / "trained-int8"
    # quantize.py's own val loss measurement (the one its model card reports), over every held-out window
    figures = quantization.quantize_dir(trained, int8_dir, eval_input=corpus, eval_batches=None, batch_size=batch_size,
                                    speed_tokens=0)
    loss = {"fp32": figures["before"]["val_loss"], "int8": figures["after"]["val_loss"]}
    models = {"fp32": load(trained), "int8": load(int8_dir)}
    block_size = models["fp32"].config.block_size
    windows = val_windows(corpus, block_size).windows  # the prompts come from the same windows
    agreement = greedy_agreement(models["fp32"], models["int8"], windows, prompts, continuation)
    return {"loss": loss, "windows": len(windows), "block_size": block_size, "agreement": agreement}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trained-dir", type=Path, help="fp32 model dir from train.py on --input (else trains one, 3 min)")
    p.add_argument("--input", type=Path, default=SHAKESPEARE, help="the corpus the trained model saw")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per model (default 3)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--continuation-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="val loss batch size")
    p.add_argument("--parts", default="124m,trained", help="which halves to run (default both: 124m,trained)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"

    results = []  # (label, value text, target text, ok)
    with tempfile.TemporaryDirectory(prefix="toygpt-bench-quantize-") as tmp:
        work = Path(tmp)
        parts = set(args.parts.split(","))
        if not parts or parts - {"124m", "trained"}:
            p.error(f"--parts {args.parts!r}: choose from 124m, trained")
        trained = args.trained_dir or ("trained" in parts and train_tiny(work, args.input))
        print(f"torch {torch.__version__}, {args.threads} threads, int8 kernel: "
              f"{int8_kernel().name}")

        big = "124m" in parts and bench_124m(work, args.repeats, args.new_tokens, args.threads)
        if big:
            s, r, t = big["sizes"], big["rss"], big["rate"]
            print("\n124M gpt2 preset (random weights):")
            print(f"  model.safetensors           fp32 {s['fp32'] / 1e6:8.1f} MB   int8 {s['int8'] / 1e6:8.1f} MB")
            growth = {k: v["peak_mb"] - v["before_mb"] for k, v in r.items()}
            print(f"  peak RSS, load + 1st token  fp32 {r['fp32']['peak_mb']:7.1f} MB   int8 {r['int8']['peak_mb']:7.1f} MB"
                  f"   (from_pretrained alone: {r['fp32']['loaded_mb']:.1f} / {r['int8']['loaded_mb']:.1f} MB;"
                  f" before loading: {r['fp32']['before_mb']:.1f} / {r['int8']['before_mb']:.1f} MB)")
            print(f"  growth over before loading  fp32 {growth['fp32']:7.1f} MB   int8 {growth['int8']:7.1f} MB")
            print(f"  greedy tokens/s             fp32 {t['fp32']:8.1f}      int8 {t['int8']:8.1f}"
                  f"      (batch 1, {args.new_tokens} new tokens, KV cache, median of {args.repeats}; seconds "
                  f"fp32 {[round(x, 2) for x in big['seconds']['fp32']]} int8 {[round(x, 2) for x in big['seconds']['int8']]})")
            print(f"  same greedy token as fp32 (random weights, info): {big['same']:.1%}")
            results.append(("size on disk int8/fp32", f"{s['int8'] / s['fp32']:.3f}x", f"<= {TARGETS['size']}x",
                            s["int8"] / s["fp32"] <= TARGETS["size"]))
            results.append(("greedy tokens/s int8/fp32", f"{t['int8'] / t['fp32']:.2f}x", f">= {TARGETS['speed']}x",
                            t["int8"] / t["fp32"] >= TARGETS["speed"]))
            rss_ratio = growth["int8"] / growth["fp32"]
            results.append(("peak RSS at load (growth) int8/fp32", f"{rss_ratio:.3f}x", f"<= {TARGETS['rss']}x",
                             rss_ratio <= TARGETS["rss"]))
        del big

        if "trained" in parts:
            small = bench_trained(trained, work, args.input, args.prompts, args.continuation_tokens, args.batch_size)
            loss = small["loss"]
            rise = loss["int8"] / loss["fp32"] - 1
            print(f"\ntrained model {trained} (block_size {small['block_size']}):")
            print(f"  val loss ({small['windows']} held-out windows)   fp32 {loss['fp32']:.4f}   int8 {loss['int8']:.4f}")
            results.append(("val loss relative rise", f"{rise:+.3%}", f"<= {TARGETS['loss_rise']:.0%}",
                            rise <= TARGETS["loss_rise"]))
            results.append((f"greedy agreement ({args.prompts} prompts x {args.continuation_tokens} tokens)",
                            f"{small['agreement']:.1%}", f">= {TARGETS['agreement']:.0%}",
                            small["agreement"] >= TARGETS["agreement"]))

    print("\nsummary:")
    for label, value, target, ok in results:
        print(f"  {label:<45} {value:>9}   target {target:<8} {verdict(ok)}")
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
