"""toygpt/model_card.py: every card rendered from the records a model dir holds (config, training records, int8 report)."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from toygpt import model_card
from toygpt.model_card import FolderSizes, Records
from toygpt.train_config import TrainingConfig

CONFIG = {"model_type": "toygpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "dropout": 0.1,
          "vocab_size": 50257, "tie_word_embeddings": True}
INT8_CONFIG = {**CONFIG, "quantization": {"method": "toygpt-int8", "bits": 8}}
ARGS = {"preset": "tiny", "lr": 0.003, "min_lr": 0.0003, "warmup_steps": 4, "weight_decay": 0.1, "grad_clip": 1.0,
        "batch_size": 4, "grad_accum": 2, "seed": 7, "input_path": "/data/corpus/input.txt",
        "data_description": "tiny Shakespeare (downloaded)"}
FINAL = {"final": True, "step": 24, "train_loss": 7.65432, "val_loss": 7.12341, "val_perplexity": 1238.4567,
         "val_bits_per_char": 2.876543, "tokens_seen": 3072, "elapsed_s": 90.0, "world_size": 1, "device": "cpu",
         "n_params": 1_234_567}
REPORT = {"source": "toygpt", "n_params": 1_234_567, "size_fp32": 4_938_268, "size_int8": 1_300_000,
          "before": {"val_loss": 7.1234, "tokens_per_s": 50.04}, "after": {"val_loss": 7.1301, "tokens_per_s": 120.0},
          "eval": {"text": "input.txt", "windows": 16, "window_tokens": 64}, "kernel": "fbgemm", "threads": 2,
          "speed_tokens": 128}


def headings(card: ModelCard) -> list[str]:
    return [line for line in card.text.splitlines() if line.startswith("## ")]


def write_dir(directory, config, **records):
    """A model dir's records; the weights only as far as a safetensors header goes (8 + 4 elements)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(4)}, directory / "model.safetensors")
    for name, text in records.items():
        (directory / name).write_text(text)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Reading the records


def test_read_records_takes_the_last_final_record_and_skips_a_cut_line(tmp_path):
    earlier = {**FINAL, "val_loss": 9.0}
    metrics = [{"step": 8, "val_loss": 9.5}, earlier, {**FINAL, "step": 30}]
    model_dir = write_dir(tmp_path / "m", CONFIG, **{
        "training_args.json": json.dumps(ARGS),
        "metrics.jsonl": "".join(json.dumps(r) + "\n" for r in metrics) + '{"step": 31, "train_lo'})
    records = model_card.read_records(model_dir)
    assert records.config == CONFIG and records.int8_report is None
    assert records.training_args == TrainingConfig.from_record(ARGS)
    assert records.final["step"] == 30 and records.n_params == FINAL["n_params"] and records.trained


def test_read_records_without_training_records_counts_the_safetensors_header(tmp_path):
    records = model_card.read_records(write_dir(tmp_path / "m", CONFIG))
    assert (records.training_args, records.final, records.int8_report) == (None, None, None)
    assert records.n_params == 12 and not records.trained
    # An int8 dir counts its scales too: its report carries the fp32 count instead.
    records = model_card.read_records(write_dir(tmp_path / "q", INT8_CONFIG, **{
        "quantization_report.json": json.dumps(REPORT)}))
    assert records.n_params == REPORT["n_params"] and records.int8_report == REPORT


# ----------------------------------------------------------------------------------------------------------------
# The training card (train.py)


