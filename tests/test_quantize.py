"""quantize.py and the int8 runtime (int8_toygpt.py): round trip, file formats, error bounds, fallback, bad input."""

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import int8_toygpt
import quantize
from toygpt import quantization
from conftest import REPO, run_python, small_config
from int8_toygpt import DequantizedKernel, Int8Embedding, Int8Linear, Int8Rows, dequantize, int8_kernel
from modeling_toygpt import ToyGPTForCausalLM
from toygpt.quantization import quantize_int8, quantize_rows

INT8_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir, shakespeare_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "tiny-int8"
    figures = quantization.quantize_dir(tiny_model_dir, out, eval_input=shakespeare_path, eval_batches=1, batch_size=2,
                                    speed_tokens=8, log=lambda *a: None)
    return out, figures


@pytest.fixture(scope="module")
def int8_v2_dir(int8_dir, tiny_model_dir, tmp_path_factory):
    """An int8 dir as quantize.py wrote it before version 3 (one fp32 scale per row, fp32 positions): the same dir
    with those tensors and that config."""
    out = tmp_path_factory.mktemp("quantized-v2") / "tiny-int8-v2"
    shutil.copytree(int8_dir[0], out)
    quantize_int8(ToyGPTForCausalLM.from_pretrained(tiny_model_dir), group_size=None).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization"]["version"] == 2
    return out


@pytest.fixture
def fresh_kernel_choice():
    """Forget the cached kernel choice before and after a test that changes what the probe sees."""
    int8_toygpt._choose_int8_kernel.cache_clear()
    yield
    int8_toygpt._choose_int8_kernel.cache_clear()


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ToyGPTForCausalLM(small_config(**overrides)).eval()


def relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


# --------------------------------------------------------------------------------------------------------------
# Output directory and round trip


def test_output_dir_holds_int8_safetensors_and_the_scheme(int8_dir, tiny_model_dir):
    out, figures = int8_dir
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["method"] == "toygpt-int8"
    assert "quantization_config" not in config  # transformers would try its own quantizers on that name

    tensors = load_file(out / "model.safetensors")
    n_layer = config["n_layer"]
    int8_names = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(n_layer) for m in INT8_LINEARS}
    scale_names = {name.replace(".weight", ".weight_scale") for name in int8_names}
    assert {k for k, v in tensors.items() if v.dtype == torch.int8} == int8_names
    for name in int8_names:  # one fp16 scale per 32 weights of a row, as q8_0
        rows, cols = tensors[name].shape
        assert tensors[name.replace(".weight", ".weight_scale")].shape == (rows, -(-cols // 32))
    assert {k for k, v in tensors.items() if v.dtype == torch.float16} == scale_names
    assert "lm_head.weight" not in tensors  # the tied embedding is stored once
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k not in int8_names | scale_names)
    assert config["quantization"]["version"] == 3 and config["quantization"]["group_size"] == 32

    assert figures["size_int8"] == (out / "model.safetensors").stat().st_size
    assert figures["size_int8"] < 0.3 * figures["size_fp32"]
    assert abs(figures["after"]["val_loss"] / figures["before"]["val_loss"] - 1) < 0.01
    card = (out / "README.md").read_text()
    assert "## int8 quantized variant" in card and "trust_remote_code=True" in card
    assert f"{figures['size_fp32'] / 1e6:.1f}" in card and f"{figures['after']['val_loss']:.4f}" in card
    assert f"{figures['before']['val_loss']:.4f}" in card and f"{figures['size_int8'] / 1e6:.1f}" in card
    assert f"| {figures['before']['tokens_per_s']:.1f} | {figures['after']['tokens_per_s']:.1f} |" in card
    assert "AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)" in card
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "modeling_toygpt.py",
                 "int8_toygpt.py", "configuration_toygpt.py"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".tiny-int8.tmp-*"))


def test_no_file_in_output_is_a_pickle(int8_dir):
    out, _ = int8_dir
    for path in out.rglob("*"):
        if path.is_dir():
            continue
        assert path.suffix in {".safetensors", ".json", ".jsonl", ".txt", ".py", ".md", ".png"}, path.name
        head = path.read_bytes()[:8]
        assert not head.startswith(b"\x80"), f"{path.name} is a pickle"  # pickle protocol 2+ opcode
        assert not head.startswith(b"PK\x03\x04"), f"{path.name} is a zip (torch.save)"
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:  # parses as safetensors, header included
                assert len(list(f.keys())) > 0


ROUND_TRIP = r"""
import json, logging, os, warnings
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger("transformers").addHandler(Collect(level=logging.WARNING))
warnings.simplefilter("always")
out, fp32_dir, resaved = os.environ["INT8_DIR"], os.environ["FP32_DIR"], os.environ["RESAVED_DIR"]
with warnings.catch_warnings(record=True) as caught:
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
ids = tokenizer("ROMEO: the day is young", return_tensors="pt").input_ids
cached = model.generate(ids, max_new_tokens=12, do_sample=False)
uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
text = pipeline("text-generation", model=model, tokenizer=tokenizer)("ROMEO:", max_new_tokens=5, do_sample=False)
fp32 = AutoModelForCausalLM.from_pretrained(fp32_dir, trust_remote_code=True)
with torch.no_grad():
    logits, logits_fp32 = model(ids).logits, fp32(ids).logits
model.save_pretrained(resaved)  # after generate(): weights are packed, state_dict() must unpack them
c_attn = model.transformer.h[0].attn.c_attn
print(json.dumps({
    "info": {k: sorted(map(str, v)) for k, v in info.items()},
    "messages": messages + [str(w.message) for w in caught],
    "int8": [str(model.state_dict()["transformer.wte.weight"].dtype), type(c_attn).__name__,
             type(model.lm_head).__name__],
    "kernel": c_attn._kernel.name,
    "cached": cached.tolist(), "uncached": uncached.tolist(), "text": text[0]["generated_text"],
    "logits_rel_err": ((logits - logits_fp32).norm() / logits_fp32.norm()).item(),
    "argmax_agree": (logits.argmax(-1) == logits_fp32.argmax(-1)).float().mean().item(),
}))
"""


