"""ToyGPT: the GPT-2 decoder as nanoGPT writes it, shaped as a transformers model.

Shapes: B batch, T new tokens, P tokens already in the KV cache, S = P + T keys, C n_embd, nh heads, hs = C // nh.
"""

import copy
import functools
import math
import os
import threading
import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from .configuration_toygpt import ToyGPTConfig
except ImportError:  # imported as a plain module (repo checkout, tests)
    from configuration_toygpt import ToyGPTConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # scaled init, see _init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs): past keys/values + these T
        # attn_mask is None exactly when plain top-left causal masking is right (no padding, no offset).
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T > 1,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # scaled init, see _init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, cache=cache)
        x = x + self.mlp(self.ln_2(x))
        return x


def build_attention_mask(attention_mask, T, P):
    """None when SDPA's built-in causal mask is right; else a bool (B, 1, T, S) mask, True = may attend.

    attention_mask: (B, S) with 1 for real tokens and 0 for (left) padding, or None.
    """
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and (P == 0 or T == 1):
        return None  # no padding; and either no cache offset, or one query that may see every key
    S = P + T
    device = attention_mask.device if attention_mask is not None else None
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=P)  # query i sees keys <= P + i
    mask = causal[None, None]  # (1, 1, T, S)
    if has_padding:
        mask = mask & attention_mask[:, None, None, -S:].bool()  # (B, 1, T, S)
        # A padding query sees no key at all; let it see every key so softmax stays finite. Its output is never used.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class ToyGPTPreTrainedModel(PreTrainedModel):
    config_class = ToyGPTConfig
    config: ToyGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02) for matrices and embeddings, zeros for biases, ones for LayerNorm gains;
        # residual output projections scaled by 1/sqrt(2 * n_layer) (two residual adds per block).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class ToyGPTModel(ToyGPTPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        if config.quantization:  # an int8 model dir (quantize.py): see the int8 section at the end of this file
            check_quantization(config)
            use_int8_modules(self)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def forward(
        self,
        input_ids=None,
        cache=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        B, T, C = inputs_embeds.size()

        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputing a block would write its keys/values into the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        P = cache.get_seq_length() if cache is not None else 0
        if P + T > self.config.block_size:
            raise ValueError(
                f"Sequence length {P + T} ({P} cached + {T} new tokens) exceeds the model's context "
                f"block_size={self.config.block_size}. Truncate the input (keep the last {self.config.block_size} "
                "tokens) or lower max_new_tokens."
            )

        if position_ids is None:
            if attention_mask is not None:
                # Left padding: count positions from each row's first real token, as if it were alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(P, P + T, device=inputs_embeds.device).unsqueeze(0)  # (1, T)

        x = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)
        attn_mask = build_attention_mask(attention_mask, T, P)
        all_hidden_states = () if output_hidden_states else None
        for block in self.h:
            if output_hidden_states:
                all_hidden_states += (x,)
            x = block(x, attn_mask=attn_mask, cache=cache)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden_states += (x,)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache, hidden_states=all_hidden_states)


FUSED_CE_CHUNK_ROWS = 512  # rows of hidden states per chunk: a (512, vocab) fp32 logits block is ~100 MB at 50257


class FusedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(h @ W.T, targets) for training, chunked over rows, gradients computed in the same pass.

    For each chunk of rows: logits = h_chunk @ W.T, the summed loss, then (in place) grad_logits =
    (softmax - onehot) * scale, grad_h_chunk = grad_logits @ W and grad_W += grad_logits.T @ h_chunk. The full
    (N, vocab) logits and their gradient never exist at once (~800 MB at batch 8 x 256 with GPT-2's vocabulary),
    the FLOPs are those of the plain path. backward only scales the stored gradients (Liger-Kernel's scheme).
    Loss = summed loss / (number of targets != ignore_index), or / num_items_in_batch when given, as
    transformers' ForCausalLMLoss.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index=-100, num_items_in_batch=None, chunk_rows=None):
        # h (N, C), weight (V, C), targets (N,) long.
        chunk_rows = chunk_rows or FUSED_CE_CHUNK_ROWS
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        valid = targets != ignore_index
        count = valid.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=h.device)
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
        return grad_h, grad_w, None, None, None, None


class ToyGPTForCausalLM(ToyGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = ToyGPTModel(config)
        if config.quantization:  # int8: the tied head reads wte's int8 rows itself, so transformers has nothing to tie
            self._tied_weights_keys = {}
            if config.tie_word_embeddings:
                self.lm_head = Int8TiedLMHead(self.transformer)
            else:
                self.lm_head = Int8Linear(config.n_embd, config.vocab_size, bias=False)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids=None,
        cache=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """labels: the inputs (position t predicts token t+1), or kwargs shift_labels: position t's target, already
        shifted; -100 is ignored, the loss is the mean over the rest (transformers' ForCausalLMLoss).

        In training (model.train() and gradients enabled) with labels or shift_labels, lm_head and the loss are
        fused (FusedLinearCrossEntropy) and the output's logits are None; in eval or under no_grad the full logits
        are returned with the same loss.
        """
        out = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        x = out.last_hidden_state  # (B, T, C)
        shift_labels = kwargs.get("shift_labels")
        has_targets = labels is not None or shift_labels is not None
        if (has_targets and self.training and torch.is_grad_enabled() and not logits_to_keep
                and type(self.lm_head) is nn.Linear and self.lm_head.bias is None):
            # Training: fused chunked lm_head + cross-entropy, the (B, T, vocab) logits are never built, so the
            # output's logits are None. Same loss and gradients as the path below.
            if shift_labels is None:  # labels are the inputs: position t predicts token t+1
                x, shift_labels = x[:, :-1], labels[..., 1:]
            loss = FusedLinearCrossEntropy.apply(
                x.reshape(-1, x.size(-1)),
                self.lm_head.weight,
                shift_labels.reshape(-1).to(x.device),
                kwargs.get("ignore_index", -100),
                kwargs.get("num_items_in_batch"),
            )
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=out.cache, hidden_states=out.hidden_states)
        if logits_to_keep:  # generate() only needs the last position's logits
            x = x[:, -logits_to_keep:, :]
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if has_targets:
            # labels are the inputs: position t predicts token t+1 (or shift_labels[t] is position t's target,
            # already shifted); -100 is ignored.
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states
        )


# ================================================================================================================
# int8 weights: what quantize.py writes, and what a model dir whose config.quantization is set holds.
#
# Scheme: each Linear of the blocks, and the token embedding (which is also the tied lm_head), keeps int8 weights
# with one fp32 scale per output row (symmetric, w ~= q * scale, q in [-127, 127]); LayerNorms, biases and
# positions stay fp32. Activations are quantized per call at run time (dynamic): no calibration data.
# state_dict() and model.safetensors hold `<module>.weight` (int8) + `<module>.weight_scale` (fp32), nothing else.
# Compute: PyTorch's fbgemm/x86 int8 GEMM on CPU (torch.ops.quantized), with weights packed on first use; the
# packed copy then replaces the int8 rows in memory (release_file_pages), so a loaded model holds each weight once. Where
# those ops are missing (or TOYGPT_INT8_KERNEL=fallback, or weights are not on the CPU) the weights are
# dequantized to fp32 instead, with a warning: same results up to activation rounding, at fp32 speed and memory.
# ================================================================================================================

INT8_METHOD = "toygpt-int8"
INT8_SCHEME = {
    "method": INT8_METHOD,
    "weights": "int8 per-output-channel symmetric (one fp32 scale per row)",
    "activations": "dynamic int8 (quantized per call, no calibration data)",
    "modules": [
        "transformer.h.*.attn.c_attn",
        "transformer.h.*.attn.c_proj",
        "transformer.h.*.mlp.c_fc",
        "transformer.h.*.mlp.c_proj",
        "transformer.wte (stored once, shared with lm_head)",
    ],
    "fp32": ["transformer.wpe", "LayerNorms", "biases"],
}


def quantize_rows(weight):
    """Symmetric per-row int8: (q (R, K) int8, scale (R,) fp32) with weight ~= q * scale[:, None]."""
    scale = (weight.detach().float().abs().amax(dim=1) / 127).clamp(min=1e-12)  # an all-zero row takes any scale
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q, scale):
    return q.float() * scale.float()[:, None]