def test_training_card_renders_config_args_and_final_record():
    card = model_card.training_card(CONFIG, ARGS, FINAL)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "mit" and {"toygpt", "custom_code"} <= set(card.data.tags)
    assert "int8" not in card.data.tags
    text = card.text
    assert text.lstrip().startswith("# ToyGPT (tiny preset, 1.2M parameters)")
    assert "2 layers, 2 heads, 32-dim embeddings,\ncontext 64 tokens" in text and "1,234,567 parameters" in text
    assert "tiny Shakespeare (downloaded). Validation used the last 10% of its characters, never trained on" in text
    # A record without an optimizer or schedule was written when AdamW and cosine were all train.py had.
    words = " ".join(text.split())
    assert "AdamW (betas 0.9/0.95), weight decay 0.1" in words and "Muon" not in words
    assert "peak LR 0.003 with 4 warmup steps and cosine decay to 0.0003" in words
    assert "Batch 4 x 2 accumulation x 1 process(es)" in words and "24 optimizer steps, 3,072 training" in words
    assert "1.5 minutes on cpu" in words
    for row in ("| validation loss | 7.1234 | nats/token |", "| validation perplexity | 1238.46 |",
                "| validation bits per character | 2.8765 | bits/char |", "| final training loss | 7.6543 |"):
        assert row in text, row
    assert "![loss curve](loss_curve.png)" in text
    assert headings(card) == ["## Architecture", "## Training data", "## Training", "## Results", "## Usage"]
    # A local dir's snippet: a placeholder path, loading with remote code.
    assert 'repo = "path/to/this/model"' in text
    assert "AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)" in text
    assert "AutoTokenizer.from_pretrained(repo, trust_remote_code=True)" in text


def test_training_data_falls_back_to_the_input_file_name():
    args = {k: v for k, v in ARGS.items() if k != "data_description"}
    assert "`input.txt`. Validation used the last 10%" in model_card.training_card(CONFIG, args, FINAL).text


def training_words(args: dict) -> str:
    """The card's Training data and Training sections of a run recorded as `args`, whitespace collapsed."""
    text = model_card.training_card(CONFIG, args, FINAL).text
    return " ".join(text[text.index("## Training data"):text.index("## Results")].split())


# What train.py records for a default tiny run on a text file and for the gpt2 preset on a dataset without a validation
# split: the card says what each used (the tiny preset's card once said AdamW and cosine).
TINY_RUN = {**ARGS, "optimizer": "muon", "schedule": "wsd", "lr": 0.004, "embedding_lr": 0.008, "min_lr": 0.0004,
            "warmup_steps": 20, "vocab": "auto", "vocab_used": "corpus", "data_fingerprint": {"type": "file"},
            "data_holdout": "the last 10% of its characters"}
GPT2_RUN = {**ARGS, "preset": "gpt2", "optimizer": "adamw", "schedule": "cosine", "lr": 0.0006, "embedding_lr": 0.0006,
            "min_lr": 6e-05, "warmup_steps": 700, "vocab": "full", "vocab_used": "full", "input_path": None,
            "data_description": "dataset user/corpus (config None, split train)",
            "data_fingerprint": {"type": "hub_dataset"}, "data_holdout": "the rows whose text has CRC-32 % 10 == 0"}


def test_a_muon_wsd_run_card_says_muon_wsd_and_the_corpus_vocabulary():
    words = training_words(TINY_RUN)
    assert "Muon (orthogonalised momentum, AdamW-matched update size) for the blocks' weight matrices" in words
    assert ("peak LR 0.004 (tied embedding 0.008), warmup-stable-decay: 20 warmup steps, constant, then cosine decay "
            "to 0.0004 over the last 30% of the steps") in words
    assert "Vocabulary: the corpus vocabulary" in words and "saved as the full 50,257 rows" in words
    assert "Validation used the last 10% of its characters, never trained on" in words
    assert "AdamW (betas 0.9/0.95), weight decay" not in words and "with 20 warmup steps and cosine" not in words
    assert "gains and biases, weight decay 0.1 on matrices and embeddings" in words
    # A budget run stopped before the epochs rule chose (weight_decay None) trained at the rule's first value.
    words = training_words({**TINY_RUN, "weight_decay": None})
    assert "weight decay 0.1 (the epochs rule's first; the run ended before it chose) on matrices" in words


