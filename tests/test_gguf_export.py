"""`convert_gpt2.py to-gguf`: a ToyGPT dir -> a GPT-2 GGUF file, checked by independent readers: the gguf package's
reader (metadata, tensor types), transformers (`gguf_file=`: logits, tokenizer, greedy tokens) and llama.cpp itself (tokenizer, greedy tokens)
through xllamacpp's prebuilt wheel and, where it is installed, llama-cpp-python."""

import json
import os
import re
import shutil
import subprocess
import urllib.request

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import small_config
from convert_gpt2 import main
from toygpt.model_dir import save_model_dir
from modeling_toygpt import ToyGPTForCausalLM

EOT = 50256
TEXT = "ROMEO: Hello, my name is  Juliet!\n\nWhat's 3.14 <|endoftext|> ünïcödé 🚀"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved dir; the wide init spreads the random model's logits, so argmax never hinges on float rounding."""
    torch.manual_seed(0)
    return save_model_dir(ToyGPTForCausalLM(small_config(initializer_range=0.2)), tmp_path_factory.mktemp("g") / "m")


@pytest.fixture(scope="module")
def ggufs(model_dir, tmp_path_factory):
    """{type: path} of the model exported with each --type, through the CLI, into a folder of GGUF files only."""
    out = tmp_path_factory.mktemp("gguf")
    for out_type in ("f32", "f16", "q8_0"):
        assert main(["to-gguf", str(model_dir), str(out / f"toygpt-{out_type}.gguf"), "--type", out_type]) == 0
    return {out_type: out / f"toygpt-{out_type}.gguf" for out_type in ("f32", "f16", "q8_0")}


def load_gguf(path):
    """transformers' GGUF loader. It reads context_length into `n_ctx`, which GPT2Config ignores (transformers 5.24),
    so a context other than 1024 is set from it by hand."""
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.n_positions = config.n_ctx
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config).eval()


def greedy(model, input_ids, new_tokens=32):
    out = model.generate(input_ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=EOT)
    return out[0, input_ids.shape[1]:].tolist()


def test_gguf_holds_gpt2_metadata_tokenizer_and_llama_cpps_tensor_types(ggufs):
    reader = gguf.GGUFReader(ggufs["q8_0"])

    def field(key):
        value = reader.fields[key]
        return value.contents()

    assert field("general.architecture") == "gpt2"
    assert (field("gpt2.context_length"), field("gpt2.block_count"), field("gpt2.embedding_length")) == (64, 2, 32)
    assert (field("gpt2.feed_forward_length"), field("gpt2.attention.head_count")) == (128, 2)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[EOT] == "<|endoftext|>" and tokens[262] == "Ġthe"
    assert field("tokenizer.ggml.merges")[0] == "Ġ t" and field("tokenizer.ggml.eos_token_id") == EOT

    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: readers reuse token_embd
    assert types["token_embd.weight"] == types["blk.1.attn_qkv.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["position_embd.weight"] == types["blk.0.attn_norm.weight"] == types["blk.0.attn_qkv.bias"] == "F32"
    f16 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ggufs["f16"]).tensors}
    assert f16["blk.0.ffn_up.weight"] == "F16" and f16["output_norm.bias"] == "F32"
    assert ggufs["q8_0"].stat().st_size < ggufs["f16"].stat().st_size < ggufs["f32"].stat().st_size


def test_transformers_loads_the_f32_gguf_with_toygpts_logits_and_tokenizer(model_dir, ggufs):
    model = ToyGPTForCausalLM.from_pretrained(model_dir).eval()
    loaded = load_gguf(ggufs["f32"])
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    input_ids = torch.randint(0, EOT, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(ggufs["f32"].parent, gguf_file=ggufs["f32"].name)
    expected = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)(TEXT)["input_ids"]
    assert tokenizer(TEXT)["input_ids"] == expected and tokenizer.decode(expected) == TEXT


