"""Training throughput and model FLOPs utilisation of ToyGPT on a CUDA GPU, against GPT2LMHeadModel in the same run.

    python bench/gpu.py                                        # CUDA: the 124M gpt2 preset, batch to fill the GPU
    python bench/gpu.py --batch-size 16 --chunk-rows 512 4096  # another batch; the fused loss's chunk sizes to try
    python bench/gpu.py --device cpu --preset tiny --steps 3   # the same code on CPU (a smoke test, no MFU)

Each variant trains a fresh copy of one set of weights with the step train.py runs (train_step below mirrors
training.forward_backward + apply_gradients for one process: the model wrapped in training_loss.CausalLMLoss,
torch.compile'd, bf16 autocast, TF32 matmuls, backward, the loss read back with .item(), grad clip 1.0, fused AdamW
from optim.build_optimizer; one micro-batch of --batch-size x block_size tokens, moved from the CPU as train.py's
stream delivers them). The reference is transformers' GPT2LMHeadModel with the same config and weights
(convert_gpt2.toygpt_to_gpt2), sdpa attention, compiled, trained as its users do: full logits, then cross-entropy,
through the same step and optimizer.
Warmup steps (torch.compile's compilation happens in the first) are not timed; each timed step is measured with
CUDA events and the median is reported.

MFU = model FLOPs per token x tokens/s / the GPU's dense bf16 peak, with nanoGPT's (PaLM's) count:
6N + 12 L H Q T FLOPs per token, N the parameters less the position embeddings (the token embedding is counted:
it is the tied lm_head), L layers, H heads, Q head size, T context. The peak is the datasheet's for the GPU
found by name (H100 SXM/H200 989, H100 NVL 835, H100 PCIe 756, A100 312 TFLOP/s), or --peak-tflops; a
measured 8192^3 bf16 matmul rate is printed beside it. Goal: ToyGPT >= 40% MFU on an H100.

ToyGPT's loss computes lm_head and the cross-entropy in chunks of rows (training_loss.chunk_rows_for: 512 on CPU,
8192 on CUDA); every size in --chunk-rows is timed as its own variant.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toygpt import training_loss  # noqa: E402
import transformers  # noqa: E402
from configuration_toygpt import ToyGPTConfig  # noqa: E402
from toygpt.gpt2_conversion import toygpt_to_gpt2  # noqa: E402
from toygpt.evaluation import autocast  # noqa: E402
from modeling_toygpt import ToyGPTForCausalLM  # noqa: E402
from toygpt.optim import build_optimizer  # noqa: E402

MFU_GOAL = 0.40  # ToyGPT on an H100
# Dense (no sparsity) bf16 tensor-core peaks from the vendor's datasheets, TFLOP/s; the first name found wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


class LogitsLoss(nn.Module):
    """GPT2LMHeadModel's training loss as its users compute it: the full (B, T, vocab) logits, then cross-entropy."""

    vocab = None  # the full vocabulary, as training.apply_gradients reads it (training_loss.CausalLMLoss.vocab)

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets):
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "none known for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{key} datasheet, dense bf16"
    return None, f"none known for {name!r}; pass --peak-tflops"


def flops_per_token(model: ToyGPTForCausalLM) -> tuple[float, int]:
    """(6N + 12 L H Q T, N): nanoGPT's estimate_mfu count, N without the position embeddings."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size, n


def matmul_tflops(device: torch.device, size: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul rate on random data (median of `reps` timed products after warmup)."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * size ** 3 / statistics.median(times) / 1e12


def train_step(step_model, optimizer, batches, device, amp_dtype, grad_clip: float = 1.0) -> float:
    """toygpt/training.py's forward_backward + apply_gradients for one process and one micro-batch (training also
    all-reduces the loss and checks that it is finite between the two)."""
    batch = next(batches).to(device, non_blocking=True)  # (batch_size, block_size + 1)
    with autocast(device, amp_dtype):
        loss = step_model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    train_loss = loss.detach().item()
    torch.nn.utils.clip_grad_norm_(step_model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return train_loss


def time_steps(step_model, optimizer, batches, device, amp_dtype, warmup: int, steps: int) -> dict:
    """`warmup` untimed steps, then `steps` timed ones; median seconds per step and more."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        train_step(step_model, optimizer, batches, device, amp_dtype)
    warmup_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(train_step(step_model, optimizer, batches, device, amp_dtype))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            losses.append(train_step(step_model, optimizer, batches, device, amp_dtype))
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "min_step_s": min(times), "warmup_s": warmup_s,
            "last_loss": losses[-1]}