def test_an_adamw_cosine_run_card_says_adamw_cosine_and_the_full_vocabulary():
    words = training_words(GPT2_RUN)
    assert "AdamW (betas 0.9/0.95), weight decay 0.1 on matrices and embeddings" in words and "Muon" not in words
    assert "peak LR 0.0006 with 700 warmup steps and cosine decay to 6e-05" in words and "tied embedding" not in words
    assert "Vocabulary: all 50,257 rows trained" in words
    assert ("dataset user/corpus (config None, split train). Validation used the rows whose text has CRC-32 % 10 == 0, "
            "never trained on") in words
    assert "90%" not in words


@pytest.mark.parametrize("kind, held_out", [
    ("file", "the last 10% of its characters"),
    ("text_files", "the last 10% of each file's characters"),
    ("hub_dataset", "its 'validation' split if it has one, else the rows whose text has CRC-32 % 10 == 0"),
    ("dataset_dir", "its 'validation' split if it has one, else the rows whose text has CRC-32 % 10 == 0"),
])
def test_a_record_without_its_held_out_text_gets_its_source_kinds(kind, held_out):
    """Runs recorded before data_holdout: what that kind of source holds out; the vocabulary's choice unknown."""
    args = {**ARGS, "vocab": "auto", "data_fingerprint": {"type": kind}}
    words = training_words(args)
    assert f"Validation used {held_out}, never trained on" in words
    assert "Vocabulary: --vocab auto (the choice it made was not recorded)" in words


# ----------------------------------------------------------------------------------------------------------------
# A model dir's card: untrained, int8, int8 on the Hub


def test_untrained_dir_gets_a_card_from_its_config_alone(tmp_path):
    card = model_card.dir_card(model_card.read_records(write_dir(tmp_path / "m", CONFIG)))
    assert card.data.library_name == "transformers" and card.data.license is None
    assert card.text.lstrip().startswith("# ToyGPT (0.0M parameters)")
    assert "2 layers, 2 heads, 32-dim" in card.text and "12 parameters" in card.text
    assert headings(card) == ["## Architecture", "## Usage"]


def test_int8_card_renders_the_report_beside_the_training_records():
    card = model_card.dir_card(Records(INT8_CONFIG, TrainingConfig.from_record(ARGS), FINAL, REPORT, FINAL["n_params"]))
    assert {"int8", "quantized", "toygpt"} <= set(card.data.tags)
    assert card.text.lstrip().startswith("# ToyGPT (tiny preset, 1.2M parameters, int8)")
    assert headings(card) == ["## Architecture", "## Training data", "## Training", "## Results",
                              "## int8 quantized variant", "## Usage"]
    text = card.text
    assert "`python quantize.py toygpt <out>`" in text and "int8 kernel used here: `fbgemm`" in " ".join(text.split())
    assert "| model.safetensors (MB) | 4.9 | 1.3 | 0.263x |" in text
    assert "| validation loss (nats/token) | 7.1234 | 7.1301 | +0.09% |" in text
    assert "| greedy tokens/s (batch 1, KV cache) | 50.0 | 120.0 | 2.40x |" in text
    assert "first 16 windows of 64 tokens of the held-out last 10% of `input.txt`" in text
    assert "Tokens/s: 128 new tokens, 2 CPU thread(s)" in text
    assert "model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)  # int8 weights" in text


def test_int8_card_without_measurements_says_how_to_get_them():
    report = {**REPORT, "before": {"val_loss": None, "tokens_per_s": None},
              "after": {"val_loss": None, "tokens_per_s": None}, "eval": None, "speed_tokens": 0}
    text = model_card.dir_card(Records(INT8_CONFIG, None, None, report, 12)).text
    assert "| validation loss (nats/token) | n/a | n/a | n/a |" in text
    assert "| greedy tokens/s (batch 1, KV cache) | n/a | n/a | n/a |" in text
    assert "no corpus given (pass --eval-input PATH)" in text and "Tokens/s not measured (--speed-tokens 0)" in text