def release_file_pages(tensor):
    """Let the OS drop the resident pages of a CPU tensor that lies in a mmapped .safetensors file, once copied.

    from_pretrained maps model.safetensors and hands out views into it. Once a weight is packed, its bytes in the
    mapping are dead weight, yet they stay resident (and count in RSS) as long as the mapping lives, which is as
    long as any tensor from the file does: the int8 model would hold every weight twice. MADV_DONTNEED on the pages
    wholly inside the tensor frees them; a later read (the embedding's row lookups) faults them in again from the
    file, which holds the same bytes: Int8Rows never writes into such a view (see _load_from_state_dict). Linux
    only; memory that is not a mapping of a .safetensors file is left alone (dropping it would zero it).
    """
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    start = tensor.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                low, high = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
                if low <= first and last <= high:
                    if line.rstrip("\n").endswith(".safetensors"):
                        madvise = ctypes.CDLL(None, use_errno=True).madvise
                        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4 = MADV_DONTNEED
                    return
    except (OSError, ValueError, AttributeError):  # no /proc or no libc: keep the pages, nothing else changes
        return


class FbgemmInt8Kernel:
    """torch.ops.quantized (fbgemm/x86): weights prepacked per output channel, inputs quantized per call."""

    name = "fbgemm"

    def __init__(self, engine):
        self.engine = engine

    def pack(self, q, scale, bias):
        zero_points = torch.zeros(scale.shape, dtype=torch.long)
        previous = torch.backends.quantized.engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks quantized tensors deprecated; these kernels are the point
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            release_file_pages(q)  # copied: its pages of a mapped model.safetensors need not stay in memory
            try:  # prepack dispatches on the global engine; the packed weight then runs the same on any engine
                torch.backends.quantized.engine = self.engine
                return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
            finally:
                torch.backends.quantized.engine = previous

    def linear(self, x, packed):
        # reduce_range=True: 7-bit activations, so fbgemm's int16 accumulation cannot saturate on AVX2-only CPUs.
        return torch.ops.quantized.linear_dynamic(x, packed, True)

    def unpack(self, packed, scale):
        return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


class DequantizedKernel:
    """No int8 kernels: w = q * scale in fp32 and F.linear. Correct, at fp32 speed and memory."""

    name = "fallback"

    def pack(self, q, scale, bias):
        return dequantize_rows(q, scale), bias

    def linear(self, x, packed):
        return F.linear(x, *packed)

    def unpack(self, packed, scale):
        return torch.round(packed[0] / scale.float()[:, None]).to(torch.int8)


def int8_kernel(device_type="cpu"):
    """THE place that chooses the int8 compute (torch.ao.quantization is deprecated upstream; swap it here)."""
    return _choose_int8_kernel(device_type, os.environ.get("TOYGPT_INT8_KERNEL", "auto").strip().lower())


@functools.lru_cache(maxsize=None)
def _choose_int8_kernel(device_type, requested):
    if requested == "fallback":
        reason = "TOYGPT_INT8_KERNEL=fallback is set"
    elif device_type != "cpu":
        reason = f"the int8 kernels run on the CPU only, and the weights are on {device_type}"
    else:
        engines = getattr(getattr(torch.backends, "quantized", None), "supported_engines", [])
        engine = next((e for e in ("fbgemm", "x86") if e in engines), None)
        reason = "this torch build has no fbgemm/x86 quantized engine"
        if engine is not None:
            kernel = FbgemmInt8Kernel(engine)
            try:  # the ops may vanish from a future torch: check they exist and compute, on a 4x4 identity
                q, scale = quantize_rows(torch.eye(4))
                y = kernel.linear(torch.ones(1, 4), kernel.pack(q, scale, None))
                if torch.allclose(y, torch.ones(1, 4), atol=0.05):
                    return kernel
                reason = "torch.ops.quantized.linear_dynamic gave wrong results"
            except Exception as err:  # missing op, removed engine, ...: any failure means "use the fallback"
                reason = f"torch.ops.quantized is unusable ({type(err).__name__}: {err})"
    warnings.warn(f"ToyGPT int8: {reason}; dequantizing the int8 weights to fp32 (same outputs, fp32 speed and memory).")
    return DequantizedKernel()


_PACK_LOCK = threading.Lock()  # generate() may run in several threads (e.g. a Gradio app): pack each weight once


