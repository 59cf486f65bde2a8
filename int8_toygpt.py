"""int8 runtime for ToyGPT: the modules an int8 model dir (written by quantize.py) loads into, and their kernels.

Travels to the Hub beside modeling_toygpt.py, which imports it when config.quantization is set.

Scheme: each Linear of the blocks, and the token embedding (which is also the tied lm_head), keeps int8 weights
with one fp32 scale per output row (symmetric, w ~= q * scale, q in [-127, 127]); LayerNorms, biases and
positions stay fp32. Activations are quantized per call at run time (dynamic): no calibration data. Version 2 (the
quantization config's "version") rounds them per token, 8 bits where the kernel sums in int32 (IntMMKernel); version
1 dirs hold the same tensors and run the same way.
state_dict() and model.safetensors hold `<module>.weight` (int8) + `<module>.weight_scale` (fp32), nothing else.
Compute: torch._int_mm (int8 x int8 -> int32) on the int8 rows as stored, else PyTorch's fbgemm/x86 int8 GEMM
(torch.ops.quantized, activations per tensor, 7 bits) with weights packed on first use; a packed copy then replaces
the int8 rows in memory (release_file_pages), so a loaded model holds each weight once.
Where those ops are missing (or TOYGPT_INT8_KERNEL=fallback, or weights are not on the CPU) the weights are
dequantized to fp32 instead, with a warning: same results up to activation rounding, at fp32 speed and memory.
Quantizing fp32 weights (rows and scales) is quantize.py's job, not this file's.
"""

import copy
import functools
import os
import threading
import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import CompileConfig

INT8_METHOD = "toygpt-int8"
INT8_VERSION = 2  # 1 (no "version" key): the same tensors, activations were quantized per tensor (fbgemm) at run time
INT8_SCHEME = {
    "method": INT8_METHOD,
    "version": INT8_VERSION,
    "weights": "int8 per-output-channel symmetric (one fp32 scale per row)",
    "activations": "dynamic int8 per token (one scale and offset per row, at run time, no calibration data)",
    "modules": [
        "transformer.h.*.attn.c_attn",
        "transformer.h.*.attn.c_proj",
        "transformer.h.*.mlp.c_fc",
        "transformer.h.*.mlp.c_proj",
        "transformer.wte (stored once, shared with lm_head)",
    ],
    "fp32": ["transformer.wpe", "LayerNorms", "biases"],
}


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


class IntMMKernel:
    """torch._int_mm (int8 x int8 -> int32): the weight rows as they are, activations quantized per token (one scale
    and offset per row of x: its own min..max in 2 * levels + 1 steps), so one outlier token no longer coarsens every
    other token's rounding (fbgemm's dynamic ops take one range per tensor) and GELU's lopsided outputs use every
    step. With x ~= x_scale * (xq + levels + 1) + x_min:
        y = x_scale * w_scale * (xq @ wq.T) + (x_scale * (levels + 1) + x_min) * w_scale * wq.sum(1) + bias
    Chosen only where the probe (int_mm_exact) finds the int32 sums exact; `levels` 63 (7 bits) is for measuring."""

    name = "int_mm"

    def __init__(self, levels=127):
        self.levels = levels

    def pack(self, q, scale, bias):
        scale = scale.float()
        # w_scale * wq.sum(1), summed by the int8 matmul itself: sum(dtype=int32) first widens its whole input to
        # int32 (154 MB for the 124M embedding, the largest allocation of the model's first forward)
        ones = torch.ones(q.shape[1], 1, dtype=torch.int8)
        row_sums = torch._int_mm(q, ones)[:, 0].float() * scale
        return q.t(), scale, row_sums, None if bias is None else bias.detach().float()  # q.t(): a view, no copy

    def linear(self, x, packed):
        weight_t, scale, row_sums, bias = packed
        rows = x.reshape(-1, x.shape[-1])
        low, high = rows.aminmax(dim=-1, keepdim=True)
        x_scale = (high - low).clamp(min=1e-30) / (2 * self.levels + 1)
        xq = (torch.round((rows - low) / x_scale) - (self.levels + 1)).clamp(-self.levels - 1, self.levels)
        y = torch._int_mm(xq.to(torch.int8), weight_t).float().mul_(x_scale * scale)
        y.addcmul_(x_scale * (self.levels + 1) + low, row_sums)
        if bias is not None:
            y.add_(bias)
        return y.reshape(*x.shape[:-1], -1)

    def unpack(self, packed, scale):
        return packed[0].t()


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
    """THE place that chooses the int8 compute: TOYGPT_INT8_KERNEL=auto (default: int_mm, else fbgemm, else the
    fallback), int_mm, fbgemm or fallback."""
    return _choose_int8_kernel(device_type, os.environ.get("TOYGPT_INT8_KERNEL", "auto").strip().lower())