def test_int8_dir_without_a_report_names_its_scheme():
    card = model_card.dir_card(Records(INT8_CONFIG, None, None, None, 12))
    assert "## int8 quantized variant" in card.text and '"method": "toygpt-int8"' in card.text


def test_variant_card_on_the_hub_names_the_repo_and_subfolder():
    records = Records(INT8_CONFIG, TrainingConfig.from_record(ARGS), FINAL, REPORT, 1)
    text = model_card.dir_card(records, "alice/toygpt", "int8").text
    assert 'repo = "alice/toygpt"' in text and "path/to" not in text
    assert 'model = AutoModelForCausalLM.from_pretrained(repo, subfolder="int8", trust_remote_code=True)' in text


# ----------------------------------------------------------------------------------------------------------------
# The Hub repo's card (push_to_hub.py)


FOLDERS = {"": FolderSizes(4_938_268, 12, 6_000_000), "int8": FolderSizes(1_300_000, 13, 2_400_000)}


def test_hub_card_combines_both_variants_sizes_and_the_space():
    fp32 = Records(CONFIG, TrainingConfig.from_record(ARGS), FINAL, None, FINAL["n_params"])
    int8 = Records(INT8_CONFIG, TrainingConfig.from_record(ARGS), FINAL, REPORT, FINAL["n_params"])
    card = model_card.hub_card(fp32, "alice/toygpt", FOLDERS, int8, space_id="alice/toygpt-demo")
    assert card.data.license == "mit" and {"toygpt", "int8", "custom_code"} <= set(card.data.tags)
    assert headings(card) == ["## Architecture", "## Training data", "## Training", "## Results",
                              "## int8 quantized variant", "## Files and sizes", "## Usage"]
    text = card.text
    assert text.lstrip().startswith("# ToyGPT (tiny preset, 1.2M parameters)\n")
    assert "[alice/toygpt-demo](https://huggingface.co/spaces/alice/toygpt-demo)" in text
    assert "| fp32 | `/` | 4.9 MB | 12 | 6.0 MB |" in text
    assert "| int8 | `int8/` | 1.3 MB (0.26x fp32) | 13 | 2.4 MB |" in text
    assert 'repo = "alice/toygpt"' in text and "path/to" not in text
    assert "model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)  # fp32" in text
    assert 'model_int8 = AutoModelForCausalLM.from_pretrained(repo, subfolder="int8", trust_remote_code=True)' in text


def test_hub_card_of_an_untrained_fp32_model_alone():
    card = model_card.hub_card(Records(CONFIG, None, None, None, 12), "alice/toygpt", {"": FOLDERS[""]})
    assert headings(card) == ["## Architecture", "## Files and sizes", "## Usage"]
    assert "int8" not in card.text and "huggingface.co/spaces" not in card.text and card.data.license is None


def test_hub_card_lists_the_gguf_file_and_how_to_run_it_in_llama_cpp():
    gguf = model_card.GgufFile(model_card.gguf_filename("alice/toygpt"), "Q8_0", 1_400_000)
    assert gguf.filename == "toygpt-Q8_0.gguf"  # the Hub and llama.cpp's -hf REPO:Q8_0 read the type from the name
    card = model_card.hub_card(Records(CONFIG, None, None, None, 12), "alice/toygpt", {"": FOLDERS[""]}, gguf=gguf)
    assert headings(card) == ["## Architecture", "## Files and sizes", "## Usage",
                              "## GGUF: llama.cpp, Ollama, LM Studio"]
    text = card.text
    assert "| GGUF Q8_0 (llama.cpp) | `toygpt-Q8_0.gguf` | 1.4 MB (0.28x fp32) | 1 | 1.4 MB |" in text
    assert 'llama-completion -hf alice/toygpt:Q8_0 -no-cnv -p "ROMEO:"' in text
    assert 'llama-completion -m toygpt-Q8_0.gguf' in text and "ollama run hf.co/alice/toygpt:Q8_0" in text