class Int8Rows(nn.Module):
    """An int8 (rows, cols) weight with one fp32 scale per row, and the kernel's packed form of it, built on first use.

    Packed fbgemm weights are not tensors: state_dict() unpacks them back to `weight` (int8) so save_pretrained
    round-trips, and loading a state dict drops the packed form. Unless `keep_int8_rows` (the embedding needs its
    rows for lookups), the int8 buffer is released once packed, so the weight is held once in memory.
    """

    keep_int8_rows = False

    def __init__(self, rows, cols):
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, cols, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(rows))
        self._kernel = self._packed = None

    def _int8_linear(self, x, bias=None):
        if self._packed is None:
            with _PACK_LOCK:
                if self._packed is None:
                    self._kernel = int8_kernel(self.weight_scale.device.type)
                    packed = self._kernel.pack(self.weight, self.weight_scale, bias)
                    if not self.keep_int8_rows:
                        self.weight = None
                    self._packed = packed
        return self._kernel.linear(x.float(), self._packed).to(x.dtype)

    def _unpack(self):
        if self._packed is not None:
            if self.weight is None:
                self.weight = self._kernel.unpack(self._packed, self.weight_scale)
            self._kernel = self._packed = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:  # packed: hand out the int8 weight it holds
            destination[prefix + "weight"] = self._kernel.unpack(self._packed, self.weight_scale)

    def _load_from_state_dict(self, *args, **kwargs):
        self._unpack()  # new weights invalidate the packed ones; they are re-packed on next use
        if self.weight is not None and self.weight.device.type != "meta":
            self.weight = self.weight.clone()  # copy into our own memory, never into a view of a mapped file
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):
        self._unpack()  # .to(), .cuda(), ... must see the int8 buffer, not an opaque packed weight
        return super()._apply(*args, **kwargs)


class Int8Linear(Int8Rows):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return self._int8_linear(x, self.bias)


class Int8Embedding(Int8Rows):
    keep_int8_rows = True  # lookups read the rows; the tied lm_head uses the packed copy

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__(num_embeddings, embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids):
        return self.weight[ids].to(self.weight_scale.dtype) * self.weight_scale[ids].unsqueeze(-1)


class Int8TiedLMHead(nn.Module):
    """lm_head tied to the int8 token embedding: logits = x @ wte.T, from the embedding's int8 rows and scales."""

    def __init__(self, transformer):
        super().__init__()
        self._transformer = [transformer]  # in a list, not a submodule: the tied rows are saved once, as wte's

    def forward(self, x):
        return self._transformer[0].wte._int8_linear(x)


def check_quantization(config):
    if config.quantization and config.quantization.get("method") != INT8_METHOD:
        raise ValueError(
            f"config.quantization method {config.quantization.get('method')!r} is unknown to this modeling_toygpt.py, "
            f"which reads {INT8_METHOD!r} only; re-run quantize.py on the fp32 model."
        )


def use_int8_modules(model):
    """Swap ToyGPTModel's token embedding and every block Linear for empty int8 modules of the same shapes."""
    model.wte = Int8Embedding(model.config.vocab_size, model.config.n_embd)
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.in_features, child.out_features, child.bias is not None))


def quantize_int8(model):
    """An int8 copy of an fp32 ToyGPTForCausalLM: int8 weights + scales, everything else copied in fp32."""
    config = copy.deepcopy(model.config)
    config.quantization = copy.deepcopy(INT8_SCHEME)
    with torch.device("meta"):  # no throwaway fp32 init: every tensor is assigned below
        qmodel = ToyGPTForCausalLM(config)
    int8_modules = {name for name, module in qmodel.named_modules() if isinstance(module, Int8Rows)}
    wanted = set(qmodel.state_dict())
    state = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in int8_modules and leaf == "weight":
            state[name], state[module_name + ".weight_scale"] = quantize_rows(tensor)
        elif name in wanted:  # lm_head.weight is not: the int8 head reads wte's rows
            state[name] = tensor.detach().float().clone()
    qmodel.load_state_dict(state, strict=True, assign=True)
    qmodel.generation_config = copy.deepcopy(model.generation_config)
    return qmodel.eval()


ToyGPTConfig.register_for_auto_class()
ToyGPTModel.register_for_auto_class("AutoModel")
ToyGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ToyGPTPreTrainedModel", "ToyGPTModel", "ToyGPTForCausalLM"]
