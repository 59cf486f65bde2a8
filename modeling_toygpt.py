"""ToyGPT: the GPT-2 decoder as nanoGPT writes it, shaped as a transformers model.

Shapes: B batch, T new tokens, P tokens already in the KV cache, S keys each layer attends over (P + T; with a static
cache and no mask, its allocated length, slots P + T .. S-1 still empty), C n_embd, nh heads, hs = C // nh.
"""

import inspect
import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from .configuration_toygpt import ToyGPTConfig
    from .int8_toygpt import check_quantization, fast_decode_kwargs, int8_lm_head, use_int8_modules
except ImportError:  # imported as a plain module (repo checkout, tests)
    from configuration_toygpt import ToyGPTConfig
    from int8_toygpt import check_quantization, fast_decode_kwargs, int8_lm_head, use_int8_modules


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

    def forward(self, x, attn_mask=None, cache=None, kv_length=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S or a static cache's length, hs)
            k, v = k[:, :, :kv_length], v[:, :, :kv_length]  # a static cache's empty slots: never read them
        # No attn_mask (build_attention_mask): causal. SDPA's is_causal aligns top-left, which is right when T == S; the
        # other maskless case, one query over exactly its past, needs no mask at all. bool(): symbolic sizes under
        # torch.export compare to a SymBool, which SDPA refuses.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and bool(T == k.size(-2)),
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

    def forward(self, x, attn_mask=None, cache=None, kv_length=None):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, cache=cache, kv_length=kv_length)
        x = x + self.mlp(self.ln_2(x))
        return x


def build_attention_mask(attention_mask, T, P, S):
    """Which of the S keys each of the T new queries (positions P .. P+T-1) may attend to.

    attention_mask: None; (B, P + T) with 1 for real tokens and 0 for (left) padding; or a ready 4-D (B, 1, T, S) mask,
    which transformers builds for compileable (static) caches and which is returned as is (bool, or additive float:
    SDPA takes either). P is a 0-d tensor for a static cache, which counts its tokens on the device.
    Returns None where SDPA needs no mask (causal, no padding, no empty key slots), else a bool (B or 1, 1, T, S) mask,
    True = may attend.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    # A traced graph (torch.compile, torch.export) cannot branch on tensor values: there, a given mask counts as padded.
    tracing = torch.compiler.is_compiling()
    has_padding = attention_mask is not None and (tracing or not bool(attention_mask.all()))
    if not has_padding and (S == T or (T == 1 and not tracing and S == P + 1)):
        return None  # a fresh sequence (SDPA's is_causal), or one query over exactly its past: all keys
    device = attention_mask.device if attention_mask is not None else None
    query_positions = P + torch.arange(T, device=device)  # (T,)
    # Query i sees keys j <= P + i: causal, and a static cache's empty slots (j >= P + T) stay hidden.
    mask = (torch.arange(S, device=device) <= query_positions[:, None])[None, None]  # (1, 1, T, S)
    if has_padding:
        real = F.pad(attention_mask.bool(), (0, S - attention_mask.size(-1)))  # (B, S): empty slots are no tokens
        mask = mask & real[:, None, None, :]  # (B, 1, T, S)
        # A padding query sees no key at all; let it see every key so softmax stays finite. Its output is never used.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def check_context(P, T, block_size):
    if P + T > block_size:
        raise ValueError(
            f"Sequence length {int(P + T)} ({int(P)} cached + {T} new tokens) exceeds the model's context "
            f"block_size={block_size}. Truncate the input (keep the last {block_size} tokens) or lower max_new_tokens."
        )


class ToyGPTPreTrainedModel(PreTrainedModel):
    config_class = ToyGPTConfig
    config: ToyGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _can_compile_fullgraph = True  # one graph per decode step: generate() compiles it with a static cache

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
        if config.quantization:  # an int8 model dir (quantize.py): int8 modules from int8_toygpt.py
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
        P = cache.get_seq_length() if cache is not None else 0  # a 0-d tensor for a static cache
        S = cache.get_mask_sizes(T, layer_idx=0)[0] if cache is not None else T
        if attention_mask is not None:
            # A mask counts the keys: a 2-D one covers the P + T filled ones, so a static cache's step reads those only
            # (under torch.compile S is then one symbolic size, not a recompile per step).
            S = attention_mask.size(-1)
        # Checked eagerly (generate's prefill included); a traced graph cannot raise on the value of a static cache's P:
        # generate() checks its compiled steps in create_masks_for_generate.
        if not torch.compiler.is_compiling():
            check_context(P, T, self.config.block_size)

        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # Left padding: count positions from each row's first real token, as if it were alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = (P + torch.arange(T, device=inputs_embeds.device)).unsqueeze(0)  # (1, T)

        x = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)
        attn_mask = build_attention_mask(attention_mask, T, P, S)
        all_hidden_states = () if output_hidden_states else None
        for block in self.h:
            if output_hidden_states:
                all_hidden_states += (x,)
            x = block(x, attn_mask=attn_mask, cache=cache, kv_length=S)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden_states += (x,)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache, hidden_states=all_hidden_states)


class ToyGPTForCausalLM(ToyGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = ToyGPTModel(config)
        if config.quantization:  # int8: the tied head reads wte's int8 rows itself, so transformers has nothing to tie
            self._tied_weights_keys = {}
            self.lm_head = int8_lm_head(config, self.transformer)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def generate(self, *args, **kwargs):
        if self.config.quantization:  # int8: a static cache and a compiled decode step unless the caller says otherwise
            kwargs = fast_decode_kwargs(self, kwargs, args[0] if args else None)
        return super().generate(*args, **kwargs)

    def create_masks_for_generate(self, inputs_embeds, attention_mask=None, cache=None, **kwargs):
        """generate() with a static cache: hand forward a 2-D mask, from which it builds its own (build_attention_mask),
        a few fused ops in a compiled step instead of transformers' 4-D mask over every slot. Its length, P + T, is how
        many slots the step reads; generate() drops an all-ones mask, so one is made here. Marked dynamic (it grows a
        token a step), so torch.compile traces one graph for every length instead of one per length."""
        B, T = inputs_embeds.shape[:2]
        P = int(cache.get_seq_length())
        check_context(P, T, self.config.block_size)  # the compiled step cannot: past block_size is past the cache
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(attention_mask, 1)
        return attention_mask

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
        shifted; -100 is ignored, the loss is the mean over the rest (transformers' ForCausalLMLoss)."""
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
        if logits_to_keep:  # generate() only needs the last position's logits
            x = x[:, -logits_to_keep:, :]
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


# generate() re-reads forward's signature every step for remote-code models (its cache_position check,
# huggingface/transformers#44816): a stored signature makes that lookup cheap.
ToyGPTForCausalLM.forward.__signature__ = inspect.signature(ToyGPTForCausalLM.forward)

ToyGPTConfig.register_for_auto_class()
ToyGPTModel.register_for_auto_class("AutoModel")
ToyGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ToyGPTPreTrainedModel", "ToyGPTModel", "ToyGPTForCausalLM"]
