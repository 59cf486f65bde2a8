"""ToyGPT <-> transformers' native GPT-2 (GPT2LMHeadModel), both ways, losslessly: configs, weights, directories.

The two architectures are the same network with the same parameter names; GPT-2 stores its four projection
matrices as Conv1D, i.e. transposed ([in, out]) relative to nn.Linear ([out, in]).
"""

from __future__ import annotations

from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from configuration_toygpt import ToyGPTConfig
from modeling_toygpt import ToyGPTForCausalLM
from toygpt import bpe
from toygpt.model_dir import (ModelDirError, OutputDir, check_fp32_dir, load_fp32_model, load_pretrained,
                              read_model_config, write_model_files)

# GPT-2's Conv1D weights: [in, out], the transpose of nn.Linear's [out, in].
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Same tanh approximation of GELU under two names.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")
GPT2_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def gpt2_config_from_toygpt(config: ToyGPTConfig) -> GPT2Config:
    if config.quantization is not None:
        raise ModelDirError(
            "This ToyGPT model is int8-quantized; GPT-2 has no int8 format. Convert the fp32 model instead."
        )
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=None,  # 4 * n_embd, as ToyGPT
        activation_function="gelu_new",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def toygpt_config_from_gpt2(config: GPT2Config) -> ToyGPTConfig:
    """The ToyGPT config of the same network; ValueError naming the field if ToyGPT cannot represent it."""
    unsupported = []
    if config.n_inner is not None and config.n_inner != 4 * config.n_embd:
        unsupported.append(f"n_inner={config.n_inner} (ToyGPT's MLP is 4 * n_embd = {4 * config.n_embd})")
    if config.activation_function not in TANH_GELU_NAMES:
        unsupported.append(f"activation_function={config.activation_function!r} (ToyGPT uses 'gelu_new')")
    if not config.scale_attn_weights:
        unsupported.append("scale_attn_weights=False (ToyGPT always scales attention by 1/sqrt(head_dim))")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(config, flag):
            unsupported.append(f"{flag}=True (ToyGPT has no such option)")
    dropouts = {name: getattr(config, name) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(dropouts.values())) > 1:
        unsupported.append(f"different dropouts {dropouts} (ToyGPT has a single `dropout`)")
    if unsupported:
        raise ModelDirError("This GPT-2 config cannot be represented as ToyGPT: " + "; ".join(unsupported) + ".")
    return ToyGPTConfig(
        vocab_size=config.vocab_size,
        block_size=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        dropout=config.resid_pdrop,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        bias=True,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def _copy_weights(source, target, fill_missing_biases=False):
    """Load `source`'s weights into `target` by name, transposing the Conv1D matrices; every weight must match."""
    source_state = source.state_dict()
    converted = {}
    for name, reference in target.state_dict().items():
        if name in source_state:
            tensor = source_state[name]
            converted[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
        elif fill_missing_biases and name.endswith(".bias"):
            converted[name] = reference.new_zeros(reference.shape)  # bias=False is the same as a zero bias
    target.load_state_dict(converted, strict=True)
    return target.to(source.dtype).train(source.training)


def toygpt_to_gpt2(model: ToyGPTForCausalLM) -> GPT2LMHeadModel:
    gpt2 = GPT2LMHeadModel(gpt2_config_from_toygpt(model.config))
    return _copy_weights(model, gpt2, fill_missing_biases=not model.config.bias)


def gpt2_to_toygpt(model: GPT2LMHeadModel) -> ToyGPTForCausalLM:
    return _copy_weights(model, ToyGPTForCausalLM(toygpt_config_from_gpt2(model.config)))


def check_gpt2_dir(directory: Path) -> None:
    """Raise ModelDirError unless `directory` holds a GPT-2 config and weights."""
    model_type = read_model_config(directory).get("model_type")
    if model_type == "toygpt":
        raise ModelDirError(f"{directory} is already a ToyGPT directory; to make a GPT-2 one use `to-gpt2`.")
    if model_type != "gpt2":
        raise ModelDirError(f"{directory} holds a {model_type!r} model; from-gpt2 converts only 'gpt2' models.")
    if not any((directory / name).is_file() for name in GPT2_WEIGHT_FILES):
        raise ModelDirError(f"{directory} has no weights (none of {', '.join(GPT2_WEIGHT_FILES)}).")


def convert_from_gpt2(src, dst, overwrite: bool = False) -> Path:
    """GPT-2 directory -> complete ToyGPT model directory (weights, remote code, tokenizer, generation config)."""
    src = Path(src)
    check_gpt2_dir(src)
    with OutputDir(dst, inputs=[src], replace=overwrite, flag="DST") as output:  # claimed before the work
        weights = next(src / name for name in GPT2_WEIGHT_FILES if (src / name).is_file())
        gpt2 = load_pretrained(GPT2LMHeadModel, src, where=str(weights))
        if gpt2.config.vocab_size != bpe.VOCAB_SIZE:
            raise ModelDirError(
                f"{src} has vocab_size={gpt2.config.vocab_size}; ToyGPT directories ship the GPT-2 BPE tokenizer "
                f"({bpe.VOCAB_SIZE} tokens), so only models with that vocabulary convert."
            )
        with output.write() as tmp:
            write_model_files(gpt2_to_toygpt(gpt2), tmp)
    return Path(dst)


def convert_to_gpt2(src, dst, overwrite: bool = False) -> Path:
    """ToyGPT directory -> GPT2LMHeadModel directory with the GPT-2 tokenizer; loads without trust_remote_code."""
    src = Path(src)
    check_fp32_dir(src, "convert the fp32 directory it came from.")
    with OutputDir(dst, inputs=[src], replace=overwrite, flag="DST") as output:  # claimed before the work
        toygpt = load_fp32_model(src, "convert the fp32 directory it came from.")
        gpt2 = toygpt_to_gpt2(toygpt)
        gpt2.generation_config = toygpt.generation_config  # keep the shipped sampling defaults
        with output.write() as tmp:
            gpt2.save_pretrained(tmp)
            bpe.save_tokenizer(tmp, model_max_length=gpt2.config.n_positions)
    return Path(dst)
