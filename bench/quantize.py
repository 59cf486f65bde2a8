"""int8 (quantize.py) against fp32 and against llama.cpp's q8_0 of the same model, in one run: size, quality as
llama.cpp measures it, decode tokens/s, peak RSS at load.

    flock -s /tmp/toygpt-cpu.lock python train.py --preset tiny --time-budget-min 3 \
        --input ../shared/data/tinyshakespeare.txt --output-dir /tmp/toygpt-tiny
    flock -x /tmp/toygpt-cpu.lock python bench/quantize.py --trained-dir /tmp/toygpt-tiny [--repeats 3] [--threads 2]
                                                           [--chunks N] [--top-k 200] [--decode-threads 1,2]

Without --trained-dir it first trains that model itself (3 minutes). Every figure is measured in the same run:
- 124M `gpt2` preset, random weights (seeded), written by save_model_dir, quantized by quantization.quantize_dir:
  * size of model.safetensors, int8 / fp32                                       (target <= 0.27x)
  * decode tokens/s, batch 1, greedy, 16-token prompt, 256 new tokens, KV cache, at 1 and 2 threads (--decode-threads):
    ToyGPT fp32, ToyGPT int8 (its default generate(): static cache, compiled decode step; the compile is the warm-up,
    timed apart) and llama.cpp q8_0 of the same weights take turns, repeat after repeat, so contention hits them
    alike; medians, and a profiled per-token split (matmuls, attention, rest)
    (targets: int8/fp32 >= 2.0x at --threads and >= 3x at every thread count; int8/q8_0 >= 0.8x)
  * peak RSS (VmHWM) of a fresh process over from_pretrained + one greedy token, above the RSS before loading,
    int8 / fp32 (target <= 0.5x); the whole-process figures are printed too
- the trained model (tiny Shakespeare), quantized the same way, and its GGUF q8_0 (convert_gpt2.py to-gguf) run in
  llama.cpp itself (xllamacpp; skipped with the reason where it is not installed):
  * as `llama-perplexity --kl-divergence` measures: the held-out split in chunks of 256 tokens, the second half of
    each scored against ToyGPT fp32's logits (quantization.LogitQuality): mean KLD, same top token, PPL ratio.
    llama.cpp's server returns only the top n_probs probabilities of a position, so its KLD is over the top-k plus
    one remainder bucket (a lower bound of the exact KLD); int8 is measured exactly AND the same top-k way, and the
    targets compare like with like: int8 top-k KLD <= q8_0's, same top >= q8_0's, PPL ratio <= 1.002
  * size int8 / fp32 (<= 0.27x), val loss rise (<= 1%)
  * decode tokens/s, batch 1, 1 and 2 threads, as for the 124M shape (target int8/q8_0 >= 0.5x)
  * greedy agreement int8 vs fp32 (information only: one early flip changes a whole continuation)
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
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toygpt import quantization  # noqa: E402
from toygpt.stream import val_windows  # noqa: E402
from configuration_toygpt import ToyGPTConfig  # noqa: E402
from int8_toygpt import int8_kernel  # noqa: E402
from toygpt.gguf_export import export_gguf  # noqa: E402
from toygpt.model_dir import save_model_dir  # noqa: E402
from modeling_toygpt import ToyGPTForCausalLM  # noqa: E402
from generate import generate_tokens, greedy_agreement  # noqa: E402  (bench/generate.py: exact-length greedy)
from decode_levers import per_token_split  # noqa: E402

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPT_TOKENS = 16
TARGETS = {"size": 0.27, "speed": 2.0, "rss": 0.5, "loss_rise": 0.01, "ppl_ratio": 1.002,
           "decode_vs_fp32": 3.0, "decode_vs_q8_124m": 0.8, "decode_vs_q8_tiny": 0.5}

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


def load_rss(directory, threads, compile_decode=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "TOYGPT_INT8_COMPILE": "1" if compile_decode else "0"}
    proc = subprocess.run([sys.executable, "-c", RSS_CODE, str(directory), str(threads)], cwd=directory.parent,
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_124m(work: Path, repeats: int, new_tokens: int, threads: int, decode_threads) -> dict:
    torch.manual_seed(0)
    fp32_dir = save_model_dir(ToyGPTForCausalLM(ToyGPTConfig.from_preset("gpt2")), work / "gpt2-fp32")
    int8_dir = work / "gpt2-int8"
    start = time.perf_counter()
    quantization.quantize_dir(fp32_dir, int8_dir, speed_tokens=0, log=lambda *a: None)
    print(f"124M: quantizing took {time.perf_counter() - start:.1f} s (no measurements)")
    dirs = {"fp32": fp32_dir, "int8": int8_dir}
    sizes = {k: (d / "model.safetensors").stat().st_size for k, d in dirs.items()}

    rss = {k: load_rss(d, threads) for k, d in dirs.items()}
    # int8's default generate() allocates a static cache (256 slots for this call) and loads torch.compile: the eager
    # path's figure is the weights' share alone
    rss["int8 eager"] = load_rss(int8_dir, threads, compile_decode=False)

    models = {k: load(d) for k, d in dirs.items()}
    assert type(models["int8"].lm_head).__name__ == "Int8TiedLMHead", "int8 dir did not load as int8"
    gguf = None if llama_cpp_missing() else export_gguf(fp32_dir, work / "gpt2-q8_0.gguf", "q8_0", log=lambda *a: None)
    decode = decode_rates(models, gguf, sorted(set(decode_threads) | {threads}), repeats, new_tokens)
    return {"sizes": sizes, "rss": rss, "rate": decode["rates"][threads], "decode": decode}


def train_tiny(work: Path, corpus: Path) -> Path:
    out = work / "tiny-trained"
    cmd = [sys.executable, str(REPO / "train.py"), "--preset", "tiny", "--time-budget-min", "3", "--input",
           str(corpus), "--output-dir", str(out)]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


class LlamaCpp:
    """A GGUF file in llama.cpp's own server (xllamacpp, in-process, on 127.0.0.1), driven by token ids."""

    def __init__(self, path, n_ctx, threads):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx, params.n_parallel, params.warmup = n_ctx, 1, False
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        self.server = xllamacpp.Server(params)

    def post(self, body):
        request = urllib.request.Request(self.server.listening_address + "/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def top_logprobs(self, chunk, positions: slice, k: int):
        """(ids (n, k), logprobs (n, k)): llama.cpp's top-k next tokens after each scored position of `chunk`. One
        request per position; cache_prompt reuses the chunk's prefix, so each evaluates one more token (its server
        returns the top n_probs of the full softmax for generated tokens only, never all logits of a prompt)."""
        ids, logprobs = [], []
        for j in range(positions.start, positions.stop):
            top = self.post({"prompt": chunk[:j + 1].tolist(), "n_predict": 1, "n_probs": k, "temperature": 0.0,
                             "cache_prompt": True, "return_tokens": True})["completion_probabilities"][0]["top_logprobs"]
            ids.append([t["id"] for t in top])
            logprobs.append([t["logprob"] for t in top])
        return torch.tensor(ids), torch.tensor(logprobs)

    def greedy_seconds(self, prompt, new_tokens):
        start = time.perf_counter()
        out = self.post({"prompt": prompt, "n_predict": new_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                         "cache_prompt": False, "return_tokens": True})
        assert len(out["tokens"]) == new_tokens
        return time.perf_counter() - start


def llama_cpp_missing() -> str | None:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return "xllamacpp is not installed (requirements-dev.txt: `make install`)"
    return None


@torch.no_grad()
def llama_cpp_quality(gguf_path, fp32, chunks, top_k: int, int8=None) -> dict:
    """LogitQuality of llama.cpp running `gguf_path` against ToyGPT fp32, from llama.cpp's top-k (remainder bucket);
    with `int8`, the same top-k measure of ToyGPT int8 too, to show what the bucket hides."""
    runtime = LlamaCpp(gguf_path, chunks.shape[1], threads=torch.get_num_threads())
    quality = {"llama.cpp": quantization.LogitQuality(), "int8 (top-k)": quantization.LogitQuality()}
    try:
        for chunk in chunks:
            positions, targets = quantization.scored(chunk[None])
            reference = fp32(chunk[None]).logits[0, positions]
            quality["llama.cpp"].add(reference, targets, other_top=runtime.top_logprobs(chunk, positions, top_k))
            if int8 is not None:
                top = torch.log_softmax(int8(chunk[None]).logits[0, positions], -1).topk(top_k)
                quality["int8 (top-k)"].add(reference, targets, other_top=(top.indices, top.values))
    finally:
        del runtime
    return {name: q.figures() for name, q in quality.items() if q.positions}


def bench_trained(trained: Path, work: Path, corpus: Path, prompts: int, continuation: int, batch_size: int,
                  n_chunks: int | None, top_k: int):
    int8_dir = work / "trained-int8"
    # quantize.py's own val loss measurement (the one its model card reports), over every held-out window
    figures = quantization.quantize_dir(trained, int8_dir, eval_input=corpus, eval_batches=None, batch_size=batch_size,
                                        speed_tokens=0)
    loss = {"fp32": figures["before"]["val_loss"], "int8": figures["after"]["val_loss"]}
    models = {"fp32": load(trained), "int8": load(int8_dir)}
    block_size = models["fp32"].config.block_size
    chunks = quantization.kld_chunks(corpus, min(quantization.KLD_CONTEXT, block_size))
    if n_chunks:  # evenly spaced, for a quicker run
        chunks = chunks[torch.linspace(0, len(chunks) - 1, min(n_chunks, len(chunks))).long()]
    quality = quantization.logit_quality(models["fp32"], {"int8": models["int8"]}, chunks, batch_size)
    sizes = {"fp32": figures["size_fp32"], "int8": figures["size_int8"]}
    gguf = None
    skipped = llama_cpp_missing()
    if skipped is None:
        gguf = export_gguf(trained, work / "trained-q8_0.gguf", "q8_0", log=lambda *a: None)
        sizes["q8_0"] = gguf.stat().st_size
        quality.update(llama_cpp_quality(gguf, models["fp32"], chunks, top_k, int8=models["int8"]))
    windows = val_windows(corpus, block_size).windows  # the prompts come from the same windows
    agreement = greedy_agreement(models["fp32"], models["int8"], windows, prompts, continuation)
    return {"loss": loss, "windows": len(windows), "block_size": block_size, "agreement": agreement,
            "quality": quality, "chunks": chunks.shape, "sizes": sizes, "gguf": gguf, "llama_cpp_skipped": skipped,
            "models": models}


def decode_rates(models: dict, gguf, thread_counts, repeats: int, new_tokens: int) -> dict:
    """Batch-1 greedy decode, a 16-token prompt, KV cache, exactly `new_tokens` tokens: ToyGPT fp32, ToyGPT int8 (its
    default generate(): static cache, compiled decode step) and llama.cpp q8_0 (its server, one request per generation)
    take turns, repeat after repeat; medians. Returns {"rates": {threads: {name: tokens/s}}, "first_call_s": {threads:
    {name: s}} (the warm-up: int8 compiles its step there, which the rates leave out), "split": {threads: {name:
    per_token_split}}}."""
    prompt = torch.randint(0, 50257, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    new_tokens = min(new_tokens, next(iter(models.values())).config.block_size - PROMPT_TOKENS)
    result = {"rates": {}, "first_call_s": {}, "split": {}}
    previous = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        runtime = None if gguf is None else LlamaCpp(gguf, PROMPT_TOKENS + new_tokens, threads)
        runs = {name: (lambda m=model: generate_tokens(m, prompt, new_tokens)[1]) for name, model in models.items()}
        if runtime is not None:
            runs["llama.cpp q8_0"] = lambda: runtime.greedy_seconds(prompt[0].tolist(), new_tokens)
        first = {}
        for name, run in runs.items():
            start = time.perf_counter()
            run()  # warm-up: int8 packing and compiling, allocator, thread pool
            first[name] = time.perf_counter() - start
        seconds = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                seconds[name].append(run())
        result["rates"][threads] = {name: new_tokens / statistics.median(s) for name, s in seconds.items()}
        result["first_call_s"][threads] = first
        result["split"][threads] = {name: per_token_split(model, prompt, new_tokens) for name, model in models.items()}
        del runtime
    torch.set_num_threads(previous)
    return result


def decode_results(decode: dict, label: str, q8_target: float, fp32_target: float | None) -> list:
    """The decode targets as summary rows, one per thread count."""
    rows = []
    for threads, rate in decode["rates"].items():
        if "llama.cpp q8_0" in rate:
            ratio = rate["int8"] / rate["llama.cpp q8_0"]
            rows.append((f"decode int8/q8_0, {label}, {threads} thread(s)", f"{ratio:.2f}x", f">= {q8_target}x",
                         ratio >= q8_target))
        if fp32_target is not None:
            ratio = rate["int8"] / rate["fp32"]
            rows.append((f"decode int8/fp32, {label}, {threads} thread(s)", f"{ratio:.2f}x", f">= {fp32_target}x",
                         ratio >= fp32_target))
    return rows


def print_decode(decode: dict, new_tokens: int, repeats: int) -> None:
    for threads, rate in decode["rates"].items():
        q8 = rate.get("llama.cpp q8_0")
        print(f"  decode tokens/s, batch 1, greedy, {threads} thread(s), median of {repeats}: " + "   ".join(
            f"{name} {r:.0f}" for name, r in rate.items()))
        print(f"    ratios: int8/fp32 {rate['int8'] / rate['fp32']:.2f}x" + (
            "" if q8 is None else f"   int8/q8_0 {rate['int8'] / q8:.2f}x   fp32/q8_0 {rate['fp32'] / q8:.2f}x"))
        print("    first call (warm-up, not in the rates; int8 compiles its decode step here): " + "   ".join(
            f"{name} {s:.1f} s" for name, s in decode["first_call_s"][threads].items()))
        for name, split in decode["split"][threads].items():
            print(f"    per-token ms, {name:<5} (profiled): " + "   ".join(f"{k} {v:.2f}" for k, v in split.items()))


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
    p.add_argument("--chunks", type=int, help="score this many evenly spaced chunks (default: all)")
    p.add_argument("--top-k", type=int, default=200, help="llama.cpp's n_probs per position (default 200)")
    p.add_argument("--decode-threads", type=lambda v: [int(t) for t in v.split(",")], default=[1, 2])
    p.add_argument("--parts", default="124m,trained", help="which halves to run (default both: 124m,trained)")
    args = p.parse_args(argv)
    if "trained" in args.parts.split(",") and not args.input.is_file():
        p.error(f"--input {args.input}: no such file; give the text the trained model saw (tiny Shakespeare)")
    if args.trained_dir is not None and not (args.trained_dir / "config.json").is_file():
        p.error(f"--trained-dir {args.trained_dir}: no config.json there; give a model dir train.py wrote")
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
              f"{int8_kernel(grouped=True).name}")

        big = "124m" in parts and bench_124m(work, args.repeats, args.new_tokens, args.threads, args.decode_threads)
        if big:
            s, r, t = big["sizes"], big["rss"], big["rate"]
            print("\n124M gpt2 preset (random weights):")
            print(f"  model.safetensors           fp32 {s['fp32'] / 1e6:8.1f} MB   int8 {s['int8'] / 1e6:8.1f} MB")
            growth = {k: v["peak_mb"] - v["before_mb"] for k, v in r.items()}
            print(f"  peak RSS, load + 1st token  fp32 {r['fp32']['peak_mb']:7.1f} MB   int8 {r['int8']['peak_mb']:7.1f} MB"
                  f"   (from_pretrained alone: {r['fp32']['loaded_mb']:.1f} / {r['int8']['loaded_mb']:.1f} MB;"
                  f" before loading: {r['fp32']['before_mb']:.1f} / {r['int8']['before_mb']:.1f} MB)")
            eager = growth["int8 eager"]
            print(f"  growth over before loading  fp32 {growth['fp32']:7.1f} MB   int8 {growth['int8']:7.1f} MB   "
                  f"(int8 eager, TOYGPT_INT8_COMPILE=0: {eager:.1f} MB, {eager / growth['fp32']:.3f}x)")
            print_decode(big["decode"], args.new_tokens, args.repeats)
            results += decode_results(big["decode"], "124M", TARGETS["decode_vs_q8_124m"], TARGETS["decode_vs_fp32"])
            results.append(("size on disk int8/fp32", f"{s['int8'] / s['fp32']:.3f}x", f"<= {TARGETS['size']}x",
                            s["int8"] / s["fp32"] <= TARGETS["size"]))
            results.append((f"greedy tokens/s int8/fp32, {args.threads} threads", f"{t['int8'] / t['fp32']:.2f}x",
                            f">= {TARGETS['speed']}x",
                            t["int8"] / t["fp32"] >= TARGETS["speed"]))
            rss_ratio = growth["int8"] / growth["fp32"]
            results.append(("peak RSS at load (growth) int8/fp32", f"{rss_ratio:.3f}x", f"<= {TARGETS['rss']}x",
                             rss_ratio <= TARGETS["rss"]))
        del big

        if "trained" in parts:
            small = bench_trained(trained, work, args.input, args.prompts, args.continuation_tokens, args.batch_size,
                                  args.chunks, args.top_k)
            loss, quality, sizes = small["loss"], small["quality"], small["sizes"]
            rise = loss["int8"] / loss["fp32"] - 1
            print(f"\ntrained model {trained} (block_size {small['block_size']}):")
            print(f"  val loss ({small['windows']} held-out windows)   fp32 {loss['fp32']:.4f}   int8 {loss['int8']:.4f}")
            chunks = small["chunks"]
            print(f"  against ToyGPT fp32, {chunks[0]} chunks of {chunks[1]} tokens, second half scored "
                  f"({quality['int8']['positions']} positions, as llama-perplexity --kl-divergence):")
            print(f"  {'':24} {'size MB':>8} {'mean KLD':>9} {'same top':>9} {'PPL ratio':>10}")
            print(f"  {'ToyGPT fp32':24} {sizes['fp32'] / 1e6:8.1f} {0:9.2e} {1:9.2%} {1:10.4f}")
            for name, q in quality.items():
                size = {"int8": sizes["int8"], "llama.cpp": sizes.get("q8_0")}.get(name)
                label = {"int8": "ToyGPT int8", "llama.cpp": "llama.cpp q8_0 (top-k)"}.get(name, f"ToyGPT {name}")
                ppl = "n/a" if q["ppl_ratio"] is None else f"{q['ppl_ratio']:.4f}"
                print(f"  {label:24} {'' if size is None else f'{size / 1e6:8.1f}':>8} {q['mean_kld']:9.2e} "
                      f"{q['same_top']:9.2%} {ppl:>10}"
                      + ("" if name == "int8" else f"   (top {args.top_k}: target outside {q['outside_top_k']:.2%}, "
                                                    f"mean mass outside {q['remainder_mass']:.2e})"))
            if small["llama_cpp_skipped"]:
                print(f"  llama.cpp q8_0 skipped: {small['llama_cpp_skipped']}")
            q8 = quality["int8"]
            bar = quality.get("llama.cpp")
            if bar is not None:  # top-k KLD is a lower bound of llama.cpp's: compare int8 on the same footing
                mine = quality["int8 (top-k)"]
                results.append(("mean KLD int8 vs q8_0 (both top-k)", f"{mine['mean_kld']:.3e}",
                                f"<= {bar['mean_kld']:.3e}", mine["mean_kld"] <= bar["mean_kld"]))
                results.append(("same top token int8 vs q8_0", f"{q8['same_top']:.2%}", f">= {bar['same_top']:.2%}",
                                q8["same_top"] >= bar["same_top"]))
            if bar is not None and bar["ppl_ratio"] is not None:
                print(f"  llama.cpp q8_0 PPL ratio {bar['ppl_ratio']:.4f}")
            results.append(("PPL ratio int8/fp32", f"{q8['ppl_ratio']:.4f}", f"<= {TARGETS['ppl_ratio']}",
                            q8["ppl_ratio"] <= TARGETS["ppl_ratio"]))
            results.append(("size int8/fp32 (trained)", f"{sizes['int8'] / sizes['fp32']:.3f}x",
                            f"<= {TARGETS['size']}x", sizes["int8"] / sizes["fp32"] <= TARGETS["size"]))
            results.append(("val loss relative rise", f"{rise:+.3%}", f"<= {TARGETS['loss_rise']:.0%}",
                            rise <= TARGETS["loss_rise"]))
            print(f"  greedy agreement, {args.prompts} prompts x {args.continuation_tokens} tokens (information): "
                  f"{small['agreement']:.1%}")
            decode = decode_rates(small["models"], small["gguf"], args.decode_threads, args.repeats, args.new_tokens)
            print_decode(decode, args.new_tokens, args.repeats)
            results += decode_results(decode, "tiny", TARGETS["decode_vs_q8_tiny"], None)

    print("\nsummary:")
    for label, value, target, ok in results:
        print(f"  {label:<45} {value:>9}   target {target:<8} {verdict(ok)}")
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
