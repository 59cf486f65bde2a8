"""int8 runtime for ToyGPT: the modules an int8 model dir (written by quantize.py) loads into, and their kernels.

Travels to the Hub beside modeling_toygpt.py, which imports it when config.quantization is set.

Scheme (version 3, quantize.py today): each Linear of the blocks, and the token embedding (which is also the tied
lm_head), and the position embedding keep int8 weights with one fp16 scale per 32 weights of a row (llama.cpp's
q8_0 rounding: symmetric, w ~= q * scale, q in [-127, 127]); LayerNorms and biases stay fp32. Activations are rounded
per call at run time (dynamic, no calibration data). Versions 1 and 2 (one fp32 scale per row, fp32 positions) load
and run here too.
state_dict() and model.safetensors hold `<module>.weight` (int8) + `<module>.weight_scale`, nothing else.
Compute (int8_kernel): BlockInt8Kernel, a small C kernel compiled on first use with the C++ compiler inductor uses
(int16 activations per token against the int8 weights, int32 sums per 32 weights, each block scaled by its own
scale); where no compiler works, for per-row scales, torch._int_mm or PyTorch's fbgemm int8 GEMM; else the weights
dequantized to fp32, with a warning (same results up to activation rounding, at fp32 speed and memory). A packed
copy replaces the int8 rows in memory (release_file_pages), so a loaded model holds each weight once; an embedding
whose rows repeat (a corpus vocabulary's unseen tokens share one) packs each distinct row once (distinct_rows).
Quantizing fp32 weights is quantize.py's job, not this file's.
"""

import copy
import ctypes
import functools
import hashlib
import mmap
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import CompileConfig

INT8_METHOD = "toygpt-int8"
INT8_VERSION = 3  # 1, 2: one fp32 scale per row, fp32 positions (2 only changed how activations were rounded)
GROUP_SIZE = 32  # weights per scale in a row (version 3), as llama.cpp's q8_0
INT8_SCHEME = {
    "method": INT8_METHOD,
    "version": INT8_VERSION,
    "group_size": GROUP_SIZE,
    "weights": f"int8 symmetric, one fp16 scale per {GROUP_SIZE} weights of a row",
    "activations": "dynamic per token, at run time, no calibration data (int16 on the block kernel)",
    "modules": [
        "transformer.h.*.attn.c_attn",
        "transformer.h.*.attn.c_proj",
        "transformer.h.*.mlp.c_fc",
        "transformer.h.*.mlp.c_proj",
        "transformer.wte (stored once, shared with lm_head)",
        "transformer.wpe",
    ],
    "fp32": ["LayerNorms", "biases"],
}


def group_size(config) -> int | None:
    """Weights per scale: GROUP_SIZE for version 3 dirs, None (one scale per row) for versions 1 and 2."""
    return config.quantization.get("group_size") if config.quantization.get("version", 1) >= 3 else None


def scale_steps(scale, cols, grouped):
    """Each weight's fp32 step, ready to broadcast against (..., cols) int8 rows: the row's one scale, or (`grouped`,
    scales of shape (..., ceil(cols / GROUP_SIZE))) the scale of its own GROUP_SIZE columns."""
    if not grouped:
        return scale.float().unsqueeze(-1)
    return scale.float().repeat_interleave(GROUP_SIZE, dim=-1)[..., :cols]


def dequantize(q, scale):
    """fp32 weights from int8 rows and their scales: one per row (R,) or one per GROUP_SIZE columns (R, G)."""
    return q.float() * scale_steps(scale, q.shape[1], grouped=scale.dim() == 2)


def release_file_pages(tensor):
    """Let the OS drop the resident pages of a CPU tensor that lies in a mmapped .safetensors file, once copied.

    from_pretrained maps model.safetensors and hands out views into it. Once a weight is packed, its bytes in the
    mapping are dead weight, yet they stay resident (and count in RSS) as long as the mapping lives, which is as
    long as any tensor from the file does: the int8 model would hold every weight twice. MADV_DONTNEED on the pages
    wholly inside the tensor frees them; a later read (the embedding's row lookups) faults them in again from the
    file, which holds the same bytes: Int8Rows never writes into such a view (see _load_from_state_dict). Linux
    only; memory that is not a mapping of a .safetensors file is left alone (dropping it would zero it).
    """
    if in_mapped_safetensors(tensor):
        drop_resident_pages(tensor)