def test_q8_0_gguf_picks_the_same_greedy_token_at_90_percent_of_positions(model_dir, ggufs):
    """Next-token argmax at every position of random text (teacher-forced: on a random model, free-running
    generation turns a first flip into a different continuation, which measures chaos, not quantization)."""
    model = ToyGPTForCausalLM.from_pretrained(model_dir).eval()
    loaded = load_gguf(ggufs["q8_0"])
    input_ids = torch.randint(0, EOT, (8, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        agreement = (loaded(input_ids).logits.argmax(-1) == model(input_ids).logits.argmax(-1)).float().mean()
    assert agreement >= 0.9, agreement


class XllamacppRuntime:
    """llama.cpp through xllamacpp, whose prebuilt CPU wheel (glibc 2.17) installs with `make install`: llama.cpp's
    own server, in-process, listening on 127.0.0.1. Its native routes take and return token ids (the OpenAI-style
    `handle_completions` withholds a token's id while its text is an incomplete UTF-8 sequence)."""

    def __init__(self, path, n_ctx):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx, params.n_parallel, params.warmup = n_ctx, 1, False
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
        self.server = xllamacpp.Server(params)

    def post(self, route, body):
        request = urllib.request.Request(self.server.listening_address + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def tokenize(self, text):
        return self.post("/tokenize", {"content": text, "add_special": False})["tokens"]

    def greedy(self, prompt_ids, new_tokens):
        return self.post("/completion", {"prompt": prompt_ids, "n_predict": new_tokens, "temperature": 0.0,
                                         "top_k": 1, "ignore_eos": True, "cache_prompt": False,
                                         "return_tokens": True})["tokens"]

    def close(self):
        del self.server


class LlamaCppPythonRuntime:
    """llama.cpp through llama-cpp-python (`make install-llama-cpp` compiles it), where it is installed."""

    def __init__(self, path, n_ctx):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, seed=0, verbose=False)

    def tokenize(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False)

    def greedy(self, prompt_ids, new_tokens):
        generated = []
        for token in self.llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            generated.append(token)
            if len(generated) == new_tokens:
                return generated

    def close(self):
        self.llm.close()


LLAMA_CPP_RUNTIMES = {
    "xllamacpp": (XllamacppRuntime, "xllamacpp is not installed (requirements-dev.txt: `make install`)"),
    "llama_cpp": (LlamaCppPythonRuntime,
                  "llama-cpp-python is not installed (`make install-llama-cpp`: it compiles llama.cpp)"),
}


@pytest.fixture(params=sorted(LLAMA_CPP_RUNTIMES))
def llama_cpp_runtime(request):
    """A factory for one llama.cpp binding; each test closes what it opens."""
    runtime, reason = LLAMA_CPP_RUNTIMES[request.param]
    pytest.importorskip(request.param, reason=reason)
    opened = []

    def open_gguf(path, n_ctx):
        opened.append(runtime(path, n_ctx))
        return opened[-1]

    yield open_gguf
    for llm in opened:
        llm.close()


def test_llama_cpp_generates_toygpts_greedy_tokens_from_the_f32_gguf(model_dir, ggufs, llama_cpp_runtime):
    model = ToyGPTForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    llm = llama_cpp_runtime(ggufs["f32"], 64)
    assert llm.tokenize(TEXT) == tokenizer(TEXT)["input_ids"]
    for prompt in ("ROMEO:", "Hello, my name is"):
        prompt_ids = tokenizer(prompt)["input_ids"]
        expected = greedy(model, torch.tensor([prompt_ids]), new_tokens=24)
        assert llm.greedy(prompt_ids, 24) == expected, prompt


def test_llama_cpp_q8_0_picks_toygpts_greedy_token_at_90_percent_of_positions(model_dir, ggufs, llama_cpp_runtime,
                                                                             record_property):
    """Teacher-forced, as the transformers q8_0 test above: llama.cpp's greedy next token after every prefix of random
    text against ToyGPT's fp32 argmax there. The agreement is reported (`record_property`, in the JUnit XML)."""
    model = ToyGPTForCausalLM.from_pretrained(model_dir).eval()
    input_ids = torch.randint(0, EOT, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids).logits.argmax(-1)
    llm = llama_cpp_runtime(ggufs["q8_0"], 64)
    matches = [llm.greedy(row[:k].tolist(), 1) == [expected[i, k - 1].item()]
               for i, row in enumerate(input_ids) for k in range(1, 64)]
    agreement = sum(matches) / len(matches)
    record_property("llama_cpp_q8_0_greedy_agreement", agreement)
    print(f"llama.cpp q8_0 greedy agreement with ToyGPT fp32: {agreement:.3f} of {len(matches)} positions")
    assert agreement >= 0.9, agreement


def test_model_without_biases_exports_zero_biases(tmp_path):
    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(bias=False, initializer_range=0.2)).eval()
    save_model_dir(model, tmp_path / "m")
    (tmp_path / "gguf").mkdir()
    assert main(["to-gguf", str(tmp_path / "m"), str(tmp_path / "gguf" / "m.gguf")]) == 0  # default type f32
    input_ids = torch.randint(0, EOT, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(tmp_path / "gguf" / "m.gguf")(input_ids).logits, model(input_ids).logits,
                                   rtol=0, atol=1e-4)


def test_bad_input_is_refused_with_exit_2_and_nothing_written(model_dir, ggufs, tmp_path, capsys):
    int8_dir = tmp_path / "int8"
    shutil.copytree(model_dir, int8_dir)
    config = json.loads((int8_dir / "config.json").read_text())
    (int8_dir / "config.json").write_text(json.dumps({**config, "quantization": {"method": "int8"}}))
    cases = [
        (["to-gguf", str(int8_dir), str(tmp_path / "a.gguf")], "int8-quantized.*export the fp32 directory"),
        (["to-gguf", str(model_dir), str(ggufs["f32"])], "already exists.*--overwrite"),
        (["to-gguf", str(tmp_path / "missing"), str(tmp_path / "b.gguf")], "is not a directory"),
        (["to-gguf", str(model_dir), str(tmp_path / "no" / "c.gguf")], "is not a directory; create it first"),
        (["to-gguf", str(model_dir), str(tmp_path)], "is a directory; name the file to write"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err), argv
    with pytest.raises(SystemExit) as exit_info:
        main(["to-gpt2", str(model_dir), str(tmp_path / "d"), "--type", "q8_0"])
    assert exit_info.value.code == 2 and "--type applies to to-gguf only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_overwrite_replaces_only_a_gguf_file_this_project_wrote(model_dir, ggufs, tmp_path, capsys):
    """--overwrite never replaces an input, a file inside one, a user's own file or a GGUF another tool wrote; a link
    is never swapped for a file. A GGUF this project wrote is replaced."""
    weights = (model_dir / "model.safetensors").read_bytes()
    theirs = tmp_path / "notes.gguf"
    writer = gguf.GGUFWriter(theirs, "gpt2")  # a GGUF from another tool: valid, but not ours
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "thesis.txt").write_text("mine")
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    cases = [(model_dir / "model.safetensors", "not a file this project wrote"),
             (theirs, "not a file this project wrote"), (tmp_path / "thesis.txt", "not a file this project wrote"),
             (tmp_path / "dangling.gguf", "symbolic link to .*elsewhere.gguf, which does not exist")]
    for dst, message in cases:
        before = dst.read_bytes() if dst.exists() else None
        assert main(["to-gguf", str(model_dir), str(dst), "--overwrite"]) == 2
        assert re.search(message, capsys.readouterr().err), dst
        assert (dst.read_bytes() if dst.exists() else None) == before
    assert main(["to-gguf", str(model_dir), str(tmp_path / "dangling.gguf")]) == 2  # without --overwrite too
    assert (model_dir / "model.safetensors").read_bytes() == weights and ToyGPTForCausalLM.from_pretrained(model_dir)
    assert not (tmp_path / "elsewhere.gguf").exists() and (tmp_path / "dangling.gguf").is_symlink()
    ours = tmp_path / "ours.gguf"
    shutil.copyfile(ggufs["q8_0"], ours)
    assert main(["to-gguf", str(model_dir), str(ours), "--type", "f16", "--overwrite"]) == 0
    assert gguf.GGUFReader(ours).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16


def test_temp_files_of_killed_runs_are_removed_by_the_next_writer(model_dir, tmp_path, capsys):
    stale = tmp_path / ".m.gguf.tmp-99999"
    stale.write_bytes(b"x" * 1000)
    assert main(["to-gguf", str(model_dir), str(tmp_path / "m.gguf")]) == 0
    assert ".m.gguf.tmp-99999" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_full_disk_is_one_line_and_the_old_file_stays(model_dir, ggufs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    shutil.copyfile(ggufs["f32"], out)
    before = out.read_bytes()

    def short_write(self, *args, **kwargs):  # what numpy's tofile raises when the disk fills mid-tensor
        raise OSError("1608224 requested and 633232 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    assert main(["to-gguf", str(model_dir), str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.fullmatch(rf"convert_gpt2.py: error: the disk holding {tmp_path} is full .*"
                                                   "m.gguf is as it was. Free some space.*", err.splitlines()[-1]), err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_is_one_line(model_dir, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert main(["to-gguf", str(model_dir), str(disk / "m.gguf")]) == 1  # the f32 file is ~7 MB
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"error: the disk holding {disk} is full" in err.splitlines()[-1], err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