def run_variant(name, loss_module, params_model, device, args, amp_dtype, batch_pool) -> dict:
    """Fresh optimizer, compiled (unless --no-compile) loss module, timed; errors are reported, not raised."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = {"name": name}
    try:
        optimizer = build_optimizer(params_model, device, optimizer="adamw", lr=1e-4, weight_decay=0.1)
        step_model = torch.compile(loss_module) if args.compile else loss_module
        result.update(time_steps(step_model, optimizer, itertools.cycle(batch_pool), device, amp_dtype,
                                 args.warmup, args.steps))
        if device.type == "cuda":
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    except torch.OutOfMemoryError:
        result["error"] = "out of GPU memory (try a smaller --batch-size)"
    except Exception as err:  # a compile failure in one variant must not lose the others
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return result


def default_batch_size(device: torch.device) -> int:
    """The batch that fills the GPU with room for GPT2LMHeadModel's full logits (32 on an 80 GB card)."""
    if device.type != "cuda":
        return 4
    gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return 64 if gib >= 120 else 32 if gib >= 60 else 16 if gib >= 30 else 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="gpt2", choices=["gpt2", "tiny"])
    p.add_argument("--batch-size", type=int, help="windows per step (default: fills the GPU; 4 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--chunk-rows", type=int, nargs="+",
                   help=f"ToyGPT loss chunk sizes to time (default: {training_loss.CUDA_CHUNK_ROWS} "
                        f"{training_loss.CHUNK_ROWS} on CUDA, "
                        f"{training_loss.CHUNK_ROWS} 128 on CPU); the first is compared with GPT2LMHeadModel")
    p.add_argument("--no-gpt2", action="store_true", help="skip the GPT2LMHeadModel reference")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on for CUDA, off for CPU)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, overriding the datasheet table")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no further chunk-size variant once this many seconds have passed")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: error: --device cuda but no CUDA GPU is available; use --device cpu", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    args.batch_size = args.batch_size or default_batch_size(device)
    chunks = args.chunk_rows or ([training_loss.CUDA_CHUNK_ROWS, training_loss.CHUNK_ROWS] if device.type == "cuda"
                                 else [training_loss.CHUNK_ROWS, 128])
    started = time.perf_counter()

    torch.manual_seed(0)
    toygpt = ToyGPTForCausalLM(ToyGPTConfig.from_preset(args.preset)).train()
    gpt2 = toygpt_to_gpt2(toygpt)  # same weights
    gpt2.config._attn_implementation = "sdpa"
    config = toygpt.config
    per_token, n_params = flops_per_token(toygpt)
    tokens_per_step = args.batch_size * config.block_size
    gen = torch.Generator().manual_seed(0)
    batch_pool = [torch.randint(0, config.vocab_size, (args.batch_size, config.block_size + 1), generator=gen)
                  for _ in range(4)]
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    measured_peak = matmul_tflops(device) if device.type == "cuda" else None
    head = (f"device {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"preset {args.preset} ({n_params / 1e6:.2f}M params without wpe), {args.dtype} autocast"
            f"{', TF32' if device.type == 'cuda' else ''}{', torch.compile' if args.compile else ''}; "
            f"batch {args.batch_size} x {config.block_size} = {tokens_per_step:,} tokens/step; "
            f"{args.warmup} warmup + {args.steps} timed steps")
    print(head, flush=True)
    print(f"peak: {f'{peak:.0f} TFLOP/s' if peak else 'n/a'} ({peak_source})"
          + (f"; measured bf16 matmul 8192^3: {measured_peak:.0f} TFLOP/s" if measured_peak else "")
          + f"; model FLOPs/token 6N + 12LHQT = {per_token / 1e6:.1f}M", flush=True)

    def finish(result: dict) -> dict:
        if "step_s" in result:
            result["tokens_per_s"] = tokens_per_step / result["step_s"]
            result["mfu"] = per_token * result["tokens_per_s"] / (peak * 1e12) if peak else None
        print(f"  {result_line(result)}", flush=True)
        return result

    def toygpt_variant(chunk_rows: int) -> dict:
        model = copy.deepcopy(toygpt).to(device)
        loss_model = training_loss.CausalLMLoss(model, chunk_rows=chunk_rows)
        return finish(run_variant(f"ToyGPT, chunk {chunk_rows}", loss_model, model,
                                  device, args, amp_dtype, batch_pool))

    results = [toygpt_variant(chunks[0])]
    if not args.no_gpt2:
        model = copy.deepcopy(gpt2).to(device)
        results.append(finish(run_variant(f"GPT2LMHeadModel ({model.config._attn_implementation})",
                                          LogitsLoss(model), model, device, args, amp_dtype, batch_pool)))
        del model
    for chunk_rows in chunks[1:]:
        if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
            results.append(finish({"name": f"ToyGPT, chunk {chunk_rows}", "error": "skipped: --time-budget-s spent"}))
            continue
        results.append(toygpt_variant(chunk_rows))

    summary = summarize(results, args, peak)
    print("\n" + head)
    print("\n".join(summary["lines"]), flush=True)
    if args.json:
        record = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
                  "preset": args.preset, "batch_size": args.batch_size, "block_size": config.block_size,
                  "tokens_per_step": tokens_per_step, "flops_per_token": per_token, "peak_tflops": peak,
                  "measured_matmul_tflops": measured_peak, "compile": args.compile, "dtype": args.dtype,
                  "results": results, **summary}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0 if "step_s" in results[0] else 1


