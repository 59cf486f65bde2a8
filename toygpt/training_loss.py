"""The training loss: ToyGPT's lm_head and the cross-entropy, computed in chunks of rows, never as whole logits.

Training code (train.py, the benches) wraps the model in `CausalLMLoss`; DDP and torch.compile wrap that, so one
forward is the whole loss. It calls the model's body for the hidden states and applies the head itself:

    loss_model = CausalLMLoss(model)
    loss = loss_model(batch[:, :-1], batch[:, 1:])          # mean over targets != -100; .backward() as usual
    total = loss_model(x, y, reduction="sum")               # under no_grad: toygpt/evaluation.py's summed loss

With a plain Linear head, lm_head and the loss are fused (linear_cross_entropy; FusedLinearCrossEntropy with
gradients enabled): the (tokens, vocab) logits and their gradient never exist at once, at the FLOPs of the plain path,
and every chunk's logits reuse one buffer. Any other head (int8) runs on chunks of rows too. Either way the memory
of the head is one chunk's (chunk_rows, vocab) logits, not (B * T, vocab): a long context costs what it costs the
blocks.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

# Rows of hidden states per chunk of the head. CPU: a (512, 50257) fp32 logits block is ~100 MB. CUDA: on an H200
# (bench/gpu.py, 124M, bf16, compiled, batch 64 x 1024) 8192-row chunks ran 483K tokens/s, 4096 rows 475K; at batch
# 32, 4096 rows 448K and 512 rows 412K.
CHUNK_ROWS = 512
CUDA_CHUNK_ROWS = 8192


def chunk_rows_for(device: torch.device) -> int:
    return CUDA_CHUNK_ROWS if device.type == "cuda" else CHUNK_ROWS


def linear_cross_entropy(h, weight, targets, ignore_index=-100, chunk_rows=None, logit_offset=None,
                         need_h=False, need_w=False):
    """The summed cross_entropy(h @ W.T, targets) chunk_rows rows at a time, and with need_h/need_w the gradients
    of the mean loss for h and W computed in the same pass (FusedLinearCrossEntropy's forward, and the eval's head).
    h (N, C), weight (V, C), targets (N,) long; logit_offset (V,) is added inside the normaliser only (corpus_vocab's
    u counts once per unseen id). Returns (loss_sum, count of targets != ignore_index, grad_h or None, grad_w or None).
    """
    chunk_rows = chunk_rows or chunk_rows_for(h.device)
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # softmax and sums: fp32 at least
    valid = targets != ignore_index
    count = valid.sum()
    scale = 1.0 / count.to(acc).clamp(min=1)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
    loss_sum = torch.zeros((), dtype=acc, device=h.device)
    if logit_offset is not None:  # corpus_vocab's: one nonzero column (u); add just the columns that need it
        offset_columns = logit_offset.nonzero().squeeze(1)
        offset_values = logit_offset[offset_columns].to(acc)
    # One logits buffer for every chunk: a fresh (chunk_rows, V) block each time costs page faults (CPU: the
    # tiny preset's logits product took 12 ms instead of 5).
    buffer = torch.empty(min(chunk_rows, h.size(0)), weight.size(0), dtype=acc, device=h.device)
    with torch.autocast(device_type, enabled=False):  # explicit dtypes below; fp32 softmax and accumulation
        w = weight.to(dtype)
        for start in range(0, h.size(0), chunk_rows):
            hc = h[start:start + chunk_rows].to(dtype)
            v = valid[start:start + chunk_rows]
            t = targets[start:start + chunk_rows].masked_fill(~v, 0)[:, None]  # any in-range index; row scale is 0
            logits = buffer[:hc.size(0)]  # (n, V)
            if dtype == acc:
                torch.mm(hc, w.t(), out=logits)
            else:
                logits.copy_(hc @ w.t())
            target_logit = logits.gather(1, t)
            if logit_offset is not None:  # in the normaliser only (corpus_vocab: u counts once per unseen id)
                logits[:, offset_columns] += offset_values
            top = logits.amax(dim=1, keepdim=True)
            logits.sub_(top).exp_()
            total = logits.sum(dim=1, keepdim=True)
            loss_sum += ((top + total.log() - target_logit).squeeze(1) * v).sum()
            if not (need_h or need_w):
                continue
            row_scale = v[:, None] * scale  # (n, 1): 0 for ignored rows
            logits.mul_(row_scale / total)  # softmax * scale
            logits.scatter_add_(1, t, -row_scale)  # - onehot * scale
            g = logits.to(dtype)
            if need_h:  # under autocast h may be fp32 (layer_norm's output) while g and w are bf16
                if g.dtype == grad_h.dtype:
                    torch.mm(g, w, out=grad_h[start:start + chunk_rows])
                else:
                    grad_h[start:start + chunk_rows] = g @ w
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w += (g.t() @ hc).to(acc)
    return loss_sum, count, grad_h, grad_w


class FusedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(h @ W.T, targets) for training, chunked over rows, gradients computed in the same pass.

    For each chunk of rows: logits = h_chunk @ W.T, the summed loss, then (in place) grad_logits =
    (softmax - onehot) * scale, grad_h_chunk = grad_logits @ W and grad_W += grad_logits.T @ h_chunk. The full
    (N, vocab) logits and their gradient never exist at once (~800 MB at batch 8 x 256 with GPT-2's vocabulary),
    the FLOPs are those of the plain path. backward only scales the stored gradients (Liger-Kernel's scheme).
    Loss = summed loss / (number of targets != ignore_index), as transformers' ForCausalLMLoss.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index=-100, chunk_rows=None, logit_offset=None):
        # h (N, C), weight (V, C), targets (N,) long.
        loss_sum, count, grad_h, grad_w = linear_cross_entropy(h, weight, targets, ignore_index, chunk_rows,
                                                               logit_offset, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return loss_sum / count  # 0 / 0 = nan when every target is ignored, as F.cross_entropy's mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * grad_output.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy_sum(h, head, targets, ignore_index=-100, chunk_rows=None, logit_offset=None):
    """sum(cross_entropy(head(h), targets)) over rows, computing head's logits chunk_rows at a time (no autograd
    saving: meant for no_grad). h (N, C), targets (N,); rows whose target is ignore_index count nothing.
    logit_offset (V,): added inside the normaliser only, as in FusedLinearCrossEntropy."""
    chunk_rows = chunk_rows or chunk_rows_for(h.device)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=h.device)
    for start in range(0, h.size(0), chunk_rows):
        logits, t = head(h[start:start + chunk_rows]).to(acc), targets[start:start + chunk_rows]  # (n, V), (n,)
        if logit_offset is not None:  # cross_entropy subtracts the offset target logit: add that back
            logits = logits + logit_offset.to(acc)
            total += logit_offset[t[t != ignore_index]].sum().to(acc)
        total += F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
    return total


def clip_gradients(model, parameters, max_norm: float, vocab=None) -> None:
    """After backward, the gradients the optimizer applies: those of the full-vocabulary model (with a
    corpus_vocab.CorpusVocab, u's summed gradient becomes one unseen row's), clipped to `max_norm` by the full model's
    norm (0: not clipped). `model` is the one the gradients are in (the compact one with `vocab`)."""
    params = [p for p in parameters if p.grad is not None]
    if vocab is not None:
        vocab.to_per_row_gradient(model)
    if max_norm > 0:
        norm = (vocab.grad_norm(model, params) if vocab is not None
                else torch.nn.utils.get_total_norm([p.grad for p in params]))
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy of a ToyGPTForCausalLM from its hidden states and its head, never its full logits.

    forward(input_ids (B, T), targets (B, T)): targets[b, t] is the token after input_ids[b, t] (-100 = ignore).
    reduction "mean" (the training loss) or "sum" (evaluation: toygpt/evaluation.py divides by tokens and characters).
    """

    def __init__(self, model, ignore_index=-100, chunk_rows=None, vocab=None):
        super().__init__()
        self.model = model
        self.ignore_index = ignore_index
        self.chunk_rows = chunk_rows  # None: chunk_rows_for(the device)
        self.vocab = vocab  # a corpus_vocab.CorpusVocab: `model` is the compact model, ids arrive as GPT-2 ids
        self.training = model.training  # the model's mode, not nn.Module's default (True): evaluate() restores it

    def forward(self, input_ids, targets, reduction="mean"):
        offset = None
        if self.vocab is not None:
            input_ids, targets, offset = self.vocab.compact(input_ids), self.vocab.compact(targets), self.vocab.logit_offset
        h = self.model.transformer(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, C)
        h, targets = h.flatten(0, 1), targets.flatten().to(h.device)  # (N, C), (N,)
        head = self.model.lm_head
        if isinstance(head, nn.Linear) and head.bias is None:
            if torch.is_grad_enabled():
                loss = FusedLinearCrossEntropy.apply(h, head.weight, targets, self.ignore_index, self.chunk_rows,
                                                     offset)
                return loss if reduction == "mean" else loss * (targets != self.ignore_index).sum()
            total, count, _, _ = linear_cross_entropy(h, head.weight, targets, self.ignore_index, self.chunk_rows,
                                                      offset)
            return total if reduction == "sum" else total / count
        total = chunked_cross_entropy_sum(h, head, targets, self.ignore_index, self.chunk_rows, offset)
        return total if reduction == "sum" else total / (targets != self.ignore_index).sum()
