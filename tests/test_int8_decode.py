"""int8 generate()'s fast path: a static KV cache and a compiled decode step by default, its off switches, and the
eager fallback without a C++ compiler. conftest.py turns the fast path off for the rest of the suite (compiling
costs seconds); these tests turn it back on where they need it."""

import functools
import warnings

import pytest
import torch
from transformers import GenerationConfig

import int8_toygpt
from conftest import small_config
from int8_toygpt import fast_decode_kwargs
from modeling_toygpt import ToyGPTForCausalLM
from toygpt.quantization import quantize_int8

PROMPT = torch.tensor([[5, 17, 42, 3, 60, 11, 29, 8]])


@pytest.fixture(scope="module")
def int8_model():
    # A small vocabulary and a large init: no near-tie among the top logits (seed 17: the smallest top-2 gap over
    # these tests' steps is 0.10), so int8's rounding, which a compiled graph may do in another order, flips no token.
    torch.manual_seed(17)
    return quantize_int8(ToyGPTForCausalLM(small_config(vocab_size=64, initializer_range=0.5)).eval())


@pytest.fixture(autouse=True)
def no_compiled_graphs():
    """Each test starts with none of dynamo's graphs: dynamo keeps recompile_limit (8) graphs of forward a process,
    every model's, and these tests compile a shape or cache size each."""
    torch._dynamo.reset()


@pytest.fixture
def no_compiled_step(int8_model):
    """generate() keeps the compiled step on the model; each test starts without one."""
    int8_model.__dict__.pop("_compiled_call", None)
    yield int8_model
    int8_model.__dict__.pop("_compiled_call", None)


def greedy(model, max_new_tokens=24, **kwargs):
    with torch.inference_mode():
        return model.generate(PROMPT, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              output_logits=True, **kwargs)


def test_int8_generate_compiles_a_static_decode_step_with_the_eager_greedy_tokens(no_compiled_step, monkeypatch):
    model = no_compiled_step
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    eager = greedy(model, cache_implementation="dynamic")
    margins = [float(top[0, 0] - top[0, 1]) for top in (logits.topk(2).values for logits in eager.logits)]
    assert min(margins) > 0.04, "the fixture's logits have a near-tie: pick another seed"
    assert not hasattr(model, "_compiled_call")

    fast = greedy(model)
    assert hasattr(model, "_compiled_call"), "the default int8 generate() did not compile its decode step"
    assert fast.sequences.tolist() == eager.sequences.tolist()
    for step, (a, b) in enumerate(zip(fast.logits, eager.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=0.02, msg=f"step {step}")
    with pytest.raises(ValueError, match="exceeds the model's context block_size=64"):  # past the cache: said eagerly
        model.generate(PROMPT, max_new_tokens=100, do_sample=False, pad_token_id=0)
    # A longer prompt and more tokens reuse the cache (block_size here: under STATIC_CACHE_FLOOR): the eager tokens.
    longer = dict(max_new_tokens=30)
    with torch.inference_mode():
        ids = torch.cat([PROMPT, PROMPT], dim=1)
        assert model.generate(ids, do_sample=False, pad_token_id=0, **longer).tolist() == \
            model.generate(ids, do_sample=False, pad_token_id=0, cache_implementation="dynamic", **longer).tolist()


def test_the_static_cache_holds_the_call_rounded_up_to_a_power_of_two():
    config = GenerationConfig(max_length=20)
    prompt = torch.zeros(1, 300, dtype=torch.long)
    length = functools.partial(int8_toygpt.static_cache_length, 1024, config)
    assert length({"max_new_tokens": 1}, torch.zeros(1, 16, dtype=torch.long)) == 256  # the floor
    assert length({"max_new_tokens": 1}, prompt) == 512
    assert length({"input_ids": prompt, "max_new_tokens": 212}) == 512  # 300 + 212: exactly full
    assert length({"input_ids": prompt, "max_new_tokens": 213}) == 1024
    assert length({"inputs": prompt, "max_new_tokens": 5000}) == 1024  # at most the context (generate refuses more)
    assert length({"max_length": 700}, prompt) == 1024  # max_length counts the prompt already
    assert length({}, prompt) == 256  # generation_config's max_length: 20
    assert length({"inputs_embeds": torch.zeros(1, 4, 8)}) == 1024  # no ids to count: the whole context


def test_a_longer_call_grows_the_cache_and_keeps_the_eager_tokens(no_compiled_step, monkeypatch):
    """Calls that outgrow the cache get the next power of two (one more compile, a static graph for that size);
    transformers keeps the larger cache for later, shorter calls."""
    model = no_compiled_step
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    monkeypatch.setattr(int8_toygpt, "STATIC_CACHE_FLOOR", 16)
    monkeypatch.delattr(model, "_previous_max_cache_length", raising=False)
    for new_tokens, slots in [(4, 16), (24, 32), (40, 64), (4, 64)]:  # the prompt has 8 tokens
        fast = greedy(model, max_new_tokens=new_tokens)
        assert fast.past_key_values.layers[0].max_cache_len == slots
        eager = greedy(model, max_new_tokens=new_tokens, cache_implementation="dynamic")
        assert fast.sequences.tolist() == eager.sequences.tolist(), f"{new_tokens} new tokens"


def test_a_model_of_another_shape_gets_a_static_graph_of_its_own(monkeypatch):
    """Models of other shapes in one process (bench/quantize.py runs the 124M model, then the tiny one): dynamo's
    automatic dynamic shapes would compile the second one with its weights' sizes symbolic, a shape-generic step
    that ran the tiny model's token 2x slower. Only the mask's length (marked) is dynamic."""
    import logging

    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.INFO)  # setLevel, not the attribute: loggers cache isEnabledFor's answers
    shapes_log.addHandler(handler)
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    try:
        for width in (32, 48):
            torch.manual_seed(0)
            greedy(quantize_int8(ToyGPTForCausalLM(small_config(n_embd=width, vocab_size=64)).eval()), max_new_tokens=4)
    finally:
        shapes_log.removeHandler(handler)
        shapes_log.setLevel(level)
    assert any("create_symbol" in m and "attention_mask" in m for m in messages)  # the log was seen
    assert not [m for m in messages if "automatic dynamic" in m]


