"""What each int8 rounding choice costs in quality, as llama.cpp measures it (mean KLD against fp32, same top token),
on one trained model, in one run: the levers behind the README's int8 quality table (issue 19 part 2).

    flock -s /tmp/toygpt-cpu.lock python bench/int8_quality_levers.py --fp32-dir out/toygpt \
        [--input ../shared/data/tinyshakespeare.txt] [--chunks 40] [--threads 2]

Each lever is the fp32 model with its weights and activations rounded as that scheme would round them, computed in
fp32: the int8 kernel's int32 sums are exact, so this is the same arithmetic up to fp32 rounding, and it lets schemes
that no int8 kernel here runs (per-block scales, fp32 activations) be measured beside today's. The chunks are
quantization.kld_chunks' (llama-perplexity's: 256 tokens, the second half scored), evenly spaced.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from int8_toygpt import dequantize  # noqa: E402
from toygpt import quantization  # noqa: E402

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def round_rows(w, group=None, clip="absmax"):
    """Symmetric int8 per row (quantization.quantize_rows' scheme), or per `group` columns with fp16 scales (q8_0's
    blocks), or per row with the clip (a fraction of the row's absmax) that minimises the row's squared error."""
    if group:
        g = w.view(w.shape[0], -1, group)
        scale = (g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127).half().float()
        return (torch.round(g / scale).clamp(-127, 127) * scale).view_as(w)
    if clip == "absmax":
        return dequantize(*quantization.quantize_rows(w))  # exactly what quantize.py stores
    absmax = w.abs().amax(1, keepdim=True).clamp(min=1e-12)
    best = absmax / 127
    error = lambda s: ((torch.round(w / s).clamp(-127, 127) * s - w) ** 2).sum(1, keepdim=True)  # noqa: E731
    for fraction in torch.linspace(0.70, 1.0, 31):
        scale = absmax * fraction / 127
        best = torch.where(error(scale) < error(best), scale, best)
    return torch.round(w / best).clamp(-127, 127) * best


def round_tokens(x, passes=1, levels=127):
    """int8_toygpt.IntMMKernel's activation rounding (per token, its own min..max in 2 * levels + 1 steps); passes=2
    rounds what the first rounding left once more (a second matmul), 0 leaves x in fp32."""
    out = torch.zeros_like(x)
    for _ in range(passes):
        rest = x - out
        low, high = rest.aminmax(dim=-1, keepdim=True)
        step = (high - low).clamp(min=1e-30) / (2 * levels + 1)
        out = out + step * (torch.round((rest - low) / step).clamp(0, 2 * levels + 1)) + low
    return out if passes else x


class RoundedLinear(nn.Module):
    def __init__(self, weight, bias, passes):
        super().__init__()
        self.weight, self.bias, self.passes = weight, bias, passes

    def forward(self, x):
        return F.linear(round_tokens(x, self.passes), self.weight, self.bias)


def fold_layer_norm(ln, weight, k=3.0, alpha=0.5):
    """Data-free SmoothQuant: per input channel c, s_c = sqrt(a_c / w_c) (a_c = 3|gain| + |bias|, an activation range
    guessed from the LayerNorm; w_c the column's absmax), the LayerNorm divided by s and the weight's columns
    multiplied by it: the same function in fp32, a different split of the range between the two roundings."""
    a = ln.weight.data.abs() * k + (ln.bias.data.abs() if ln.bias is not None else 0)
    s = a.clamp(min=1e-8) ** alpha / weight.abs().amax(0).clamp(min=1e-8) ** (1 - alpha)
    s = s / s.log().mean().exp()
    ln.weight.data /= s
    if ln.bias is not None:
        ln.bias.data /= s
    return s


def lever(fp32_dir, weights="row", passes=1, head_passes=None, group=None, fold=None):
    """The fp32 model rounded one way: weights "row" (clip absmax), "mse" or None (fp32); activations rounded
    `passes` times (0: fp32), the head's `head_passes` times; fold "blocks" or "blocks+head" (fold_layer_norm)."""
    model = AutoModelForCausalLM.from_pretrained(fp32_dir, trust_remote_code=True).eval()
    rounded = lambda w: w if weights is None else round_rows(w, group, "mse" if weights == "mse" else "absmax")  # noqa
    if fold:
        for block in model.transformer.h:
            block.attn.c_attn.weight.data *= fold_layer_norm(block.ln_1, block.attn.c_attn.weight.data)
            block.mlp.c_fc.weight.data *= fold_layer_norm(block.ln_2, block.mlp.c_fc.weight.data)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, RoundedLinear(rounded(child.weight.data), child.bias, passes))
    embedding = model.transformer.wte.weight.data.clone()
    head = embedding
    if fold == "blocks+head":  # the lookups would divide by s again: here they read the unfolded rows
        head = embedding * fold_layer_norm(model.transformer.ln_f, embedding)
    model.transformer.wte.weight.data = rounded(embedding)
    model.lm_head = RoundedLinear(rounded(head), None, passes if head_passes is None else head_passes)
    return model


LEVERS = {
    "today's scheme (weights per row, activations per token, 8 bits)": {},
    "the head's activations rounded twice": dict(head_passes=2),
    "the head's activations in fp32": dict(head_passes=0),
    "every activation rounded twice": dict(passes=2),
    "weights alone (activations fp32)": dict(passes=0),
    "weights per 32 (fp16 scales), activations per token": dict(group=32),
    "weights per row, MSE-chosen clip": dict(weights="mse"),
    "LayerNorms folded into c_attn, c_fc": dict(fold="blocks"),
    "the same, and ln_f into the head": dict(fold="blocks+head"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32-dir", type=Path, required=True, help="a trained fp32 model dir (train.py)")
    p.add_argument("--input", type=Path, default=SHAKESPEARE, help="the corpus it was trained on (its held-out split)")
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32 = AutoModelForCausalLM.from_pretrained(args.fp32_dir, trust_remote_code=True).eval()
    chunks = quantization.kld_chunks(args.input, min(quantization.KLD_CONTEXT, fp32.config.block_size))
    chunks = chunks[torch.linspace(0, len(chunks) - 1, min(args.chunks, len(chunks))).long()]
    models = {label: lever(args.fp32_dir, **kwargs) for label, kwargs in LEVERS.items()}
    quality = quantization.logit_quality(fp32, models, chunks)
    print(f"{args.fp32_dir}: {len(chunks)} chunks, {quality[next(iter(models))]['positions']} positions scored; "
          f"torch {torch.__version__}")
    print(f"  {'lever':<55} {'mean KLD':>9} {'same top':>9} {'PPL ratio':>10}")
    for label, q in quality.items():
        print(f"  {label:<55} {q['mean_kld']:9.2e} {q['same_top']:9.2%} {q['ppl_ratio']:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
