"""Greedy generation tokens/s on CPU: ToyGPT with and without its KV cache, with a static cache + torch.compile, and
transformers' GPT2LMHeadModel.

    flock /tmp/toygpt-cpu.lock python bench/generate.py [--configs 10m,gpt2] [--repeats 3] [--new-tokens 256]
                                                        [--threads 2]

Batch 1, a 16-token prompt, fp32. GPT2LMHeadModel gets ToyGPT's exact weights (convert_gpt2.toygpt_to_gpt2) and
runs as shipped (use_cache=True, sdpa attention). The compiled variant is transformers' recipe for static shapes:
`model.forward = torch.compile(model.forward)` and `generate(..., cache_implementation="static")`, on a copy of the
same weights; its warmup compiles the prefill and decode graphs (the cache is sized for the timed runs already, so
they do not recompile). After the warmup, the variants take turns, repeat after repeat, so that CPU contention from
other processes hits them alike; each reports its median. All must produce the same greedy tokens. Targets: ToyGPT
cache / GPT2LMHeadModel >= 1.0x, cache / no-cache >= 4x; static + compile / dynamic cache is reported, no target.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_toygpt import PRESETS, ToyGPTConfig  # noqa: E402
from toygpt.gpt2_conversion import toygpt_to_gpt2  # noqa: E402
from toygpt.quantization import NoEndOfText  # noqa: E402
from modeling_toygpt import ToyGPTForCausalLM  # noqa: E402

PROMPT_TOKENS = 16
CONFIGS = {
    # nanoGPT's Shakespeare model shape: 10.6M parameters besides the (50257 x 384) token embedding.
    "10m": dict(n_layer=6, n_head=6, n_embd=384, block_size=512, dropout=0.0),
    "gpt2": PRESETS["gpt2"],  # GPT-2 small, 124M
}
TARGET_VS_GPT2, TARGET_VS_NO_CACHE = 1.0, 4.0
END_OF_TEXT = ToyGPTConfig().eos_token_id  # read once: building a config costs ~0.9 ms, a tiny model's whole token


def generate_tokens(model, prompt, new_tokens, **cache_kwargs):
    # Exactly `new_tokens` greedy steps: no sampling, and no early stop at <|endoftext|>.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, **cache_kwargs,
        eos_token_id=END_OF_TEXT, pad_token_id=END_OF_TEXT,
    )
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(prompt, generation_config=config,
                                logits_processor=LogitsProcessorList([NoEndOfText(END_OF_TEXT)]))
        seconds = time.perf_counter() - start
    assert output.shape[1] == prompt.shape[1] + new_tokens
    return output[0, prompt.shape[1]:].tolist(), seconds


def greedy_agreement(reference, other, windows, prompts: int, continuation: int) -> float:
    """Share of positions where `other`'s greedy continuation emits `reference`'s token: `prompts` prompts (the first
    32 tokens of evenly spaced `windows`), `continuation` new tokens each. After the first different token the two
    continue from different text, so one early difference costs most of a continuation."""
    picks = torch.linspace(0, len(windows) - 1, prompts).long()
    agree = 0
    for i in picks:
        prompt = windows[i, :32][None]
        reference_tokens, _ = generate_tokens(reference, prompt, continuation, use_cache=True)
        other_tokens, _ = generate_tokens(other, prompt, continuation, use_cache=True)
        agree += sum(a == b for a, b in zip(reference_tokens, other_tokens))
    return agree / (prompts * continuation)


def bench_config(name, repeats, new_tokens):
    config = ToyGPTConfig(**CONFIGS[name])
    if config.block_size < PROMPT_TOKENS + new_tokens:
        raise SystemExit(f"{name}: block_size {config.block_size} < {PROMPT_TOKENS} + {new_tokens} tokens")
    torch.manual_seed(0)
    toygpt = ToyGPTForCausalLM(config).eval()
    gpt2 = toygpt_to_gpt2(toygpt).eval()  # the same weights, transposed into Conv1D
    compiled = copy.deepcopy(toygpt)  # the same weights, its own module for torch.compile
    compiled.forward = torch.compile(compiled.forward, fullgraph=True)  # fullgraph: any graph break is an error
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    static = dict(cache_implementation="static", max_cache_len=PROMPT_TOKENS + new_tokens)
    variants = {
        "ToyGPT, KV cache": (toygpt, dict(use_cache=True)),
        "ToyGPT, no cache": (toygpt, dict(use_cache=False)),
        f"GPT2LMHeadModel ({gpt2.config._attn_implementation}, cache)": (gpt2, dict(use_cache=True)),
        "ToyGPT, static cache + torch.compile": (compiled, static),
    }
    for model, cache_kwargs in variants.values():  # warmup: allocator, thread pool, lazy inits, compilation
        generate_tokens(model, prompt, 8, **cache_kwargs)

    tokens, seconds = {}, {label: [] for label in variants}
    for _ in range(repeats):
        for label, (model, cache_kwargs) in variants.items():
            tokens[label], elapsed = generate_tokens(model, prompt, new_tokens, **cache_kwargs)
            seconds[label].append(elapsed)

    reference = next(iter(tokens.values()))
    mismatched = [label for label, t in tokens.items() if t != reference]
    tokens_per_s = {label: new_tokens / statistics.median(s) for label, s in seconds.items()}
    non_embedding = toygpt.num_parameters(exclude_embeddings=True)  # without wte and wpe
    return config, non_embedding, tokens_per_s, mismatched


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="10m,gpt2", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    torch.set_num_threads(args.threads)
    print(f"greedy, batch 1, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, fp32, "
          f"{args.threads} threads, median of {args.repeats}; torch {torch.__version__}")

    failures = []
    for name in names:
        config, non_embedding, tokens_per_s, mismatched = bench_config(name, args.repeats, args.new_tokens)
        cached, no_cache, gpt2, compiled = tokens_per_s.values()
        print(f"\n{name}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
              f"block_size={config.block_size}, {non_embedding / 1e6:.1f}M non-embedding parameters")
        for label, rate in tokens_per_s.items():
            print(f"  {label:<36} {rate:8.1f} tokens/s")
        vs_gpt2, vs_no_cache = cached / gpt2, cached / no_cache
        print(f"  ToyGPT cache / GPT2LMHeadModel       {vs_gpt2:8.2f}x  (target >= {TARGET_VS_GPT2}x)")
        print(f"  ToyGPT cache / no cache              {vs_no_cache:8.2f}x  (target >= {TARGET_VS_NO_CACHE}x)")
        print(f"  static + compile / dynamic cache     {compiled / cached:8.2f}x")
        print(f"  identical greedy tokens: {'yes' if not mismatched else 'NO: ' + ', '.join(mismatched)}")
        if mismatched:
            failures.append(f"{name}: greedy tokens differ")
        if vs_gpt2 < TARGET_VS_GPT2 or vs_no_cache < TARGET_VS_NO_CACHE:
            failures.append(f"{name}: below target")
    if failures:
        print("\n" + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