def test_round_trip_fresh_process(int8_dir, tiny_model_dir, tmp_path):
    out, _ = int8_dir
    resaved = tmp_path / "resaved"
    env = {"INT8_DIR": str(out), "FP32_DIR": str(tiny_model_dir), "RESAVED_DIR": str(resaved)}
    result = json.loads(run_python(ROUND_TRIP, cwd=tmp_path, env=env).strip().splitlines()[-1])
    assert result["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert not [m for m in result["messages"] if "initialized" in m or "not used" in m or "tie" in m.lower()]
    assert result["int8"] == ["torch.int8", "Int8Linear", "Int8TiedLMHead"]
    assert result["kernel"] == int8_kernel(grouped=True).name == "block"  # the fresh process chooses as this one
    assert result["cached"] == result["uncached"] and len(result["cached"][0]) > 12
    assert result["text"].startswith("ROMEO:") and len(result["text"]) > len("ROMEO:")
    assert result["logits_rel_err"] < 0.05 and result["argmax_agree"] >= 0.8
    original, again = load_file(out / "model.safetensors"), load_file(resaved / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def mapped_rss_kb(address):
    """Resident KiB of the mapping of a .safetensors file that holds `address`, or None if it is not in one."""
    import re

    smaps = open("/proc/self/smaps").read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps):
        low, high = (int(x, 16) for x in block.split(maxsplit=1)[0].split("-"))
        if low <= address < high:
            if not block.splitlines()[0].endswith(".safetensors"):
                return None
            return int(re.search(r"^Rss:\s+(\d+) kB", block, re.M).group(1))
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are released on Linux only")
def test_int_mm_computes_on_the_mapped_rows_without_a_copy(int8_v2_dir, monkeypatch, fresh_kernel_choice):
    monkeypatch.setenv("TOYGPT_INT8_KERNEL", "int_mm")
    model = ToyGPTForCausalLM.from_pretrained(int8_v2_dir).eval()
    layer = model.transformer.h[0].mlp.c_fc
    if mapped_rss_kb(layer.weight.data_ptr()) is None:
        pytest.skip("this transformers does not mmap model.safetensors")
    address = layer.weight.data_ptr()
    with torch.no_grad():
        model(torch.arange(12)[None])
    assert layer._kernel.name == "int_mm" and layer.weight is None  # packed: held once, by the packed form ...
    assert layer._packed[0].data_ptr() == address  # ... which is the file's int8 rows themselves, not a copy
    assert torch.equal(layer.state_dict()["weight"], load_file(int8_v2_dir / "model.safetensors")[
        "transformer.h.0.mlp.c_fc.weight"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are released on Linux only")
@pytest.mark.parametrize("kernel", ["block", "fbgemm"])  # both copy the rows into their packed form
def test_packing_releases_the_mapped_file_pages_and_stays_correct(kernel, int8_dir, int8_v2_dir, monkeypatch,
                                                                  fresh_kernel_choice):
    monkeypatch.setenv("TOYGPT_INT8_KERNEL", kernel)
    directory = int8_dir[0] if kernel == "block" else int8_v2_dir  # fbgemm takes one scale per row
    model = ToyGPTForCausalLM.from_pretrained(directory).eval()
    wte = model.transformer.wte.weight
    if mapped_rss_kb(wte.data_ptr()) is None:
        pytest.skip("this transformers does not mmap model.safetensors")
    rows = wte.clone()
    ids = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(ids).logits
        assert mapped_rss_kb(wte.data_ptr()) * 1024 < wte.nbytes / 4  # packed: the int8 bytes are not resident twice
        second = model(ids).logits  # looks up rows whose pages were dropped (fbgemm), or in the packed copy (block)
    assert model.transformer.wte._kernel.name == kernel
    assert torch.equal(first, second) and torch.equal(model.state_dict()["transformer.wte.weight"], rows)

    other = quantize_int8(random_model(seed=1), group_size=32 if kernel == "block" else None)  # new weights land in
    # fresh memory, not in the mapped file ...
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        model(ids)  # ... so dropping pages at packing cannot revert them to the file's bytes
        assert torch.equal(model(ids).logits, other(ids).logits)


# --------------------------------------------------------------------------------------------------------------
# Per-layer error bounds


@pytest.mark.parametrize("shape", [(96, 32), (64, 256)])
def test_int8_weight_reconstruction_bound(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.02
    weight[3] *= 50  # an outlier row must not cost the other rows precision (per-row scales)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (shape[0],) and int(q.abs().max()) == 127
    error = dequantize(q, scale) - weight
    assert (error.abs() <= scale[:, None] / 2 + 1e-7).all()  # rounding: at most half a step per element
    assert relative_error(dequantize(q, scale)[4:], weight[4:]) < 0.01


def test_int8_linear_and_embedding_output_bounds():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192)
    q, scale = quantize_rows(linear.weight)
    int8 = Int8Linear(128, 192)
    int8.load_state_dict({"weight": q, "weight_scale": scale, "bias": linear.bias.detach()})
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        exact, approx = F.linear(x, linear.weight), int8(x) - linear.bias
    assert relative_error(approx, exact) < 0.04  # int8 weight error + per-call int8 activations
    assert int8.weight is None and int8.state_dict()["weight"].equal(q)  # packed once; state_dict unpacks

    table = torch.randn(50, 16)
    q, scale = quantize_rows(table)
    embedding = Int8Embedding(50, 16)
    embedding.load_state_dict({"weight": q, "weight_scale": scale})
    ids = torch.tensor([[0, 7, 49]])
    assert torch.allclose(embedding(ids), dequantize(q, scale)[ids])


def test_quantized_model_logits_close_to_fp32():
    model = random_model()
    int8 = quantize_int8(model)
    assert isinstance(int8.transformer.h[1].mlp.c_fc, Int8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    for module in int8.modules():
        if isinstance(module, Int8Rows):
            assert module.weight.dtype == torch.int8 and module.weight_scale.dtype == torch.float16
            assert module.weight_scale.shape == (module.weight.shape[0], -(-module.weight.shape[1] // 32))
    ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        rel = relative_error(int8(ids).logits, model(ids).logits)
    assert rel < 0.05
    assert int8.config.quantization["method"] == "toygpt-int8" and model.config.quantization is None


# --------------------------------------------------------------------------------------------------------------
# Fallback without int8 kernels


def test_forced_fallback_gives_close_logits(monkeypatch, fresh_kernel_choice):
    model = random_model()
    ids = torch.randint(0, 50257, (1, 20))
    fast = quantize_int8(model)
    with torch.no_grad():  # the kernel is chosen when a layer first runs
        fast_logits, exact = fast(ids).logits, model(ids).logits
    monkeypatch.setenv("TOYGPT_INT8_KERNEL", "fallback")
    slow = quantize_int8(model)
    with pytest.warns(UserWarning, match="dequantizing the int8 weights to fp32"), torch.no_grad():
        slow_logits = slow(ids).logits
    assert slow.transformer.h[0].attn.c_attn._kernel.name == "fallback"
    assert fast.transformer.h[0].attn.c_attn._kernel.name == "block"
    assert relative_error(slow_logits, exact) < 0.02  # weight rounding only
    assert relative_error(slow_logits, fast_logits) < 0.05
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert all(torch.equal(fast_state[k], slow_state[k]) for k in fast_state)  # both unpack to the same int8


def test_probe_failure_falls_back(monkeypatch, fresh_kernel_choice):
    def broken(*args, **kwargs):
        raise RuntimeError("quantized::linear_dynamic is not available")

    monkeypatch.setattr(int8_toygpt.FbgemmInt8Kernel, "linear", broken)
    monkeypatch.setattr(int8_toygpt.IntMMKernel, "linear", broken)
    monkeypatch.setattr(int8_toygpt.BlockInt8Kernel, "linear", broken)
    with pytest.warns(UserWarning, match="block kernel is unusable.*linear_dynamic is unusable"):
        assert isinstance(int8_kernel(), DequantizedKernel)


def without_block_kernel(monkeypatch):
    monkeypatch.setattr(int8_toygpt, "block_kernel_library", lambda: (None, "no C++ compiler (simulated)"))


def test_without_a_compiler_grouped_weights_are_dequantized_with_a_warning(monkeypatch, fresh_kernel_choice):
    without_block_kernel(monkeypatch)
    model = random_model()
    int8 = quantize_int8(model)
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*one scale per row.*dequantizing"), torch.no_grad():
        logits = int8(ids).logits
    assert int8.transformer.h[0].mlp.c_fc._kernel.name == "fallback"
    assert relative_error(logits, model(ids).logits) < 0.02


def test_without_int_mm_fbgemm_runs_with_a_warning(monkeypatch, fresh_kernel_choice):
    def broken(*args, **kwargs):
        raise RuntimeError("_int_mm is not available")

    without_block_kernel(monkeypatch)
    monkeypatch.setattr(torch, "_int_mm", broken)
    with pytest.warns(UserWarning, match="_int_mm is unusable.*fbgemm"):
        assert int8_kernel().name == "fbgemm"


def uint8_int16_pair_sums(a, b):
    """x @ w as AVX2 without VNNI computes it: int8 activations shifted to uint8, pairs of products summed and
    saturated in int16 (vpmaddubsw), accumulated in int32, the shift's 128 * w.sum() taken off again."""
    products = (a.int() + 128)[:, None, :] * b.t().int()[None, :, :]  # (M, N, K)
    pairs = products.reshape(*products.shape[:2], -1, 2).sum(-1).clamp(-32768, 32767)
    return pairs.sum(-1, dtype=torch.int32) - 128 * b.int().sum(0, dtype=torch.int32)[None]


def test_int_mm_runs_where_it_sums_in_int32_and_fbgemm_where_it_would_saturate(monkeypatch, fresh_kernel_choice):
    without_block_kernel(monkeypatch)  # per-row scales (version 2 dirs) on a machine without a C++ compiler
    assert int8_kernel().name == "int_mm"  # this torch's _int_mm on this CPU: exact in int32
    model = random_model()
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, per_token = model(ids).logits, quantize_int8(model, group_size=None)(ids).logits
    int8_toygpt._choose_int8_kernel.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", uint8_int16_pair_sums)
    with pytest.warns(UserWarning, match="saturates.*fbgemm"):
        assert int8_kernel().name == "fbgemm"
    with torch.no_grad():
        per_tensor = quantize_int8(model, group_size=None)(ids).logits
    assert relative_error(per_token, exact) < relative_error(per_tensor, exact) < 0.05


def test_speed_runs_are_kept_from_ending_at_end_of_text_without_min_new_tokens():
    """quantization.NoEndOfText (quantize.py's tokens/s, the decode benchmarks): a model that always prefers
    <|endoftext|> still generates every token asked for, none of them <|endoftext|>; without it, generate() stops."""
    from transformers import LogitsProcessorList

    from toygpt.bpe import EOT_ID

    model = random_model().eval()
    favour_end = lambda module, args, logits: logits.index_add(  # noqa: E731  (+1e4 on <|endoftext|>'s logit)
        -1, torch.tensor([EOT_ID]), torch.full((*logits.shape[:-1], 1), 1e4))
    model.lm_head.register_forward_hook(favour_end)
    ids = torch.arange(5)[None]
    with torch.no_grad():
        kept = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=EOT_ID, eos_token_id=EOT_ID,
                              logits_processor=LogitsProcessorList([quantization.NoEndOfText(EOT_ID)]))
        plain = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=EOT_ID, eos_token_id=EOT_ID)
    assert kept.shape[1] == 5 + 8 and EOT_ID not in kept[0, 5:].tolist()
    assert plain[0, 5:].tolist() == [EOT_ID]


def test_int_mm_packing_sums_rows_without_a_widened_copy():
    """The packed row sums are exact, and packing allocates far less than the int8 weight itself: a sum(dtype=int32)
    would first widen all of it (4 bytes a weight: 154 MB for the 124M embedding, the peak of its first forward)."""
    from torch.profiler import ProfilerActivity, profile

    q = torch.randint(-127, 128, (4096, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        packed = int8_toygpt.IntMMKernel().pack(q, torch.ones(4096), None)
    allocated = sum(max(event.self_cpu_memory_usage, 0) for event in prof.key_averages())
    assert torch.equal(packed[2], q.sum(dim=1, dtype=torch.int64).float())
    assert allocated < q.numel() / 8


def test_block_packing_writes_the_packed_weight_once_without_a_whole_copy():
    """Packing interleaves a few row groups at a time straight into the packed tensor: one allocation the size of the
    weight (the result), none other above a chunk (a padded or permuted copy of the whole weight was the 124M
    embedding's first-forward peak: 37 MB more than it holds after)."""
    from torch.profiler import ProfilerActivity, profile

    q, scale = quantization.quantize_groups(torch.randn(4096, 256))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        weight, scales, _, _, _ = int8_toygpt.BlockInt8Kernel().pack(q, scale, None)
    large = sorted(event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 2**19)
    assert large == [q.numel()] and weight.numel() == q.numel()
    assert scales.dtype == torch.float16 and scales.numel() == scale.numel()  # kept as stored: no fp32 copy


def test_int8_dirs_of_version_1_load_and_unknown_versions_are_refused(int8_v2_dir, tmp_path):
    old, new = tmp_path / "v1", tmp_path / "v99"
    for directory, version in ((old, None), (new, 99)):
        shutil.copytree(int8_v2_dir, directory)
        config = json.loads((directory / "config.json").read_text())
        config["quantization"].pop("version")
        if version is not None:
            config["quantization"]["version"] = version
        (directory / "config.json").write_text(json.dumps(config))
    code = ("import os, torch; from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(os.environ['DIR'], trust_remote_code=True)\n"
            "print(m(torch.arange(8)[None]).logits.shape)")
    assert "50257" in run_python(code, cwd=tmp_path, env={"DIR": str(old)})
    with pytest.raises(Exception, match="newer than this int8_toygpt.py reads"):
        ToyGPTForCausalLM.from_pretrained(new)


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written


def run_main(argv, capsys):
    code = quantize.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_src_dirs(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main([tmp_path / "missing", out], capsys)
    assert code == 2 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    code, err = run_main([tmp_path / "empty", out], capsys)
    assert code == 2 and "no config.json" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = run_main([tmp_path / "other", out], capsys)
    assert code == 2 and "not a ToyGPT" in err
    assert_nothing_written(out)


def test_already_quantized_src(int8_dir, tmp_path, capsys):
    out = tmp_path / "again"
    code, err = run_main([int8_dir[0], out], capsys)
    assert code == 2 and "is an int8-quantized ToyGPT directory" in err and "fp32" in err
    assert_nothing_written(out)


def test_existing_out_needs_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main([tiny_model_dir, out, "--speed-tokens", 0], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, err = run_main([tiny_model_dir, tiny_model_dir, "--overwrite"], capsys)
    assert code == 2 and "is SRC_DIR itself" in err
    # --overwrite replaces only a model dir this project wrote: a dir of the user's files is refused, untouched.
    code, err = run_main([tiny_model_dir, out, "--overwrite", "--speed-tokens", 0], capsys)
    assert code == 2 and "not a directory this project wrote" in err and "keep.txt" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert run_main([tiny_model_dir, out, "--speed-tokens", 0], capsys)[0] == 0  # an empty OUT_DIR is fine
    (out / "notes.txt").write_text("mine")  # the user's file inside an int8 dir survives its --overwrite
    assert run_main([tiny_model_dir, out, "--overwrite", "--speed-tokens", 0], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "config.json").read_text())["quantization"]


def test_corrupt_weights(tiny_model_dir, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    code, err = run_main([truncated, out], capsys)
    assert code == 2 and "model.safetensors cannot be loaded" in err and "Nothing was written" in err
    assert_nothing_written(out)

    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_model_dir, incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    code, err = run_main([incomplete, out], capsys)
    assert code == 2 and "transformer.h.1.mlp.c_fc.weight" in err
    assert_nothing_written(out)


def test_bad_eval_input(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main([tiny_model_dir, out, "--eval-input", tmp_path / "nope.txt"], capsys)
    assert code == 2 and "--eval-input" in err
    assert_nothing_written(out)



def test_val_loss_defaults_to_the_text_train_py_recorded(tiny_model_dir, shakespeare_path, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "training_args.json").write_text(json.dumps({"input_path": str(shakespeare_path)}))
    figures = quantization.quantize_dir(src, tmp_path / "out", eval_batches=1, batch_size=2, speed_tokens=4,
                                    log=lambda *a: None)
    assert figures["before"]["val_loss"] > 0 and figures["after"]["val_loss"] > 0
    assert shakespeare_path.name in (tmp_path / "out" / "README.md").read_text()
    # A recorded path that is gone: no evaluation, and the card says how to get one.
    (src / "training_args.json").write_text(json.dumps({"input_path": str(tmp_path / "moved.txt")}))
    figures = quantization.quantize_dir(src, tmp_path / "out2", speed_tokens=4, log=lambda *a: None)
    assert figures["before"]["val_loss"] is None
    assert "--eval-input" in (tmp_path / "out2" / "README.md").read_text()


def test_failure_while_writing_leaves_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def broken(directory, int8):
        raise RuntimeError("simulated failure after the files were written")

    out = tmp_path / "out"
    assert quantize.main([str(tiny_model_dir), str(out), "--speed-tokens", "0"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(quantization, "check_written", broken)
    shutil.rmtree(out)
    assert quantize.main([str(tiny_model_dir), str(out), "--speed-tokens", "0"]) == 1  # a message, no traceback
    assert "simulated failure" in capsys.readouterr().err.splitlines()[-1]
    assert_nothing_written(out)
    out.mkdir()
    for name, content in before.items():  # --overwrite: the old OUT survives a failed write untouched
        (out / name).write_bytes(content)
    assert quantize.main([str(tiny_model_dir), str(out), "--speed-tokens", "0", "--overwrite"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.*"))


# --------------------------------------------------------------------------------------------------------------
# Which fp32 weights an int8 dir came from


def retrained(src, tmp_path, name="retrained"):
    """A copy of model dir `src` whose weights were then replaced, as `train.py --overwrite` replaces them."""
    from toygpt.model_dir import save_model_dir

    copy = tmp_path / name
    shutil.copytree(src, copy)
    save_model_dir(random_model(seed=7), copy, overwrite=True)
    return copy


def test_int8_dir_records_the_sha256_of_its_source_weights(int8_dir, tiny_model_dir):
    out, figures = int8_dir
    sha256 = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((out / "quantization_report.json").read_text())["source_sha256"] == sha256
    assert figures["source_sha256"] == sha256
    assert f"sha256 `{sha256}`" in (out / "README.md").read_text()
    assert quantization.stale_int8(tiny_model_dir, out) is None


def test_int8_of_weights_since_replaced_is_stale_and_push_refuses_it(int8_dir, tiny_model_dir, tmp_path, capsys):
    import push_to_hub

    src = retrained(tiny_model_dir, tmp_path)
    problem = quantization.stale_int8(src, int8_dir[0])
    assert "quantized from other weights" in problem
    assert f"python quantize.py {src} {int8_dir[0]} --overwrite" in problem
    stage = tmp_path / "stage"
    code = push_to_hub.main(["--model-dir", str(src), "--quantized-dir", str(int8_dir[0]), "--repo-id", "alice/toygpt",
                             "--dry-run", str(stage)])
    err = capsys.readouterr().err
    assert code == 2 and "--quantized-dir:" in err and "--overwrite" in err and not stage.exists()


def test_int8_dir_without_a_source_record_still_loads_and_pairs(int8_dir, tiny_model_dir, tmp_path):
    """int8 dirs written before quantize.py recorded its source keep working (unchecked)."""
    old = tmp_path / "old-int8"
    shutil.copytree(int8_dir[0], old)
    report = json.loads((old / "quantization_report.json").read_text())
    del report["source_sha256"]
    (old / "quantization_report.json").write_text(json.dumps(report))
    assert quantization.recorded_source(old) is None
    assert quantization.stale_int8(retrained(tiny_model_dir, tmp_path), old) is None
    from toygpt import model_card

    assert "## int8 quantized variant" in str(model_card.dir_card(model_card.read_records(old)))
    model = ToyGPTForCausalLM.from_pretrained(old).eval()
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)


def test_quantize_refuses_a_src_that_a_run_is_writing(tiny_model_dir, tmp_path, capsys):
    from toygpt.model_dir import OutputDir

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    out = src / "int8"
    with OutputDir(src, replace=True, log=lambda *a: None):  # as train.py --overwrite holds it while it runs
        code, err = run_main([src, out, "--speed-tokens", 0], capsys)
    assert code == 2 and "is being written by another run (pid" in err and "wait for it to finish" in err
    assert_nothing_written(out)
    assert run_main([src, out, "--speed-tokens", 0], capsys)[0] == 0  # free again


def test_quantize_refuses_weights_replaced_while_it_read_them(tiny_model_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    load = quantization.load_fp32_model

    def load_then_replace(path, *args):  # a train.py run swaps in its new model dir while quantize reads the old one
        model = load(path, *args)
        shutil.copy(src / "model.safetensors", tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", src / "model.safetensors")
        return model

    monkeypatch.setattr(quantization, "load_fp32_model", load_then_replace)
    code, err = run_main([src, tmp_path / "out", "--speed-tokens", 0], capsys)
    assert code == 2 and "was replaced while it was being read" in err
    assert_nothing_written(tmp_path / "out")


def test_quantize_shows_each_measuring_phase_and_ends_with_a_summary(tiny_model_dir, tmp_path, shakespeare_path):
    """Every wait shows progress (issue 21.3: each 'measuring' phase was silent), on stderr even when it is a log
    file; stdout ends with what was written and where, and the next commands with the exact paths."""
    import subprocess

    out = tmp_path / "my int8"  # a path that needs quoting in the suggested commands
    proc = subprocess.run([sys.executable, "quantize.py", str(tiny_model_dir), str(out), "--speed-tokens", "8",
                           "--eval-input", str(shakespeare_path), "--eval-batches", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for phase in ("fp32 tokens/s", "fp32 val loss", "int8 tokens/s", "int8 val loss"):
        assert f"{phase}: 100%" in proc.stderr, phase
    assert "Loading weights" not in proc.stderr and "Writing model shards" not in proc.stderr
    summary = proc.stdout[proc.stdout.index("quantized: "):]
    report = json.loads((out / "quantization_report.json").read_text())
    assert f"{report['before']['val_loss']:.4f} -> {report['after']['val_loss']:.4f}" in summary
    assert f"{report['size_int8'] / report['size_fp32']:.3f}x" in summary
    from toygpt.summary import python_command

    assert f"TOYGPT_MODEL='{out}' {python_command()} space/app.py" in summary
    assert f"--model-dir {tiny_model_dir} --quantized-dir '{out}'" in summary


# --------------------------------------------------------------------------------------------------------------
# Quality as llama.cpp measures it


def test_logit_quality_exact_and_top_k_with_a_remainder_bucket():
    torch.manual_seed(0)
    reference, other = torch.randn(40, 300) * 3, torch.randn(40, 300) * 3
    targets = torch.randint(0, 300, (40,))
    same = quantization.LogitQuality()
    same.add(reference, targets, other_logits=reference)
    assert same.figures()["mean_kld"] == pytest.approx(0, abs=1e-12) and same.figures()["same_top"] == 1
    assert same.figures()["ppl_ratio"] == pytest.approx(1)

    exact, full_k, top_k = quantization.LogitQuality(), quantization.LogitQuality(), quantization.LogitQuality()
    exact.add(reference, targets, other_logits=other)
    expected = F.kl_div(F.log_softmax(other, -1), F.log_softmax(reference, -1), log_target=True,
                        reduction="batchmean").item()
    assert exact.figures()["mean_kld"] == pytest.approx(expected, rel=1e-5)
    ppl = lambda logits: torch.exp(F.cross_entropy(logits, targets)).item()  # noqa: E731
    assert exact.figures()["ppl_ratio"] == pytest.approx(ppl(other) / ppl(reference), rel=1e-5)
    everything = torch.log_softmax(other, -1).topk(300)
    full_k.add(reference, targets, other_top=(everything.indices, everything.values))
    assert full_k.figures()["mean_kld"] == pytest.approx(exact.figures()["mean_kld"], rel=1e-5)
    assert full_k.figures()["ppl_ratio"] == pytest.approx(exact.figures()["ppl_ratio"], rel=1e-5)
    top = torch.log_softmax(other, -1).topk(10)
    top_k.add(reference, targets, other_top=(top.indices, top.values))
    figures = top_k.figures()
    assert 0 < figures["mean_kld"] <= exact.figures()["mean_kld"]  # the bucket: a lower bound
    assert figures["same_top"] == exact.figures()["same_top"] and figures["ppl_ratio"] is None
    assert 0 < figures["outside_top_k"] < 1 and 0 < figures["remainder_mass"] < 1


def test_kld_chunks_cut_the_held_out_split_and_score_the_second_half(shakespeare_path):
    chunks = quantization.kld_chunks(shakespeare_path, 64)
    assert chunks.shape[1] == 64 and len(chunks) > 100
    positions, targets = quantization.scored(chunks[:3])
    assert (positions.start, positions.stop) == (32, 63) and torch.equal(targets, chunks[:3, 33:].reshape(-1))
    model = random_model()
    figures = quantization.logit_quality(model, {"int8": quantize_int8(model), "same": model}, chunks[:2])
    assert figures["same"]["mean_kld"] == pytest.approx(0, abs=1e-9)
    assert 0 < figures["int8"]["mean_kld"] < 0.01 and figures["int8"]["positions"] == 2 * 31


# --------------------------------------------------------------------------------------------------------------
# The block kernel (one scale per 32 weights, int16 activations) and version 3's rounding


def test_group_rounding_keeps_an_outlier_to_its_own_32_weights():
    torch.manual_seed(0)
    weight = torch.randn(40, 100) * 0.02  # 100 columns: 3 whole groups and a partial one
    weight[3, 40] = 5.0  # an outlier coarsens the rounding of its own group of 32 only
    q, scale = quantization.quantize_groups(weight)
    assert q.shape == (40, 100) and scale.shape == (40, 4) and scale.dtype == torch.float16
    steps = scale.float().repeat_interleave(32, dim=1)[:, :100]
    error = int8_toygpt.dequantize(q, scale) - weight
    assert (error.abs() <= steps / 2 + 1e-7).all()  # at most half a step per element, with the fp16 scale as stored
    assert steps[3, 40] > 50 * steps[3, 0] and steps[3, 0] < 2 * steps[:, 0].median()  # the row's other groups
    assert relative_error(int8_toygpt.dequantize(q, scale)[:, 64:], weight[:, 64:]) < 0.01


def packed_block(rows, cols, seed=0, per_row=False):
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols) * 0.05
    q, scale = quantize_rows(weight) if per_row else quantization.quantize_groups(weight)
    return q, scale, int8_toygpt.BlockInt8Kernel()


@pytest.mark.parametrize("rows, cols, per_row", [(37, 100, False), (64, 128, False), (50, 70, True)])
def test_block_kernel_computes_the_dequantized_matmul(rows, cols, per_row):
    """Partial groups of 16 rows and blocks of 32 columns, several activation rows, a bias; per-row scales (version
    2 dirs) run as the same scale in every block. What is left is the int16 rounding of the activations."""
    q, scale, kernel = packed_block(rows, cols, per_row=per_row)
    bias = torch.randn(rows)
    x = torch.randn(2, 3, cols) * 4
    x[0, 0, 5] = 300.0  # an outlier token rounds coarser, on its own row only
    y = kernel.linear(x, kernel.pack(q, scale, bias))
    exact = F.linear(x, int8_toygpt.dequantize(q, scale), bias)
    assert y.shape == (2, 3, rows)
    assert relative_error(y[0, 0], exact[0, 0]) < 1e-3 and relative_error(y[1], exact[1]) < 1e-4


def test_block_kernel_serves_rows_and_unpacks_to_the_stored_int8():
    q, scale, kernel = packed_block(45, 96)
    packed = kernel.pack(q, scale, None)
    ids = torch.tensor([[0, 15, 16, 44], [44, 3, 3, 31]])
    assert torch.equal(kernel.rows(packed, ids), int8_toygpt.dequantize(q, scale)[ids])
    assert torch.equal(kernel.unpack(packed, scale), q)


def repeated_rows(rows=200, distinct=51, cols=96, seed=0):
    """int8 rows and scales where rows distinct-1.. all equal one shared row, as a corpus vocabulary saves them."""
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols) * 0.05
    weight[distinct - 1:] = weight[distinct - 1]
    return quantization.quantize_groups(weight)


def test_distinct_rows_maps_repeated_rows_and_declines_otherwise(monkeypatch):
    q, scale = repeated_rows()
    index, first = int8_toygpt.distinct_rows(q, scale)
    assert torch.equal(first, torch.arange(51)) and torch.equal(index, torch.arange(200).clamp(max=50))
    assert int8_toygpt.distinct_rows(*quantization.quantize_groups(torch.randn(200, 96))) is None  # all distinct
    same_q = q.clone()
    same_q[:] = q[0]
    other_scale = scale.clone()
    other_scale[:] = scale[0]
    other_scale[7, 1] *= 2  # the same int8 row with another scale is another row
    assert int8_toygpt.distinct_rows(same_q, other_scale)[1].numel() == 2
    monkeypatch.setattr(torch, "randint", lambda low, high, size, generator=None: torch.zeros(size, dtype=torch.long))
    assert int8_toygpt.distinct_rows(q, scale) is None  # every hash collides: the exact check refuses the map


@pytest.mark.parametrize("kernel", ["block", "fallback"])
def test_an_embedding_packs_repeated_rows_once_and_computes_the_same(kernel, monkeypatch, fresh_kernel_choice):
    """The tied lm_head of a corpus-vocabulary model: the distinct rows are packed once, and logits, lookups,
    state_dict() and .to() give what the whole weight gives, bit for bit."""
    monkeypatch.setenv(int8_toygpt.KERNEL_ENV, kernel)
    q, scale = repeated_rows()
    embeddings = []
    for pack_distinct in (True, False):
        embedding = Int8Embedding(200, 96, group=32)
        embedding.load_state_dict({"weight": q, "weight_scale": scale})
        embedding.pack_distinct_rows = pack_distinct
        embeddings.append(embedding)
    distinct, whole = embeddings
    x = torch.randn(2, 3, 96)
    assert torch.equal(distinct._int8_linear(x), whole._int8_linear(x))
    assert distinct._row_index is not None and whole._row_index is None
    if kernel == "block":
        assert distinct._packed[0].shape[0] == 4 and whole._packed[0].shape[0] == 13  # groups of 16 rows packed
    ids = torch.tensor([[0, 49, 50, 199], [120, 3, 51, 50]])
    assert torch.equal(distinct(ids), whole(ids)) and torch.equal(distinct(ids), dequantize(q, scale)[ids])
    assert torch.equal(distinct.state_dict()["weight"], q)
    distinct.to(torch.device("cpu"))  # unpacks to the whole int8 weight, packed again on next use
    assert distinct._row_index is None and torch.equal(distinct.weight, q)
    assert torch.equal(distinct._int8_linear(x), whole._int8_linear(x))


def test_a_corpus_vocabulary_model_runs_int8_on_its_distinct_rows(tmp_path):
    """A model whose unseen tokens share one row (train.py --vocab corpus saves it so): its int8 copy packs the tied
    head's distinct rows only, and gives the logits and greedy tokens of the whole head."""
    model = random_model()
    with torch.no_grad():
        model.transformer.wte.weight[300:] = model.transformer.wte.weight[300]
    quantize_int8(model).save_pretrained(tmp_path / "int8")
    distinct = ToyGPTForCausalLM.from_pretrained(tmp_path / "int8").eval()
    whole = ToyGPTForCausalLM.from_pretrained(tmp_path / "int8").eval()
    whole.transformer.wte.pack_distinct_rows = False
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(distinct(ids).logits, whole(ids).logits)
    assert distinct.transformer.wte._row_first.numel() == 301
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, disable_compile=True)
    assert torch.equal(distinct.generate(ids, **kwargs), whole.generate(ids, **kwargs))
    distinct.save_pretrained(tmp_path / "again")
    assert torch.equal(load_file(tmp_path / "again" / "model.safetensors")["transformer.wte.weight"],
                       load_file(tmp_path / "int8" / "model.safetensors")["transformer.wte.weight"])


def test_block_kernel_gives_the_same_bits_on_any_thread_count():
    """Threads split the groups of rows; each output is summed in one order whatever the thread count."""
    q, scale, kernel = packed_block(1000, 256)
    packed = kernel.pack(q, scale, None)
    x = torch.randn(3, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.linear(x, packed)
        torch.set_num_threads(2)
        two = kernel.linear(x, packed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("per_row", [False, True])
def test_every_simd_path_of_the_block_kernel_computes_the_same(tmp_path, per_row):
    """The source has an AVX-512 VNNI, an AVX-512 BW, an AVX2 (with and without F16C) and a plain C path; build each
    this CPU can run (as a CPU without the wider instructions would) and compare them on the same packed weights,
    with fp16 group scales and with fp32 row scales (version 2 dirs)."""
    import ctypes
    import subprocess

    from torch._inductor.cpp_builder import get_cpp_compiler

    source = tmp_path / "block.cpp"
    source.write_text(int8_toygpt.BLOCK_KERNEL_SOURCE)
    q, scale, kernel = packed_block(100, 160, per_row=per_row)
    weight, scales, _, rows, cols = kernel.pack(q, scale, None)
    assert scales.dtype == (torch.float32 if per_row else torch.float16)
    x = torch.randn(2, cols)
    results = {}
    for flags in (["-march=native"], ["-march=native", "-mno-avx512vnni"], ["-march=native", "-mno-avx512f"],
                  ["-march=native", "-mno-avx512f", "-mno-f16c"], []):
        library = tmp_path / f"block{len(results)}.so"
        built = subprocess.run([get_cpp_compiler(), "-O3", "-fPIC", "-shared", *flags, str(source), "-o", str(library)],
                               capture_output=True)
        if built.returncode != 0:
            continue  # a compiler without these flags (not x86): the native build is tested elsewhere
        lib = ctypes.CDLL(str(library))
        y = torch.empty(2, rows)
        lib.toygpt_block_linear.argtypes = int8_toygpt.BLOCK_LINEAR_ARGTYPES
        assert lib.toygpt_block_linear(x.data_ptr(), 2, cols, weight.data_ptr(), scales.data_ptr(), not per_row,
                                       rows, None, y.data_ptr(), 1) == 0
        results[" ".join(flags) or "plain C"] = (lib.toygpt_block_simd(), y)
    assert results["plain C"][0] == 0  # the plain C path builds everywhere
    exact = F.linear(x, int8_toygpt.dequantize(q, scale))
    for name, (simd, y) in results.items():
        assert relative_error(y, exact) < 1e-4, name
        assert torch.allclose(y, results["plain C"][1], rtol=1e-5, atol=1e-5), name  # exact int32 sums: fp32 order


BLOCK_OP_RUN = """
import torch, int8_toygpt
from safetensors.torch import save_file
if {implementation!r} == "Python":  # as where torch's headers are missing: the build with the operator fails
    int8_toygpt._torch_op_flags = lambda: ([f'-DTOYGPT_TORCH_OP="{{int8_toygpt.BLOCK_OP}}"'], [])
library, problem = int8_toygpt.block_kernel_library()
assert problem is None, problem
assert hasattr(library, "toygpt_block_op_in_cpp") == ({implementation!r} == "C++")
torch.manual_seed(0)
kernel = int8_toygpt.BlockInt8Kernel()
weight, scales, bias, rows, cols = kernel.pack(torch.randint(-127, 128, (40, 96), dtype=torch.int8),
                                               torch.rand(40, 3).half(), torch.randn(40))
save_file({{"y": kernel.op(torch.randn(3, 96), weight, scales, bias, rows)}}, {out!r})
bad = {{"float64 x": (torch.randn(3, 96, dtype=torch.float64), weight, scales, bias, rows),
        "x wider than the weight": (torch.randn(3, 128), weight, scales, bias, rows),
        "more rows than packed": (torch.randn(3, 96), weight, scales, None, 56),
        "short bias": (torch.randn(3, 96), weight, scales, bias[:8], rows)}}
for name, args in bad.items():
    try:
        kernel.op(*args)
        print(name, "accepted")
    except RuntimeError as err:
        print(name, "refused:", str(err).splitlines()[0])
"""
REFUSALS = ("float64 x refused: ToyGPT int8: x must be 2-D float32",
            "x wider than the weight refused: ToyGPT int8: weight and scales must be packed for rows x x's columns",
            "more rows than packed refused: ToyGPT int8: weight and scales must be packed for rows x x's columns",
            "short bias refused: ToyGPT int8: bias must be float32, one per row")
# A process whose operator build would fail again: with the failure kept in the cache it is not retried.
BUILD_NOT_RETRIED = """
import subprocess, int8_toygpt
real_run = subprocess.run
def run(command, *args, **kwargs):
    assert not any("TOYGPT_TORCH_OP" in part for part in command), "the failed build was tried again"
    return real_run(command, *args, **kwargs)
subprocess.run = run
library, problem = int8_toygpt.block_kernel_library()
assert problem is None and not hasattr(library, "toygpt_block_op_in_cpp"), problem
print("not retried")
"""


def test_the_operator_in_cpp_and_in_python_computes_the_same_bits(tmp_path):
    """The block kernel's operator is implemented in C++ where torch's headers build (no Python frame a call), else in
    Python around the same kernel (ctypes), chosen by itself: the same bits either way, and both refuse a bad input
    with the same error, not a crash or a read past the weights. Each in a fresh process (the operator is
    process-wide); the Python one with an empty kernel cache, so that its failing build is really tried, and kept as
    failed: the next process does not try it again."""
    results, printed = {}, {}
    for implementation in ("C++", "Python"):
        out = str(tmp_path / f"{implementation}.safetensors")
        env = {"TOYGPT_KERNEL_CACHE": str(tmp_path / "cache")} if implementation == "Python" else None
        printed[implementation] = run_python(BLOCK_OP_RUN.format(implementation=implementation, out=out), cwd=REPO,
                                             env=env)
        results[implementation] = load_file(out)["y"]
    assert results["C++"].shape == (3, 40) and torch.isfinite(results["C++"]).all()
    assert torch.equal(results["C++"], results["Python"])
    for implementation in ("C++", "Python"):
        assert all(refusal in printed[implementation] for refusal in REFUSALS), printed[implementation]
    assert [p.suffix for p in (tmp_path / "cache").iterdir()].count(".failed") == 1
    assert "not retried" in run_python(BUILD_NOT_RETRIED, cwd=REPO, env={"TOYGPT_KERNEL_CACHE": str(tmp_path / "cache")})


def test_the_compiled_kernel_is_kept_and_reused(tmp_path):
    code = ("import os, torch, int8_toygpt\n"
            "library, problem = int8_toygpt.block_kernel_library()\n"
            "assert problem is None, problem\n"
            "print(library._name)")
    env = {"TOYGPT_KERNEL_CACHE": str(tmp_path / "cache")}
    first = run_python(code, cwd=REPO, env=env).strip().splitlines()[-1]
    stamp = os.stat(first).st_mtime_ns
    second = run_python(code, cwd=REPO, env=env).strip().splitlines()[-1]
    assert first == second and os.stat(second).st_mtime_ns == stamp  # built once, loaded after
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [os.path.basename(first)]  # no temp files left


def test_version_2_dirs_run_on_the_block_kernel_and_unknown_group_sizes_are_refused(int8_v2_dir, tmp_path,
                                                                                     tiny_model_dir):
    """Dirs written by the previous quantize.py (per-row scales) load and run on the block kernel, pickle-free."""
    old = ToyGPTForCausalLM.from_pretrained(int8_v2_dir).eval()
    fp32 = ToyGPTForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert relative_error(old(ids).logits, fp32(ids).logits) < 0.05
    assert old.transformer.h[0].attn.c_attn._kernel.name == "block"
    assert old.transformer.wpe.weight.dtype == torch.float32  # version 2: fp32 positions

    odd = tmp_path / "group64"
    shutil.copytree(int8_v2_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["quantization"].update(version=3, group_size=64)
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="group_size 64 is not the 32"):
        ToyGPTForCausalLM.from_pretrained(odd)


def test_the_speed_warm_up_compiles_the_graph_the_timed_call_runs(monkeypatch):
    """int8's static cache is sized per call: the warm-up's 2 tokens must get the timed call's size, or the timed
    call would compile again (the graph per cache size) inside its measurement."""
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    model = quantize_int8(ToyGPTForCausalLM(small_config(block_size=1024)).eval())
    calls = []

    def spy(ids, **kwargs):  # records the caches the calls would get; nothing is compiled
        fast = int8_toygpt.fast_decode_kwargs(model, kwargs, ids)
        calls.append(max(fast["max_cache_len"], ids.shape[1] + kwargs["max_new_tokens"]))
        return torch.cat([ids, ids.new_zeros(1, kwargs["max_new_tokens"])], dim=1)

    monkeypatch.setattr(model, "generate", spy)
    quantization.greedy_tokens_per_second(model, new_tokens=300)
    assert calls == [512, 512]  # the prompt and 300 new tokens: over 256 slots


def test_the_benchmark_refuses_a_missing_corpus_or_model_dir_in_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_quantize", REPO / "bench" / "quantize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for argv, problem in [(["--input", str(tmp_path / "none.txt"), "--parts", "trained"], "no such file"),
                          (["--trained-dir", str(tmp_path), "--input", __file__], "no config.json there")]:
        with pytest.raises(SystemExit) as exit_:
            bench.main(argv)
        assert exit_.value.code == 2 and problem in capsys.readouterr().err
