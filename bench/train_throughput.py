"""Training tokens/s of ToyGPT against transformers' GPT2LMHeadModel on the same config, batch and AdamW.

    OMP_NUM_THREADS=2 flock /tmp/toygpt-cpu.lock python bench/train_throughput.py [--steps 8] [--batch-size 8]

Both models are built from one ToyGPTConfig (GPT2Config mapped by convert_gpt2), start from the same weights, see
the same batches and use train.py's optimizer (AdamW, decay on matrices). Steps alternate between the two models
so that CPU contention from other processes hits both alike. Prints tokens/s and the ToyGPT / GPT-2 ratio
(target >= 1.1x). With the 50257-token vocabulary most of a step is the tied lm_head and the cross-entropy, the same
work in both models; `--vocab-size 512` times the transformer blocks alone (a diagnostic, not the target).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_toygpt import ToyGPTConfig  # noqa: E402
from convert_gpt2 import gpt2_config_from_toygpt, toygpt_to_gpt2  # noqa: E402
from modeling_toygpt import ToyGPTForCausalLM  # noqa: E402
from optim import build_optimizer  # noqa: E402
from training_loss import CausalLMLoss  # noqa: E402

CONFIGS = {
    "tiny": ToyGPTConfig.from_preset("tiny").to_dict(),
    "mid": ToyGPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256).to_dict(),
}
TARGET = 1.1


def train_step(model, optimizer, batch, amp_dtype):
    ctx = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else torch.autocast("cpu", enabled=False)
    x, y = batch[:, :-1], batch[:, 1:]
    with ctx:
        if isinstance(model, ToyGPTForCausalLM):  # exactly train.py's call: fused lm_head + cross-entropy
            loss = CausalLMLoss(model)(x, y)
        else:  # GPT2LMHeadModel as its users train it: full logits, then cross-entropy
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def compare(config: ToyGPTConfig, batch_size: int, steps: int, warmup: int, amp_dtype=None) -> dict:
    torch.manual_seed(0)
    toygpt = ToyGPTForCausalLM(config)
    gpt2 = toygpt_to_gpt2(toygpt)  # same weights
    gpt2.config._attn_implementation = "sdpa"
    assert gpt2_config_from_toygpt(config).n_embd == config.n_embd
    opt_args = argparse.Namespace(lr=1e-4, weight_decay=0.1)
    models = {"toygpt": toygpt, "gpt2": gpt2}
    optimizers = {name: build_optimizer(m, opt_args, torch.device("cpu")) for name, m in models.items()}
    seconds = {name: 0.0 for name in models}
    gen = torch.Generator().manual_seed(0)
    for i in range(warmup + steps):
        batch = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), generator=gen)
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for name in order:
            t0 = time.perf_counter()
            train_step(models[name], optimizers[name], batch, amp_dtype)
            if i >= warmup:
                seconds[name] += time.perf_counter() - t0
    tokens = steps * batch_size * config.block_size
    return {name: tokens / s for name, s in seconds.items()}


def head_flop_share(config: ToyGPTConfig, batch_size: int) -> float:
    """Share of a training step's matmul FLOPs spent in the tied lm_head (forward + 2 backward matmuls).

    That part, and the cross-entropy over the vocabulary, is the same computation in both models, so it bounds
    how far apart their throughputs can be.
    """
    n, c, t = batch_size * config.block_size, config.n_embd, config.block_size
    head = 3 * 2 * n * c * config.vocab_size
    blocks = 3 * 2 * n * 12 * c * c * config.n_layer  # qkv, proj and the 4x MLP: 12 C^2 weights per layer
    attention = 3 * 2 * 2 * batch_size * t * t * c * config.n_layer  # q @ k^T and att @ v, full square
    return head / (head + blocks + attention)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both models")
    parser.add_argument("--vocab-size", type=int, help="diagnostic: a small vocabulary (e.g. 512) times the "
                        "transformer blocks without the shared 50257-token head and loss")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, batch {args.batch_size}, {args.steps} timed steps each")
    for name in args.configs:
        overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size, "bos_token_id": 0,
                                                         "eos_token_id": 0}
        config = ToyGPTConfig(**{**CONFIGS[name], **overrides})
        result = compare(config, args.batch_size, args.steps, args.warmup, torch.bfloat16 if args.bf16 else None)
        ratio = result["toygpt"] / result["gpt2"]
        verdict = "ok" if ratio >= TARGET else f"below the {TARGET}x target"
        shape = f"L{config.n_layer} H{config.n_head} C{config.n_embd} T{config.block_size} V{config.vocab_size}"
        print(f"{name:5s} ({shape}): "
              f"ToyGPT {result['toygpt']:,.0f} tok/s, GPT2LMHeadModel {result['gpt2']:,.0f} tok/s, "
              f"ratio {ratio:.2f}x ({verdict}); lm_head = {head_flop_share(config, args.batch_size):.0%} of the "
              "matmul FLOPs, identical in both", flush=True)


if __name__ == "__main__":
    main()