def _probe(kernel, q, scale, x, expected, atol):
    """None if `kernel` computes x @ (q * scale).T as expected, else what is wrong with it."""
    try:  # the ops may vanish from a future torch, or compute wrong: any failure means "not this kernel"
        y = kernel.linear(x, kernel.pack(q, scale, None))
        return None if torch.allclose(y, expected, rtol=0, atol=atol) else "gave wrong results"
    except Exception as err:
        return f"is unusable ({type(err).__name__}: {err})"


def int_mm_exact():
    """Whether torch._int_mm sums int8 products exactly (int32, as AVX-512 VNNI, AMX and ARM's dot products do), on
    the worst case: every activation at the top of its range against weights of 127. A kernel that shifts int8
    activations to uint8 and sums pairs of products in int16 (AVX2's vpmaddubsw) saturates there: fbgemm's ops with
    7-bit activations are then used instead."""
    k = 64
    q, scale = torch.full((8, k), 127, dtype=torch.int8), torch.ones(8)
    x = torch.ones(1, k)
    x[0, 0] = 0.0  # range 0..1: the other activations round to the top step
    return _probe(IntMMKernel(), q, scale, x, torch.full((1, 8), 127.0 * (k - 1)), 0.5) is None


@functools.lru_cache(maxsize=None)
def _choose_int8_kernel(device_type, requested):
    reasons = []
    if requested == "fallback":
        reasons.append("TOYGPT_INT8_KERNEL=fallback is set")
    elif device_type != "cpu":
        reasons.append(f"the int8 kernels run on the CPU only, and the weights are on {device_type}")
    else:
        if requested in ("auto", "int_mm"):
            if int_mm_exact():
                return IntMMKernel()
            reasons.append("torch._int_mm is unusable or saturates")
        engines = getattr(getattr(torch.backends, "quantized", None), "supported_engines", [])
        engine = next((e for e in ("fbgemm", "x86") if e in engines), None)
        if engine is None:
            reasons.append("this torch build has no fbgemm/x86 quantized engine")
        else:
            kernel = FbgemmInt8Kernel(engine)
            q, scale = (127 * torch.eye(4)).to(torch.int8), torch.full((4,), 1 / 127)
            problem = _probe(kernel, q, scale, torch.ones(1, 4), torch.ones(1, 4), 0.05)
            if problem is None:
                if reasons:
                    warnings.warn(f"ToyGPT int8: {'; '.join(reasons)}; using fbgemm's int8 ops (activations "
                                  "quantized per tensor, 7 bits: lower quality).")
                return kernel
            reasons.append(f"torch.ops.quantized.linear_dynamic {problem}")
    warnings.warn(f"ToyGPT int8: {'; '.join(reasons)}; dequantizing the int8 weights to fp32 (same outputs, fp32 "
                  "speed and memory).")
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


COMPILE_ENV = "TOYGPT_INT8_COMPILE"  # 0: generate() decodes eagerly, with transformers' dynamic cache


def compile_allowed() -> bool:
    """False where TOYGPT_INT8_COMPILE=0 switches the int8 model's compiled decode step off."""
    return os.environ.get(COMPILE_ENV, "1").strip() != "0"