def test_past_dynamos_recompile_limit_generate_decodes_eagerly_with_a_warning(monkeypatch):
    """One more graph than recompile_limit would be a hard error under fullgraph=True: generate() says so and
    decodes eagerly, with the eager tokens."""
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    torch.manual_seed(0)
    greedy(quantize_int8(ToyGPTForCausalLM(small_config(n_embd=32, vocab_size=64)).eval()), max_new_tokens=4)
    torch.manual_seed(0)
    other = quantize_int8(ToyGPTForCausalLM(small_config(n_embd=48, vocab_size=64)).eval())
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.warns(UserWarning, match="recompile_limit decode steps already.*torch._dynamo.reset"):
        fast = greedy(other, max_new_tokens=6)
    assert not hasattr(other, "_compiled_call")
    assert fast.sequences.tolist() == greedy(other, max_new_tokens=6, cache_implementation="dynamic").sequences.tolist()


@pytest.mark.parametrize("switch", ["disable_compile", "dynamic", "env", "cache", "use_cache", "beams", "lookup"])
def test_each_off_switch_keeps_the_eager_dynamic_cache(int8_model, switch, monkeypatch):
    from transformers import DynamicCache

    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    assert fast_decode_kwargs(int8_model, {})["cache_implementation"] == "static"  # on by default
    kwargs = {"disable_compile": {"disable_compile": True}, "dynamic": {"cache_implementation": "dynamic"},
              "env": {}, "cache": {"cache": DynamicCache()}, "use_cache": {"use_cache": False},
              "beams": {"num_beams": 2}, "lookup": {"prompt_lookup_num_tokens": 3}}[switch]
    if switch == "env":
        monkeypatch.setenv("TOYGPT_INT8_COMPILE", "0")
    assert fast_decode_kwargs(int8_model, kwargs) == kwargs


def test_an_explicit_static_cache_compiles_too_and_fp32_models_are_left_alone(int8_model, monkeypatch):
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    chosen = fast_decode_kwargs(int8_model, {"cache_implementation": "static", "max_cache_len": 40})
    assert chosen["max_cache_len"] == 40 and chosen["compile_config"]._compile_all_devices
    fp32 = ToyGPTForCausalLM(small_config()).eval()
    with torch.inference_mode():
        fp32.generate(PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not hasattr(fp32, "_compiled_call")


def test_without_a_cpp_compiler_generate_warns_once_and_decodes_eagerly(no_compiled_step, monkeypatch):
    from torch._inductor import config as inductor_config

    model = no_compiled_step
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    int8_toygpt.inductor_problem.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = greedy(model)
        mine = [w for w in caught if "ToyGPT int8" in str(w.message)]
        assert len(mine) == 1 and "C++ compiler" in str(mine[0].message)
        assert not hasattr(model, "_compiled_call")
        assert out.sequences.tolist() == greedy(model, cache_implementation="dynamic").sequences.tolist()
    finally:
        int8_toygpt.inductor_problem.cache_clear()


@pytest.mark.parametrize("kernel", ["block", "int_mm", "fbgemm", "fallback"])
def test_the_compiled_step_runs_every_kernel_with_the_eager_greedy_tokens(kernel, monkeypatch):
    """The compiled step (inductor's C++ wrapper) calls each kernel's ops: the block kernel's operator, torch._int_mm,
    F.linear; fbgemm's prepacked weights cannot be traced, so that kernel decodes eagerly. Per-row scales (version 2)
    so that every kernel applies."""
    monkeypatch.setenv("TOYGPT_INT8_COMPILE", "1")
    monkeypatch.setenv(int8_toygpt.KERNEL_ENV, kernel)
    torch.manual_seed(17)
    model = quantize_int8(ToyGPTForCausalLM(small_config(vocab_size=64, initializer_range=0.5)).eval(),
                          group_size=None)
    eager = greedy(model, cache_implementation="dynamic")
    assert model.transformer.h[0].mlp.c_fc._kernel.name == kernel
    fast = greedy(model)
    assert hasattr(model, "_compiled_call") == (kernel != "fbgemm")
    assert fast.sequences.tolist() == eager.sequences.tolist()