def _page_span(tensor):
    """The page-aligned address range wholly inside a contiguous tensor's bytes (empty: last <= first)."""
    start = tensor.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    return first, (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE


def in_mapped_safetensors(tensor) -> bool:
    """Whether a CPU tensor lies in a mmapped .safetensors file (Linux; False where that cannot be read)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return False
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                low, high = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
                if low <= start and end <= high:
                    return line.rstrip("\n").endswith(".safetensors")
    except (OSError, ValueError):  # no /proc: keep the pages, nothing else changes
        pass
    return False


def drop_resident_pages(tensor):
    """MADV_DONTNEED on the pages wholly inside `tensor`, which must lie in a mapped file (in_mapped_safetensors):
    they are read back from the file on the next access."""
    first, last = _page_span(tensor)
    if last <= first:
        return
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no libc: keep the pages
        return
    madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4 = MADV_DONTNEED


class FbgemmInt8Kernel:
    """torch.ops.quantized (fbgemm/x86): weights prepacked per output channel, inputs quantized per call."""

    name = "fbgemm"
    quality = "fbgemm's int8 ops (activations quantized per tensor, 7 bits: lower quality)"
    serves_rows = False
    traceable = False  # its prepacked weight is a TorchScript object, which torch.compile cannot trace

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
    quality = "torch._int_mm (activations rounded per token to 8 bits: lower quality)"
    serves_rows = False
    traceable = True

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


# ----------------------------------------------------------------------------------------------------------------
# The block kernel: q8_0's weight rounding (a scale per 32 weights) at int8 speed, which no PyTorch CPU op offers

BLOCK_KERNEL_SOURCE = r"""
// y = x @ W.T + bias for int8 W with one scale per 32 columns of a row. x (m, k) fp32 is rounded per row to int16
// (its own absmax / 32767); each 32-column block of a row sums 32 exact int32 products, then adds them times its
// scale in fp32. W is packed as (groups of 16 rows, k blocks, 16 column pairs, 16 rows, 2 columns), scales as
// (groups, k blocks, 16 rows), fp16 or fp32 as stored: one vector multiply-add (vpdpwssd) takes a column pair of 16
// rows at once.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#define ROWS 16
#define BLOCK 32
#define PREFETCH_AHEAD 4096  // bytes of weights requested ahead of the block in use (hardware prefetch alone stalls)

static inline float half_to_float(uint16_t h) {  // IEEE binary16 -> binary32, subnormals included
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0) {
    float magnitude = ldexpf((float)mantissa, -24);
    return sign ? -magnitude : magnitude;
  }
  bits = sign | (exponent == 31 ? 0x7f800000 : (exponent + 112) << 23) | (mantissa << 13);
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
static inline float scale1(const float *s) { return *s; }
static inline float scale1(const uint16_t *s) { return half_to_float(*s); }
#if defined(__AVX512BW__)
static inline __m512 scales16(const float *s) { return _mm512_loadu_ps(s); }
static inline __m512 scales16(const uint16_t *s) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s)); }
#elif defined(__AVX2__)
static inline __m256 scales8(const float *s) { return _mm256_loadu_ps(s); }
static inline __m256 scales8(const uint16_t *s) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s));
#else
  float f[8];
  for (int i = 0; i < 8; i++) f[i] = half_to_float(s[i]);
  return _mm256_loadu_ps(f);
#endif
}
#endif

extern "C" int toygpt_block_simd(void) {  // 3: AVX-512 VNNI, 2: AVX-512 BW, 1: AVX2, 0: plain C
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return 3;
#elif defined(__AVX512BW__)
  return 2;
#elif defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

// out[16] = the 16 rows of one group against one int16 activation row, before the activation's scale
template <typename S>
static void group_dot(const int8_t *w, const S *s, const int16_t *xq, int64_t kb, float *out) {
#if defined(__AVX512BW__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; b++, w += ROWS * BLOCK, s += ROWS) {
    for (int line = 0; line < ROWS * BLOCK; line += 64) _mm_prefetch((const char *)w + PREFETCH_AHEAD + line, _MM_HINT_T0);
    const int32_t *xp = (const int32_t *)(xq + b * BLOCK);  // column pairs, broadcast to all 16 rows
    __m512i sums[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int p = 0; p < BLOCK / 2; p++) {  // 4 independent sums: the multiply-adds overlap
      __m512i wp = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + p * 2 * ROWS)));
#if defined(__AVX512VNNI__)
      sums[p & 3] = _mm512_dpwssd_epi32(sums[p & 3], wp, _mm512_set1_epi32(xp[p]));
#else
      sums[p & 3] = _mm512_add_epi32(sums[p & 3], _mm512_madd_epi16(wp, _mm512_set1_epi32(xp[p])));
#endif
    }
    __m512i sum = _mm512_add_epi32(_mm512_add_epi32(sums[0], sums[1]), _mm512_add_epi32(sums[2], sums[3]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scales16(s), acc);
  }
  _mm512_storeu_ps(out, acc);
#elif defined(__AVX2__)
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; b++, w += ROWS * BLOCK, s += ROWS) {
    for (int line = 0; line < ROWS * BLOCK; line += 64) _mm_prefetch((const char *)w + PREFETCH_AHEAD + line, _MM_HINT_T0);
    const int32_t *xp = (const int32_t *)(xq + b * BLOCK);
    __m256i sum_lo = _mm256_setzero_si256(), sum_hi = _mm256_setzero_si256();
    for (int p = 0; p < BLOCK / 2; p++) {
      __m256i x = _mm256_set1_epi32(xp[p]);
      __m256i w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + p * 2 * ROWS)));
      __m256i w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + p * 2 * ROWS + ROWS)));
      sum_lo = _mm256_add_epi32(sum_lo, _mm256_madd_epi16(w_lo, x));
      sum_hi = _mm256_add_epi32(sum_hi, _mm256_madd_epi16(w_hi, x));
    }
    lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_lo), scales8(s), lo);
    hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_hi), scales8(s + 8), hi);
  }
  _mm256_storeu_ps(out, lo);
  _mm256_storeu_ps(out + 8, hi);
