"""The training loss: ToyGPT's lm_head and the cross-entropy, computed in chunks of rows, never as whole logits.

Training code (train.py, the benches) wraps the model in `CausalLMLoss`; DDP and torch.compile wrap that, so one
forward is the whole loss. It calls the model's body for the hidden states and applies the head itself:

    loss_model = CausalLMLoss(model)
    loss = loss_model(batch[:, :-1], batch[:, 1:])          # mean over targets != -100; .backward() as usual
    total = loss_model(x, y, reduction="sum")               # under no_grad: evaluation.py's summed loss

With gradients enabled and a plain Linear head, lm_head and the loss are fused (FusedLinearCrossEntropy): the
(tokens, vocab) logits and their gradient never exist at once, at the FLOPs of the plain path. Otherwise (no_grad,
or an int8 head) the head runs on CHUNK_ROWS rows at a time. Either way the memory of the head is one chunk's
(CHUNK_ROWS, vocab) logits, not (B * T, vocab): a long context costs what it costs the blocks.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

CHUNK_ROWS = 512  # rows of hidden states per chunk: a (512, vocab) fp32 logits block is ~100 MB at 50257


class FusedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(h @ W.T, targets) for training, chunked over rows, gradients computed in the same pass.

    For each chunk of rows: logits = h_chunk @ W.T, the summed loss, then (in place) grad_logits =
    (softmax - onehot) * scale, grad_h_chunk = grad_logits @ W and grad_W += grad_logits.T @ h_chunk. The full
    (N, vocab) logits and their gradient never exist at once (~800 MB at batch 8 x 256 with GPT-2's vocabulary),
    the FLOPs are those of the plain path. backward only scales the stored gradients (Liger-Kernel's scheme).
    Loss = summed loss / (number of targets != ignore_index), as transformers' ForCausalLMLoss.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index=-100, chunk_rows=None):
        # h (N, C), weight (V, C), targets (N,) long.
        chunk_rows = chunk_rows or CHUNK_ROWS
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        valid = targets != ignore_index
        count = valid.sum()
        scale = 1.0 / count.float().clamp(min=1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(device_type, enabled=False):  # explicit dtypes below; fp32 softmax and accumulation
            w = weight.to(dtype)
            for start in range(0, h.size(0), chunk_rows):
                hc = h[start:start + chunk_rows].to(dtype)
                v = valid[start:start + chunk_rows]
                t = targets[start:start + chunk_rows].masked_fill(~v, 0)[:, None]  # any in-range index; row scale is 0
                logits = (hc @ w.t()).float()  # (n, V)
                top = logits.amax(dim=1, keepdim=True)
                target_logit = logits.gather(1, t)
                logits.sub_(top).exp_()
                total = logits.sum(dim=1, keepdim=True)
                loss_sum += ((top + total.log() - target_logit).squeeze(1) * v).sum()
                if not (need_h or need_w):
                    continue
                row_scale = v[:, None] * scale  # (n, 1): 0 for ignored rows
                logits.mul_(row_scale / total)  # softmax * scale
                logits.scatter_add_(1, t, -row_scale)  # - onehot * scale
                g = logits.to(dtype)
                if need_h:
                    grad_h[start:start + chunk_rows] = g @ w
                if need_w:
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return loss_sum / count  # 0 / 0 = nan when every target is ignored, as F.cross_entropy's mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * grad_output.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy_sum(h, head, targets, ignore_index=-100, chunk_rows=CHUNK_ROWS):
    """sum(cross_entropy(head(h), targets)) over rows, computing head's logits CHUNK rows at a time (no autograd
    saving: meant for no_grad). h (N, C), targets (N,); rows whose target is ignore_index count nothing."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.size(0), chunk_rows):
        logits = head(h[start:start + chunk_rows]).float()  # (n, V)
        total += F.cross_entropy(logits, targets[start:start + chunk_rows], ignore_index=ignore_index, reduction="sum")
    return total


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy of a ToyGPTForCausalLM from its hidden states and its head, never its full logits.

    forward(input_ids (B, T), targets (B, T)): targets[b, t] is the token after input_ids[b, t] (-100 = ignore).
    reduction "mean" (the training loss) or "sum" (evaluation: evaluation.py divides by tokens and characters).
    """

    def __init__(self, model, ignore_index=-100):
        super().__init__()
        self.model = model
        self.ignore_index = ignore_index

    def forward(self, input_ids, targets, reduction="mean"):
        h = self.model.transformer(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, C)
        h, targets = h.flatten(0, 1), targets.flatten().to(h.device)  # (N, C), (N,)
        head = self.model.lm_head
        if torch.is_grad_enabled() and isinstance(head, nn.Linear) and head.bias is None:
            loss = FusedLinearCrossEntropy.apply(h, head.weight, targets, self.ignore_index)  # the mean
            return loss if reduction == "mean" else loss * (targets != self.ignore_index).sum()
        total = chunked_cross_entropy_sum(h, head, targets, self.ignore_index)
        return total if reduction == "sum" else total / (targets != self.ignore_index).sum()