def result_line(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:<28} {r['error']}"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else "-"
    return (f"{r['name']:<28} {r['step_s'] * 1e3:9.1f} ms {r['tokens_per_s']:12,.0f} tok/s {mfu:>10}  "
            f"{mem:>15}  {r['warmup_s']:16.1f} s  {r['last_loss']:.3f}")


def summarize(results: list[dict], args, peak) -> dict:
    """The table printed last, and the figures gpu_check.sh reads from --json."""
    lines = [(f"{'variant':<28} {'median step':>12} {'tokens/s':>18} {'MFU':>10}  {'peak memory':>15}  "
              f"{'warmup (compile)':>18}  last loss")]
    lines += [result_line(r) for r in results]
    ok = [r for r in results if "step_s" in r]
    toy, ref = results[0], next((r for r in results if r["name"].startswith("GPT2")), None)
    out = {"toygpt_tokens_per_s": toy.get("tokens_per_s"), "toygpt_mfu": toy.get("mfu")}
    if ref is not None and "step_s" in toy and "step_s" in ref:
        out["ratio_vs_gpt2"] = toy["tokens_per_s"] / ref["tokens_per_s"]
        lines.append(f"ToyGPT / GPT2LMHeadModel: {out['ratio_vs_gpt2']:.2f}x tokens/s")
    chunked = [r for r in ok if r["name"].startswith("ToyGPT")]
    if len(chunked) > 1:
        best = max(chunked, key=lambda r: r["tokens_per_s"])
        out["best_chunk"] = best["name"]
        gain = best["tokens_per_s"] / chunked[0]["tokens_per_s"] - 1
        default = chunked[0]["name"].removeprefix("ToyGPT, ")
        lines.append(f"fastest loss chunk: {best['name'].removeprefix('ToyGPT, ')} rows"
                     + (f", {gain:+.1%} tokens/s over {default}" if best is not chunked[0] else " (the default)"))
    if toy.get("mfu") is not None:
        verdict = "met" if toy["mfu"] >= MFU_GOAL else "NOT met"
        lines.append(f"MFU goal >= {MFU_GOAL:.0%} on an H100: ToyGPT {toy['mfu']:.1%} ({verdict}; peak {peak:.0f} "
                     "TFLOP/s)")
    else:
        lines.append(f"MFU goal >= {MFU_GOAL:.0%} on an H100: n/a here (no peak for this device)")
    out["lines"] = lines
    return out


if __name__ == "__main__":
    sys.exit(main())