#else
  for (int r = 0; r < ROWS; r++) out[r] = 0.0f;
  for (int64_t b = 0; b < kb; b++, w += ROWS * BLOCK, s += ROWS) {
    const int16_t *x = xq + b * BLOCK;
    for (int r = 0; r < ROWS; r++) {
      int32_t sum = 0;
      for (int p = 0; p < BLOCK / 2; p++)
        sum += w[p * 2 * ROWS + 2 * r] * x[2 * p] + w[p * 2 * ROWS + 2 * r + 1] * x[2 * p + 1];
      out[r] += (float)sum * scale1(s + r);
    }
  }
#endif
}

// One row of x to int16 (symmetric, its own absmax), zero-padded to whole blocks; returns its scale.
static float round_row(const float *x, int64_t k, int64_t kb, int16_t *xq) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[i]));
  float scale = amax > 0.0f ? amax / 32767.0f : 1.0f, inverse = 1.0f / scale;
  for (int64_t i = 0; i < k; i++) xq[i] = (int16_t)lrintf(x[i] * inverse);
  for (int64_t i = k; i < kb * BLOCK; i++) xq[i] = 0;
  return scale;
}

template <typename S>
static void block_linear(const int16_t *xq, const float *x_scale, int64_t m, int64_t kb, const int8_t *w, const S *s,
                         int64_t n, const float *bias, float *y, int threads) {
  int64_t groups = (n + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; g++) {
    float out[ROWS];
    int64_t rows = n - g * ROWS < ROWS ? n - g * ROWS : ROWS;
    for (int64_t i = 0; i < m; i++) {
      group_dot(w + g * kb * ROWS * BLOCK, s + g * kb * ROWS, xq + i * kb * BLOCK, kb, out);
      float *y_row = y + i * n + g * ROWS;
      for (int64_t r = 0; r < rows; r++) y_row[r] = out[r] * x_scale[i] + (bias ? bias[g * ROWS + r] : 0.0f);
    }
  }
}

// Scales are fp16 (half_scales) or fp32. Returns 0, or 1 where memory ran out. Threads split the row groups, so
// the weights are read once whatever m is.
extern "C" int toygpt_block_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const void *s,
                                   int half_scales, int64_t n, const float *bias, float *y, int threads) {
  int64_t kb = (k + BLOCK - 1) / BLOCK;
  if (m * n * kb * BLOCK < (1 << 17)) threads = 1;  // a few microseconds of work: waking threads costs more
  int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)(m * kb * BLOCK));
  float *x_scale = (float *)malloc(sizeof(float) * (size_t)m);
  if (xq && x_scale) {
    for (int64_t i = 0; i < m; i++) x_scale[i] = round_row(x + i * k, k, kb, xq + i * kb * BLOCK);
    if (half_scales)
      block_linear(xq, x_scale, m, kb, w, (const uint16_t *)s, n, bias, y, threads);
    else
      block_linear(xq, x_scale, m, kb, w, (const float *)s, n, bias, y, threads);
  }
  int failed = !xq || !x_scale;
  free(xq);
  free(x_scale);
  return failed;
}

#if defined(TOYGPT_TORCH_OP)
// Built against torch's headers where they compile: the operator's CPU implementation in C++, so each matrix product
// of a compiled decode step goes from the dispatcher to the kernel without a Python frame. Its schema and Meta
// implementation are defined from Python before this library is loaded (block_kernel_library).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

static at::Tensor block_linear_op(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scale,
                                  const std::optional<at::Tensor> &bias, int64_t rows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "ToyGPT int8: x must be 2-D float32");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "ToyGPT int8: weight must be packed int8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kFloat, "ToyGPT int8: scales fp16/fp32");
  int64_t groups = (rows + ROWS - 1) / ROWS, blocks = (x.size(1) + BLOCK - 1) / BLOCK;
  TORCH_CHECK(weight.numel() == groups * blocks * BLOCK * ROWS && scale.is_contiguous() &&
                  scale.numel() == groups * blocks * ROWS,
              "ToyGPT int8: weight and scales must be packed for rows x x's columns");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == rows),
              "ToyGPT int8: bias must be float32, one per row");
  at::Tensor xc = x.contiguous(), y = at::empty({xc.size(0), rows}, xc.options());
  const float *b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  int failed = toygpt_block_linear(xc.data_ptr<float>(), xc.size(0), xc.size(1), weight.data_ptr<int8_t>(),
                                   scale.data_ptr(), scale.scalar_type() == at::kHalf, rows, b, y.data_ptr<float>(),
                                   at::get_num_threads());
  TORCH_CHECK(!failed, "ToyGPT int8: out of memory rounding the activations");
  return y;
}

