"""Training tokens/s: ToyGPT with the corpus vocabulary, ToyGPT with the full vocabulary, GPT2LMHeadModel.

    OMP_NUM_THREADS=2 flock -x /tmp/toygpt-cpu.lock python bench/train_throughput.py [--steps 8] [--batch-size 8]
                                                                                     [--optimizer adamw|muon]

All three start from one config and see the same batches: real training windows of --input (default: tiny
Shakespeare, else the default corpus), batch x 256 tokens. Each step is train.py's: the loss's backward, then
training.apply_gradients (clipping at 1.0 by the full model's norm, the optimizer step, zero_grad); the loss is
training_loss.CausalLMLoss for ToyGPT, bench/gpu.py's LogitsLoss for GPT2LMHeadModel:
- "corpus": --vocab corpus, the rows of the ids the training split uses plus one shared row (toygpt/corpus_vocab.py), with
  --optimizer (adamw or muon);
- "full": the full 50257-row head (what train.py ran before the corpus vocabulary), AdamW;
- GPT2LMHeadModel as its users train it: full logits, then cross-entropy; AdamW.
Models take turns step by step, so CPU contention hits them alike. Prints tokens/s and the ratios corpus / full
(target >= 2.5x) and full / GPT2LMHeadModel (target >= 1.1x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toygpt import corpus  # noqa: E402
from toygpt.stream import TrainWindows  # noqa: E402
from configuration_toygpt import ToyGPTConfig  # noqa: E402
from toygpt.gpt2_conversion import toygpt_to_gpt2  # noqa: E402
from toygpt.corpus_vocab import CorpusVocab  # noqa: E402
from modeling_toygpt import ToyGPTForCausalLM  # noqa: E402
from toygpt.optim import build_optimizer  # noqa: E402
from toygpt.training import apply_gradients  # noqa: E402
from toygpt.training_loss import CausalLMLoss  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parent))  # after the repository root, as bench/quantize.py does
from gpu import LogitsLoss  # noqa: E402  (bench/gpu.py: GPT2LMHeadModel's full logits, then cross-entropy)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
CONFIGS = {
    "tiny": ToyGPTConfig.from_preset("tiny").to_dict(),
    "mid": ToyGPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256).to_dict(),
}
TARGET_CORPUS_VS_FULL, TARGET_FULL_VS_GPT2 = 2.5, 1.1


class TrainStep:
    """One training step: the loss's backward, then training.apply_gradients (clip at 1.0, step, zero_grad)."""

    def __init__(self, loss_model, optimizer):
        self.loss_model, self.optimizer = loss_model, optimizer

    def __call__(self, batch):
        self.loss_model(batch[:, :-1], batch[:, 1:]).backward()
        apply_gradients(self.loss_model, self.optimizer, 1.0)


def build_steps(config: ToyGPTConfig, vocab: CorpusVocab, optimizer: str) -> dict:
    torch.manual_seed(0)
    full = ToyGPTForCausalLM(config).train()
    gpt2 = toygpt_to_gpt2(full).train()  # same weights
    gpt2.config._attn_implementation = "sdpa"
    compact = ToyGPTForCausalLM(vocab.compact_config(config)).train()
    vocab.init_compact(compact)
    cpu = torch.device("cpu")

    def optimizer_of(model, name):
        return build_optimizer(model, cpu, optimizer=name, lr=1e-4, weight_decay=0.1)

    return {
        f"ToyGPT, corpus vocabulary, {optimizer}": TrainStep(
            CausalLMLoss(compact, vocab=vocab), optimizer_of(compact, optimizer)),
        "ToyGPT, full vocabulary, adamw": TrainStep(CausalLMLoss(full), optimizer_of(full, "adamw")),
        "GPT2LMHeadModel, adamw": TrainStep(LogitsLoss(gpt2), optimizer_of(gpt2, "adamw")),
    }


def compare(steps_by_name: dict, batches, steps: int, warmup: int, tokens_per_batch: int) -> dict:
    seconds = {name: 0.0 for name in steps_by_name}
    for i in range(warmup + steps):
        batch = next(batches)
        order = list(steps_by_name) if i % 2 == 0 else list(reversed(steps_by_name))
        for name in order:
            t0 = time.perf_counter()
            steps_by_name[name](batch)
            if i >= warmup:
                seconds[name] += time.perf_counter() - t0
    return {name: steps * tokens_per_batch / s for name, s in seconds.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="for the corpus variant")
    parser.add_argument("--input", type=Path, default=SHAKESPEARE if SHAKESPEARE.is_file() else None)
    args = parser.parse_args(argv)
    path = args.input or corpus.default_corpus_path()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, batch {args.batch_size}, {args.steps} timed steps each; "
          f"windows of {path.name}")
    vocabs = {}  # vocab_size -> (CorpusVocab, seconds): the configs share one vocabulary, tokenized once
    for name in args.configs:
        config = ToyGPTConfig(**CONFIGS[name])
        if config.vocab_size not in vocabs:
            vocabs[config.vocab_size] = CorpusVocab.of_training_split(path, config.vocab_size)
        vocab, seconds = vocabs[config.vocab_size]
        stream = TrainWindows(path, config.block_size)
        result = compare(build_steps(config, vocab, args.optimizer), stream.batches(args.batch_size), args.steps,
                         args.warmup, args.batch_size * config.block_size)
        stream.close()
        corpus_rate, full_rate, gpt2_rate = result.values()
        shape = f"L{config.n_layer} H{config.n_head} C{config.n_embd} T{config.block_size}"
        print(f"{name} ({shape}; the training split uses {vocab.n_seen:,} of {vocab.vocab_size:,} ids, found in "
              f"{seconds:.1f} s):")
        for label, rate in result.items():
            print(f"  {label:<40} {rate:9,.0f} tokens/s")
        print(f"  corpus / full vocabulary     {corpus_rate / full_rate:5.2f}x  (target >= {TARGET_CORPUS_VS_FULL}x)")
        print(f"  full / GPT2LMHeadModel       {full_rate / gpt2_rate:5.2f}x  (target >= {TARGET_FULL_VS_GPT2}x)",
              flush=True)


if __name__ == "__main__":
    main()