def fast_decode_kwargs(model, kwargs):
    """generate()'s defaults for the int8 model on the CPU: a static KV cache, whose one-token decode step
    transformers compiles (inductor). Batch-1 decode of a small model is bound by per-op overhead, which a compiled
    step mostly removes; the first call compiles (seconds, cached on disk by inductor), later ones reuse the graph.
    The cache holds block_size tokens, so every call reuses one graph; the step reads only the filled slots.
    The caller's choice wins: cache_implementation (e.g. "dynamic"), disable_compile=True, a cache of their own,
    use_cache=False, or TOYGPT_INT8_COMPILE=0 all keep transformers' eager default, as do beam search, assisted and
    prompt-lookup decoding."""
    config = kwargs.get("generation_config") or model.generation_config
    chosen = {name: kwargs.get(name, getattr(config, name, None))
              for name in ("cache_implementation", "disable_compile", "use_cache", "num_beams",
                           "prompt_lookup_num_tokens")}
    if (not compile_allowed() or chosen["disable_compile"] or chosen["use_cache"] is False
            or kwargs.get("cache") is not None or chosen["cache_implementation"] not in (None, "static")
            or model.device.type != "cpu"):
        return kwargs
    if (chosen["num_beams"] or 1) > 1 or chosen["prompt_lookup_num_tokens"] or kwargs.get("assistant_model"):
        return kwargs  # beams and candidate verification: one token a step is what the compiled step is for
    problem = inductor_problem()
    if problem is not None:
        warnings.warn(f"ToyGPT int8: decoding without torch.compile ({problem}); generate() runs eagerly, slower "
                      f"per token. Install a C++ compiler (e.g. g++), or set {COMPILE_ENV}=0 to silence this.")
        return kwargs
    fast = {"cache_implementation": "static", "max_cache_len": model.config.block_size,
            "compile_config": decode_compile_config()}
    if kwargs.get("generation_config") is None:
        return {**fast, **kwargs}
    config = copy.deepcopy(config)  # a given config object takes them itself: transformers deprecates config + kwargs
    for name, value in fast.items():
        if name not in kwargs and getattr(config, name, None) is None:
            setattr(config, name, value)
    return {**kwargs, "generation_config": config}


def decode_compile_config():
    # size_asserts off: inductor re-checks every extern kernel's output sizes and strides on each call (int_mm, SDPA);
    # the trace already derived those shapes, so on every step the checks only cost time. No mode: transformers'
    # default, "reduce-overhead", is CUDA graphs, and torch.compile takes a mode or options, not both.
    config = CompileConfig(fullgraph=True, mode=None, options={"size_asserts": False})
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


@functools.lru_cache(maxsize=None)
def inductor_problem():
    """Why inductor cannot compile for the CPU here (no C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return None
    except Exception as err:  # the check is inductor's own; any failure of it means "no compiled step"
        return f"no working C++ compiler for inductor: {type(err).__name__}"


def check_quantization(config):
    """Every version up to INT8_VERSION stores the same tensors (int8 rows + one scale per row), so each loads here;
    how activations are rounded is this runtime's choice (int8_kernel)."""
    if not config.quantization:
        return
    if config.quantization.get("method") != INT8_METHOD:
        raise ValueError(
            f"config.quantization method {config.quantization.get('method')!r} is unknown to this int8_toygpt.py, "
            f"which reads {INT8_METHOD!r} only; re-run quantize.py on the fp32 model."
        )
    version = config.quantization.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= INT8_VERSION:
        raise ValueError(
            f"config.quantization version {version!r} is newer than this int8_toygpt.py reads (1..{INT8_VERSION}); "
            "load it with the int8_toygpt.py saved beside it, or re-run quantize.py on the fp32 model."
        )


def use_int8_modules(model):
    """Swap ToyGPTModel's token embedding and every block Linear for empty int8 modules of the same shapes."""
    model.wte = Int8Embedding(model.config.vocab_size, model.config.n_embd)
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.in_features, child.out_features, child.bias is not None))


def int8_lm_head(config, transformer):
    """The int8 model's lm_head: the tied embedding's int8 rows (stored once, as wte's), else its own int8 rows."""
    if config.tie_word_embeddings:
        return Int8TiedLMHead(transformer)
    return Int8Linear(config.n_embd, config.vocab_size, bias=False)