TORCH_LIBRARY_IMPL(toygpt, CPU, m) { m.impl(TOYGPT_TORCH_OP, block_linear_op); }
extern "C" int toygpt_block_op_in_cpp(void) { return 1; }
#endif
"""
BLOCK_ROWS = 16  # rows the kernel takes at once (one AVX-512 register of int32 sums)
BLOCK_LINEAR_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
KERNEL_CACHE_ENV = "TOYGPT_KERNEL_CACHE"  # where the compiled kernel is kept (default ~/.cache/toygpt/kernels)


def _kernel_cache_dir() -> Path:
    if os.environ.get(KERNEL_CACHE_ENV):
        return Path(os.environ[KERNEL_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toygpt" / "kernels"


def _cpu_signature() -> str:
    """-march=native code runs only on CPUs with the same features: the cached file is keyed by them."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def _torch_op_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) that build the source's C++ operator against this torch: its headers and libraries
    where torch.utils.cpp_extension finds them (not imported here: it needs setuptools, which a Space may lack)."""
    root = Path(torch.__file__).parent
    compile_flags = ["-std=c++20", "-w", f'-DTOYGPT_TORCH_OP="{BLOCK_OP}"',
                     f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
                     f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    return compile_flags, [f"-L{root / 'lib'}", "-ltorch_cpu", "-lc10"]


def _compile_block_kernel(torch_op: bool) -> Path:
    """The kernel's shared library, compiled once per source, compiler, torch, CPU and variant (torch_op: with the
    C++ operator, built against torch's headers), kept in the cache dir (written to a temp file and renamed, so a
    concurrent or killed build never leaves a half-written library)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = get_cpp_compiler()
    parts = (BLOCK_KERNEL_SOURCE, compiler, torch.__version__, _cpu_signature(), str(torch_op))
    cache = _kernel_cache_dir()
    library = cache / f"toygpt_block_{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"
    failed = library.with_suffix(".failed")  # a build that failed is not retried in every process (1-7 s each)
    if library.is_file():
        return library
    if failed.is_file():
        raise RuntimeError(f"{failed.read_text().strip()} (an earlier build; delete {failed} to try again)")
    cache.mkdir(parents=True, exist_ok=True)
    compile_flags, link_flags = _torch_op_flags() if torch_op else ([], [])
    with tempfile.TemporaryDirectory(dir=cache) as build:
        source = Path(build) / "block.cpp"
        source.write_text(BLOCK_KERNEL_SOURCE)
        errors = []
        # -fopenmp links libgomp.so.1, which torch has loaded already: the kernel shares torch's OpenMP threads
        for flags in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
            built = Path(build) / "block.so"
            result = subprocess.run([compiler, "-O3", "-fPIC", "-shared", *compile_flags, *flags, str(source),
                                     *link_flags, "-o", str(built)], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, library)
                return library
            errors.append(result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"])
            if torch_op:
                break  # the plain kernel's own build tries the rest
        problem = f"{compiler} failed: {errors[-1][0]}"
        marker = Path(build) / "failed"
        marker.write_text(problem + "\n")
        os.replace(marker, failed)
        raise RuntimeError(problem)


@functools.lru_cache(maxsize=None)
def block_kernel_library():
    """(the loaded kernel library, None) or (None, why it is unavailable); compiled on first use. First choice: the
    operator's CPU implementation in C++ (torch's headers: a few seconds more to build, once); where that does not
    build or load, the plain kernel behind a Python implementation of the operator (a few microseconds a call)."""
    try:
        op_library = _define_block_linear_op()  # first: the C++ implementation registers as its library loads
        try:
            library = ctypes.CDLL(str(_compile_block_kernel(torch_op=True)))
        except Exception:  # torch's headers missing or not building here, the library not loading: the plain kernel
            library = ctypes.CDLL(str(_compile_block_kernel(torch_op=False)))
        library.toygpt_block_linear.restype = ctypes.c_int
        library.toygpt_block_linear.argtypes = BLOCK_LINEAR_ARGTYPES
        if op_library is not None and not hasattr(library, "toygpt_block_op_in_cpp"):
            _python_block_linear_impl(library, op_library)
        return library, None
    except Exception as err:  # no compiler, a failed build, a read-only home: any of them means "not this kernel"
        return None, f"the block kernel could not be built ({type(err).__name__}: {err})"


# The operator is named for its source, so two versions of this file in one process (models loaded from two dirs)
# never share or override each other's kernel; two copies of the same source share one library and one operator.
BLOCK_OP = "block_linear_" + hashlib.sha256(BLOCK_KERNEL_SOURCE.encode()).hexdigest()[:12]
_OP_LIBRARIES = []  # a torch.library.Library must stay alive for its ops to stay registered


def _define_block_linear_op():
    """Defines torch.ops.toygpt.<BLOCK_OP>, the kernel as an operator, so a compiled decode step calls it in place
    (a plain Python call would break the graph); returns its library, or None where another copy of this file defined
    it already."""
    if hasattr(torch.ops.toygpt, BLOCK_OP):
        return None
    op_library = torch.library.Library("toygpt", "FRAGMENT")
    op_library.define(f"{BLOCK_OP}(Tensor x, Tensor weight, Tensor scale, Tensor? bias, int rows) -> Tensor")
    op_library.impl(BLOCK_OP, lambda x, weight, scale, bias, rows: x.new_empty(x.shape[0], rows), "Meta")
    _OP_LIBRARIES.append(op_library)
    return op_library


def _python_block_linear_impl(library, op_library):
    """The operator's CPU implementation where the kernel was built without torch's headers: the kernel via ctypes."""

    def block_linear(x, weight, scale, bias, rows):
        # the C++ implementation's checks, same messages: a bad input is an error, never a read out of bounds
        groups, blocks = -(-rows // BLOCK_ROWS), -(-x.shape[-1] // GROUP_SIZE)
        torch._check(x.dim() == 2 and x.dtype == torch.float32, lambda: "ToyGPT int8: x must be 2-D float32")
        torch._check(weight.dtype == torch.int8 and weight.is_contiguous(),
                     lambda: "ToyGPT int8: weight must be packed int8")
        torch._check(scale.dtype in (torch.float16, torch.float32), lambda: "ToyGPT int8: scales fp16/fp32")
        torch._check(weight.numel() == groups * blocks * GROUP_SIZE * BLOCK_ROWS and scale.is_contiguous()
                     and scale.numel() == groups * blocks * BLOCK_ROWS,
                     lambda: "ToyGPT int8: weight and scales must be packed for rows x x's columns")
        torch._check(bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.numel() == rows),
                     lambda: "ToyGPT int8: bias must be float32, one per row")
        x = x.contiguous()
        y = torch.empty(x.shape[0], rows, dtype=torch.float32)
        failed = library.toygpt_block_linear(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(),
                                             scale.data_ptr(), scale.dtype == torch.float16, rows,
                                             None if bias is None else bias.data_ptr(), y.data_ptr(),
                                             torch.get_num_threads())
        if failed:
            raise MemoryError("ToyGPT int8: out of memory rounding the activations")
        return y

    op_library.impl(BLOCK_OP, block_linear, "CPU")


class BlockInt8Kernel:
    """The C kernel above: weights with a scale per GROUP_SIZE columns (per-row scales are the same scale repeated
    in every block), activations rounded per token to int16, so nearly all the error left is the weights' own
    rounding: q8_0's, without q8_0's 8-bit activations. Packing interleaves 16 rows (a copy; the int8 rows as loaded
    are released), and embedding lookups read the packed copy (rows), so each weight is held once."""

    name = "block"
    serves_rows = True
    traceable = True

    def __init__(self):
        library, problem = block_kernel_library()  # compiled and registered once per process
        if library is None:
            raise RuntimeError(problem)
        self.op = getattr(torch.ops.toygpt, BLOCK_OP)

    def pack(self, q, scale, bias):
        """Interleaved straight into the packed tensors, a few row groups at a time: no whole padded copy of the
        weight is ever made. Scales keep their stored dtype (fp16 groups, or fp32 rows repeated in every block)."""
        rows, cols = q.shape
        blocks, groups = -(-cols // GROUP_SIZE), -(-rows // BLOCK_ROWS)
        stored_scale, scale = scale, scale[:, None].expand(rows, blocks) if scale.dim() == 1 else scale
        weight = torch.empty(groups, blocks, GROUP_SIZE // 2, BLOCK_ROWS, 2, dtype=torch.int8)
        scales = torch.empty(groups, blocks, BLOCK_ROWS, dtype=scale.dtype)
        # row groups per chunk: about 256 KB of int8; small chunks leave less freed heap behind them in RSS
        step = max(1, (1 << 18) // (BLOCK_ROWS * blocks * GROUP_SIZE))
        file_backed = in_mapped_safetensors(q)  # looked up once: /proc/self/maps is read, not the chunks
        for first in range(0, groups, step):
            last = min(groups, first + step)
            row_slice = slice(first * BLOCK_ROWS, min(rows, last * BLOCK_ROWS))
            chunk = q.new_zeros((last - first) * BLOCK_ROWS, blocks * GROUP_SIZE)
            chunk[: row_slice.stop - row_slice.start, :cols] = q[row_slice]
            weight[first:last] = chunk.view(last - first, BLOCK_ROWS, blocks, GROUP_SIZE // 2, 2).permute(0, 2, 3, 1, 4)
            chunk_scales = scale.new_zeros((last - first) * BLOCK_ROWS, blocks)
            chunk_scales[: row_slice.stop - row_slice.start] = scale[row_slice]
            scales[first:last] = chunk_scales.view(last - first, BLOCK_ROWS, blocks).transpose(1, 2)
            if file_backed:  # copied: its pages of a mapped model.safetensors need not stay resident
                drop_resident_pages(q[row_slice])
        if file_backed:
            drop_resident_pages(q)  # the pages the chunks straddled
        release_file_pages(stored_scale)
        return weight, scales, None if bias is None else bias.detach().float().contiguous(), rows, cols

    def linear(self, x, packed):
        weight, scales, bias, rows, cols = packed
        y = self.op(x.reshape(-1, cols), weight, scales, bias, rows)
        return y.reshape(*x.shape[:-1], rows)

    def rows(self, packed, ids):
        """fp32 rows `ids` of the packed weight (embedding lookups)."""
        weight, scales, _, _, cols = packed
        group, lane = ids // BLOCK_ROWS, ids % BLOCK_ROWS
        q = weight[group, :, :, lane, :].reshape(*ids.shape, -1)[..., :cols]  # (..., blocks, pairs, 2) -> (..., cols)
        return q.float() * scale_steps(scales[group, :, lane], cols, grouped=True)

    def unpack(self, packed, scale):
        weight, _, _, rows, cols = packed
        groups, blocks = weight.shape[:2]
        return weight.permute(0, 3, 1, 2, 4).reshape(groups * BLOCK_ROWS, blocks * GROUP_SIZE)[:rows, :cols].clone()


class DequantizedKernel:
    """No int8 kernels: w = q * scale in fp32 and F.linear. Correct, at fp32 speed and memory."""

    name = "fallback"
    serves_rows = False
    traceable = True

    def pack(self, q, scale, bias):
        return dequantize(q, scale), bias

    def linear(self, x, packed):
        return F.linear(x, *packed)

    def unpack(self, packed, scale):
        weight = packed[0]
        return torch.round(weight / scale_steps(scale, weight.shape[1], grouped=scale.dim() == 2)).to(torch.int8)


KERNEL_ENV = "TOYGPT_INT8_KERNEL"


def int8_kernel(device_type="cpu", grouped=False):
    """THE place that chooses the int8 compute for weights with per-row scales, or per-group ones (`grouped`):
    TOYGPT_INT8_KERNEL=auto (default: block, else for per-row scales int_mm, else fbgemm; else the fallback),
    block, int_mm, fbgemm or fallback."""
    return _choose_int8_kernel(device_type, os.environ.get(KERNEL_ENV, "auto").strip().lower(), grouped)


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


def block_kernel_problem():
    """None if the block kernel builds here and computes right, else why not."""
    library, problem = block_kernel_library()
    if library is None:
        return problem
    q, scale = torch.full((20, 40), 127, dtype=torch.int8), torch.ones(20, 2)  # a partial group and block
    scale[:, 1] = 0.5  # the second block's own scale
    expected = torch.full((1, 20), 127.0 * (32 + 8 * 0.5))
    problem = _probe(BlockInt8Kernel(), q, scale, torch.ones(1, 40), expected, 0.5)
    return None if problem is None else f"the block kernel {problem}"


@functools.lru_cache(maxsize=None)
def _choose_int8_kernel(device_type, requested, grouped=False):
    reasons = []
    if requested == "fallback":
        reasons.append(f"{KERNEL_ENV}=fallback is set")
    elif device_type != "cpu":
        reasons.append(f"the int8 kernels run on the CPU only, and the weights are on {device_type}")
    else:
        if requested in ("auto", "block"):
            problem = block_kernel_problem()
            if problem is None:
                return BlockInt8Kernel()
            reasons.append(problem)
        if grouped:
            reasons.append("torch's int8 kernels take one scale per row, and these weights have one per "
                           f"{GROUP_SIZE} columns")
        else:
            kernel = _per_row_kernel(requested, reasons)
            if kernel is not None:
                if reasons:
                    warnings.warn(f"ToyGPT int8: {'; '.join(reasons)}; using {kernel.quality}.")
                return kernel
    warnings.warn(f"ToyGPT int8: {'; '.join(reasons)}; dequantizing the int8 weights to fp32 (same outputs, fp32 "
                  "speed and memory).")
    return DequantizedKernel()


def _per_row_kernel(requested, reasons):
    """torch._int_mm, else fbgemm's int8 ops, for weights with one scale per row; None (and why, in reasons)."""
    if requested in ("auto", "int_mm"):
        if int_mm_exact():
            return IntMMKernel()
        reasons.append("torch._int_mm is unusable or saturates")
    if requested not in ("auto", "int_mm", "fbgemm"):
        return None
    engines = getattr(getattr(torch.backends, "quantized", None), "supported_engines", [])
    engine = next((e for e in ("fbgemm", "x86") if e in engines), None)
    if engine is None:
        reasons.append("this torch build has no fbgemm/x86 quantized engine")
        return None
    kernel = FbgemmInt8Kernel(engine)
    q, scale = (127 * torch.eye(4)).to(torch.int8), torch.full((4,), 1 / 127)
    problem = _probe(kernel, q, scale, torch.ones(1, 4), torch.ones(1, 4), 0.05)
    if problem is None:
        return kernel
    reasons.append(f"torch.ops.quantized.linear_dynamic {problem}")
    return None


_PACK_LOCK = threading.Lock()  # generate() may run in several threads (e.g. a Gradio app): pack each weight once

DISTINCT_ROWS_AT_MOST = 0.75  # pack only the distinct rows where they are at most this share of all rows
_ROW_HASH_CHUNK = 512  # rows hashed at once: (chunk, cols) int64 temporaries of 3 MB at the 124M width


def distinct_rows(q, scale):
    """(index, first) where rows of the int8 weight `q` repeat (with their scales): row r equals distinct row
    index[r], which is row first[index[r]]. None where more than DISTINCT_ROWS_AT_MOST of the rows are distinct, or
    a hash collision would make the map wrong (checked exactly). A model trained on its corpus's vocabulary saves one
    shared row for every token the training never saw (39,023 of GPT-2's 50,257 ids on tiny Shakespeare): packed
    once, the tied lm_head reads 11,235 rows a token instead of 50,257."""
    rows, cols = q.shape
    generator = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**62, (cols,), generator=generator)
    scale_weights = torch.randint(1, 2**62, scale.view(rows, -1).shape[1:], generator=generator)
    hashes = torch.empty(rows, dtype=torch.int64)
    for first in range(0, rows, _ROW_HASH_CHUNK):  # int64 products wrap: a hash, never a value
        chunk = slice(first, first + _ROW_HASH_CHUNK)
        scale_bits = scale[chunk].view(torch.int16 if scale.dtype == torch.float16 else torch.int32)
        hashes[chunk] = ((q[chunk].long() * weights).sum(1)
                         + (scale_bits.reshape(-1, scale_weights.numel()).long() * scale_weights).sum(1))
    unique, index = torch.unique(hashes, return_inverse=True)
    if unique.numel() > DISTINCT_ROWS_AT_MOST * rows:
        return None
    first = torch.full((unique.numel(),), rows).scatter_reduce_(0, index, torch.arange(rows), "amin")
    first, order = first.sort()  # distinct rows packed in the weight's own order
    index = torch.argsort(order)[index]
    for start in range(0, rows, _ROW_HASH_CHUNK):
        chunk = slice(start, start + _ROW_HASH_CHUNK)
        same_as = first[index[chunk]]
        if not (torch.equal(q[chunk], q[same_as]) and torch.equal(scale[chunk], scale[same_as])):
            return None
    return index, first


class Int8Rows(nn.Module):
    """An int8 (rows, cols) weight with its scales, one fp32 per row, or (`group`) one fp16 per `group` columns of a
    row, and the kernel's packed form of it, built on first use.

    Packed weights are not the rows as stored: state_dict() unpacks them back to `weight` (int8) so save_pretrained
    round-trips, and loading a state dict drops the packed form. Once packed, the int8 buffer is released, so the
    weight is held once in memory, unless `keep_int8_rows` (the embedding's lookups) and the kernel cannot serve
    rows from its packed form. Where `pack_distinct_rows` and many rows repeat (distinct_rows), only the distinct
    rows are packed, and outputs and lookups go through the row map.
    """

    keep_int8_rows = False
    pack_distinct_rows = False

    def __init__(self, rows, cols, group=None):
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, cols, dtype=torch.int8))
        scale_shape, scale_dtype = ((rows,), torch.float32) if group is None else ((rows, -(-cols // group)),
                                                                                  torch.float16)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=scale_dtype))
        self._kernel = self._packed = self._row_index = self._row_first = None

    def _pack(self, bias):
        kernel = int8_kernel(self.weight_scale.device.type, grouped=self.weight_scale.dim() == 2)
        q, scale = self.weight, self.weight_scale
        shared = distinct_rows(q, scale) if self.pack_distinct_rows and bias is None and q.is_cpu else None
        if shared is not None:
            self._row_index, self._row_first = shared
            q, scale = q[self._row_first], scale[self._row_first]
            release_file_pages(self.weight)  # hashed, so resident: lookups fault the pages they need back in
            release_file_pages(self.weight_scale)
        self._kernel, self._packed = kernel, kernel.pack(q, scale, bias)
        if not self.keep_int8_rows or kernel.serves_rows:
            self.weight = None

    def _int8_linear(self, x, bias=None):
        if self._packed is None:
            with _PACK_LOCK:
                if self._packed is None:
                    self._pack(bias)
        y = self._kernel.linear(x.float(), self._packed)
        if self._row_index is not None:
            y = y.index_select(-1, self._row_index)  # (..., distinct rows) -> (..., rows)
        return y.to(x.dtype)

    def _unpacked_weight(self):
        """The stored int8 weight, from the packed form."""
        if self._row_index is None:
            return self._kernel.unpack(self._packed, self.weight_scale)
        return self._kernel.unpack(self._packed, self.weight_scale[self._row_first])[self._row_index]

    def _unpack(self):
        if self._packed is not None:
            if self.weight is None:
                self.weight = self._unpacked_weight()
            self._kernel = self._packed = self._row_index = self._row_first = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:  # packed: hand out the int8 weight it holds
            destination[prefix + "weight"] = self._unpacked_weight()

    def _load_from_state_dict(self, *args, **kwargs):
        self._unpack()  # new weights invalidate the packed ones; they are re-packed on next use
        if self.weight is not None and self.weight.device.type != "meta":
            self.weight = self.weight.clone()  # copy into our own memory, never into a view of a mapped file
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):
        self._unpack()  # .to(), .cuda(), ... must see the int8 buffer, not an opaque packed weight
        return super()._apply(*args, **kwargs)


class Int8Linear(Int8Rows):
    def __init__(self, in_features, out_features, bias=True, group=None):
        super().__init__(out_features, in_features, group)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return self._int8_linear(x, self.bias)


class Int8Embedding(Int8Rows):
    keep_int8_rows = True  # lookups read the rows (or the packed copy, where the kernel serves rows from it)
    pack_distinct_rows = True  # as the tied lm_head: a corpus vocabulary's unseen tokens share one row

    def __init__(self, num_embeddings, embedding_dim, group=None):
        super().__init__(num_embeddings, embedding_dim, group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids):
        if self.weight is None:  # packed for the tied lm_head by a kernel that serves rows
            return self._kernel.rows(self._packed, ids if self._row_index is None else self._row_index[ids])
        grouped = self.weight_scale.dim() == 2
        return self.weight[ids].float() * scale_steps(self.weight_scale[ids], self.embedding_dim, grouped)


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


def fast_decode_kwargs(model, kwargs, inputs=None):
    """generate()'s defaults for the int8 model on the CPU: a static KV cache, whose one-token decode step
    transformers compiles (inductor). Batch-1 decode of a small model is bound by per-op overhead, which a compiled
    step mostly removes; the first call compiles (seconds, cached on disk by inductor), later ones reuse the graph.
    The cache holds the call's tokens rounded up to a power of two (static_cache_length); the step reads only the
    filled slots. `inputs`: generate()'s positional prompt, if it was given one.
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
    if not int8_kernel(model.device.type, grouped=group_size(model.config) is not None).traceable:
        return kwargs  # fbgemm's kernel: eager, with transformers' dynamic cache
    found = inductor_problem() or recompile_limit_reached(model)
    if found is not None:
        problem, fix = found
        warnings.warn(f"ToyGPT int8: decoding without torch.compile ({problem}); generate() runs eagerly, slower "
                      f"per token. {fix}, or set {COMPILE_ENV}=0 to silence this.")
        return kwargs
    fast = {"cache_implementation": "static", "compile_config": decode_compile_config(),
            "max_cache_len": static_cache_length(model.config.block_size, config, kwargs, inputs)}
    if kwargs.get("generation_config") is None:
        return {**fast, **kwargs}
    config = copy.deepcopy(config)  # a given config object takes them itself: transformers deprecates config + kwargs
    for name, value in fast.items():
        if name not in kwargs and getattr(config, name, None) is None:
            setattr(config, name, value)
    return {**kwargs, "generation_config": config}


STATIC_CACHE_FLOOR = 256  # the fewest slots a static cache gets: short calls share one size, so one graph


def static_cache_length(block_size: int, config, kwargs, inputs=None) -> int:
    """Slots for this call's static cache: its prompt + new tokens rounded up to a power of two, at least
    STATIC_CACHE_FLOOR, at most block_size (the whole context where the call's length is unknown). A block_size cache
    for every call held 75 MB at 124M for a one-token reply; sizes by powers of two mean at most a few graphs, and
    transformers never shrinks a model's static cache, so a long call's size serves every later, shorter one."""
    prompt = kwargs.get("input_ids", kwargs.get("inputs", inputs))
    new_tokens = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if not torch.is_tensor(prompt):
        return block_size
    needed = prompt.shape[-1] + new_tokens if new_tokens is not None else kwargs.get("max_length", config.max_length)
    slots = STATIC_CACHE_FLOOR
    while slots < needed:
        slots *= 2
    return min(slots, block_size)


def recompile_limit_reached(model):
    """(the problem, its fix) where dynamo holds recompile_limit graphs of the model's forward: every ToyGPT model in
    the process shares that code and each shape and cache size is a graph of its own (decode_compile_config), and
    one more under fullgraph=True is a hard error, not a fallback. None otherwise, or where this torch cannot say."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        graphs = len(_debug_get_cache_entry_list(type(model).forward))
    except Exception:  # a private helper: without it, compile as before
        return None
    if graphs < torch._dynamo.config.recompile_limit:
        return None
    return ("this process compiled torch._dynamo.config.recompile_limit decode steps already",
            "Raise it (torch._dynamo.config.recompile_limit = 64) or call torch._dynamo.reset()")


def decode_compile_config():
    # size_asserts off: inductor re-checks every extern kernel's output sizes and strides on each call (int_mm, SDPA);
    # the trace already derived those shapes, so on every step the checks only cost time. cpp_wrapper: the step's
    # ~100 kernel calls are made from C++, not from a Python function calling each op through the boxed dispatcher.
    # No mode: transformers' default, "reduce-overhead", is CUDA graphs; torch.compile takes a mode or options.
    # dynamic=False: only the mask's length (marked) is symbolic. Dynamo's automatic dynamic shapes would compile a
    # second model of another shape (or cache size) with its weights' sizes symbolic: shape-generic kernels, a step
    # 2x slower on the tiny model. Each shape and cache size compiles its own graph instead.
    config = CompileConfig(fullgraph=True, dynamic=False, mode=None,
                           options={"size_asserts": False, "cpp_wrapper": True})
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


@functools.lru_cache(maxsize=None)
def inductor_problem():
    """(why inductor cannot compile for the CPU here, its fix), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return None
    except Exception as err:  # the check is inductor's own; any failure of it means "no compiled step"
        return f"no working C++ compiler for inductor: {type(err).__name__}", "Install a C++ compiler (e.g. g++)"


def check_quantization(config):
    """Every version up to INT8_VERSION loads here: 1 and 2 store int8 rows with one scale per row (fp32 positions),
    3 one scale per GROUP_SIZE weights (int8 positions); how activations are rounded is this runtime's choice."""
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
    if version >= 3 and config.quantization.get("group_size") != GROUP_SIZE:
        raise ValueError(
            f"config.quantization group_size {config.quantization.get('group_size')!r} is not the {GROUP_SIZE} "
            "weights per scale this int8_toygpt.py computes with; re-run quantize.py on the fp32 model."
        )


def use_int8_modules(model):
    """Swap ToyGPTModel's token embedding (and, from version 3, its position embedding) and every block Linear for
    empty int8 modules of the same shapes."""
    config = model.config
    group = group_size(config)
    model.wte = Int8Embedding(config.vocab_size, config.n_embd, group)
    if group is not None:
        model.wpe = Int8Embedding(config.block_size, config.n_embd, group)
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.in_features, child.out_features, child.bias is not None,
                                                     group))


def int8_lm_head(config, transformer):
    """The int8 model's lm_head: the tied embedding's int8 rows (stored once, as wte's), else its own int8 rows."""
    if config.tie_word_embeddings:
        return Int8TiedLMHead(transformer)
    return Int8Linear(config.n_embd, config.vocab_size, bias=False, group=group_size(config))
