"""A saved ToyGPT dir, loaded the way each client a Hub model meets loads it, with real outcomes checked: the same
greedy tokens as the reference (ToyGPT's own generate, or GPT2LMHeadModel with the same weights), losses that fall,
exported graphs that match eager. GGUF readers (transformers, llama.cpp) are in test_gguf_export.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import small_config
from toygpt.model_dir import save_model_dir
from modeling_toygpt import ToyGPTForCausalLM

EOT = 50256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved dir; the wide init spreads the random model's logits, so argmax never hinges on float rounding."""
    torch.manual_seed(0)
    return save_model_dir(ToyGPTForCausalLM(small_config(initializer_range=0.2)), tmp_path_factory.mktemp("c") / "m")


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval()


def greedy(model, input_ids, **kwargs):
    return model.generate(input_ids, do_sample=False, max_new_tokens=12, pad_token_id=EOT, **kwargs)


def prompts(batch=2, length=6):
    return torch.randint(0, EOT, (batch, length), generator=torch.Generator().manual_seed(1))


def training_batch(length=32):
    """One fixed batch that the model can learn: a short cycle of tokens, repeated."""
    cycle = torch.randint(0, EOT, (8,), generator=torch.Generator().manual_seed(2))
    return cycle.repeat(4 * length // 8).view(4, length)


def test_trainer_trains_a_few_steps_and_the_loss_falls(model_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = load(model_dir).train()
    batch = training_batch()
    data = Dataset.from_dict({"input_ids": batch.tolist(), "labels": batch.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses
    trainer.save_model(str(tmp_path / "trained"))
    reloaded = load(tmp_path / "trained")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, model.eval()(batch).logits, rtol=0, atol=1e-5)


def test_peft_lora_trains_merges_and_reloads_with_the_same_logits(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                       task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = training_batch()
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(batch).logits, adapted, rtol=0, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "merged")(batch).logits, adapted, rtol=0, atol=1e-4)


def test_accelerate_device_map_with_disk_offload_gives_the_same_tokens(model_dir, tmp_path):
    device_map = {"transformer.wte": "cpu", "lm_head": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
                  "transformer.h.1": "disk", "transformer.ln_f": "cpu"}
    offloaded = load(model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert "disk" in offloaded.hf_device_map.values()
    assert greedy(offloaded, prompts()).tolist() == greedy(load(model_dir), prompts()).tolist()


@pytest.mark.slow
def test_static_cache_with_torch_compile_gives_the_dynamic_caches_tokens(model_dir):
    """transformers' recipe for static shapes: compile the forward (fullgraph: a graph break is an error)."""
    expected = greedy(load(model_dir), prompts()).tolist()
    model = load(model_dir)
    model.forward = torch.compile(model.forward, fullgraph=True)
    for _ in range(2):  # the second call runs the compiled graphs without recompiling
        assert greedy(model, prompts(), cache_implementation="static").tolist() == expected


def test_beam_search_gives_gpt2lmheadmodels_beams(model_dir, tmp_path):
    from toygpt.gpt2_conversion import convert_to_gpt2

    gpt2 = AutoModelForCausalLM.from_pretrained(convert_to_gpt2(model_dir, tmp_path / "gpt2")).eval()
    kwargs = dict(num_beams=4, num_return_sequences=2)
    assert greedy(load(model_dir), prompts(), **kwargs).tolist() == greedy(gpt2, prompts(), **kwargs).tolist()


def test_assisted_and_prompt_lookup_decoding_give_the_plain_greedy_tokens(model_dir):
    model = load(model_dir)
    torch.manual_seed(3)
    assistant = ToyGPTForCausalLM(small_config(n_layer=1, initializer_range=0.2)).eval()  # a different, weaker model
    prompt = prompts(batch=1)
    expected = greedy(model, prompt).tolist()
    assert greedy(model, prompt, assistant_model=assistant).tolist() == expected
    repetitive = prompt.repeat(1, 3)  # something for prompt lookup to find
    assert greedy(model, repetitive, prompt_lookup_num_tokens=3).tolist() == greedy(model, repetitive).tolist()


class Logits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits: the plain-tensor signature that exporters want."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def dynamic_shapes(model):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.config.block_size)
    return {0: batch, 1: seq}


def left_padded_inputs(batch=3, length=17):
    """Inputs of another shape than the export's example, with left padding."""
    input_ids = torch.randint(0, EOT, (batch, length), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = attention_mask[1, :2] = 0
    return input_ids, attention_mask


def test_torch_export_with_dynamic_batch_and_length_matches_eager(model_dir):
    model = load(model_dir)
    example = prompts(), torch.ones_like(prompts())
    shapes = dynamic_shapes(model)
    input_ids, attention_mask = left_padded_inputs()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        masked = torch.export.export(Logits(model).eval(), example, dynamic_shapes=(shapes, shapes)).module()
        torch.testing.assert_close(masked(input_ids, attention_mask), expected, rtol=0, atol=1e-5)
        # Without a mask: SDPA's is_causal, decided while the length is symbolic.
        plain = torch.export.export(model, (), {"input_ids": example[0], "use_cache": False},
                                    dynamic_shapes={"input_ids": shapes, "use_cache": None}).module()
        torch.testing.assert_close(plain(input_ids=input_ids, use_cache=False).logits, model(input_ids).logits,
                                   rtol=0, atol=1e-5)


def test_onnx_export_with_dynamic_axes_matches_eager_in_onnxruntime(model_dir, tmp_path):
    import onnxruntime

    model = load(model_dir)
    shapes = dynamic_shapes(model)
    program = torch.onnx.export(Logits(model).eval(), (prompts(), torch.ones_like(prompts())), dynamo=True,
                                dynamic_shapes=(shapes, shapes), input_names=["input_ids", "attention_mask"],
                                output_names=["logits"], verbose=False)
    program.save(str(tmp_path / "toygpt.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "toygpt.onnx"), providers=["CPUExecutionProvider"])
    input_ids, attention_mask = left_padded_inputs()
    (logits,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)