@pytest.mark.parametrize("n, text", [(999, "999 B"), (1500, "1.5 kB"), (4_938_268, "4.9 MB"), (2.5e12, "2500.0 GB")])
def test_human_size(n, text):
    assert model_card.human_size(n) == text


# ----------------------------------------------------------------------------------------------------------------
# model-index: the evaluation results the Hub renders


def metrics_of(card: ModelCard) -> dict[str, float]:
    return {result.metric_name: result.metric_value for result in card.data.eval_results}


def test_a_trained_card_carries_its_final_evaluation_as_model_index_and_loads_back(tmp_path):
    card = model_card.dir_card(Records(CONFIG, TrainingConfig.from_record(ARGS), FINAL, None, FINAL["n_params"]),
                               "alice/toygpt")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")  # huggingface_hub parses model-index back into EvalResults
    assert loaded.data.model_name == "alice/toygpt"
    assert metrics_of(loaded) == {"validation loss (nats/token)": 7.1234, "validation perplexity": 1238.4567,
                                  "validation bits per character": 2.8765}
    result = loaded.data.eval_results[0]
    assert (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split) == (
        "text-generation", "text", "tiny Shakespeare (downloaded)", "validation")
    assert {r.metric_type for r in loaded.data.eval_results} == {"loss", "perplexity", "bits_per_character"}


def test_an_int8_card_gives_its_own_figures_and_the_fp32_ones_beside_them():
    report = {**REPORT, "before": {**REPORT["before"], "val_perplexity": 1240.0, "val_bits_per_char": 2.9},
              "after": {**REPORT["after"], "val_perplexity": 1248.5, "val_bits_per_char": 2.91}}
    card = model_card.dir_card(Records(INT8_CONFIG, TrainingConfig.from_record(ARGS), FINAL, report, 1),
                               "alice/toygpt", "int8")
    assert card.data.model_name == "alice/toygpt (int8)"
    assert metrics_of(card) == {
        "validation loss (nats/token)": 7.1301, "validation perplexity": 1248.5, "validation bits per character": 2.91,
        "validation loss (nats/token) (fp32 model)": 7.1234, "validation perplexity (fp32 model)": 1240.0,
        "validation bits per character (fp32 model)": 2.9}


def test_a_hub_dataset_run_names_the_dataset_its_config_and_commit():
    args = {**ARGS, "data_source": {"dataset": "alice/poems", "dataset_config": "en", "dataset_revision": "abc123",
                                    "split": "train", "text_column": "text"}}
    card = model_card.dir_card(Records(CONFIG, TrainingConfig.from_record(args), FINAL, None, 1))
    result = card.data.eval_results[0]
    assert (result.dataset_type, result.dataset_name, result.dataset_config, result.dataset_revision) == (
        "alice/poems", "alice/poems", "en", "abc123")


def test_model_index_is_what_the_hub_validates():
    """The YAML huggingface_hub writes for the Hub (`model-index`) has the Hub's schema: each result names its task,
    data set and metrics, and the library's own parser (what the Hub's card loader runs) reads it back."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = model_card.dir_card(Records(CONFIG, TrainingConfig.from_record(ARGS), FINAL, None, 1))
    [entry] = card.data.to_dict()["model-index"]
    assert entry["name"] == "toygpt"
    [result] = entry["results"]  # one task + data set, three metrics
    assert result["task"] == {"type": "text-generation", "name": "Language modeling"}
    assert result["dataset"] == {"type": "text", "name": "tiny Shakespeare (downloaded)", "split": "validation"}
    assert [m["type"] for m in result["metrics"]] == ["loss", "perplexity", "bits_per_character"]
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "toygpt" and len(results) == 3


def test_an_untrained_card_claims_no_results():
    card = model_card.dir_card(Records(CONFIG, None, None, None, 12))
    assert card.data.eval_results is None and "model-index" not in card.content
