"""GGUF export: a ToyGPT model dir -> one GGUF file of llama.cpp's GPT-2 architecture, tokenizer included.

    python convert_gpt2.py to-gguf SRC OUT.gguf [--type f32|f16|q8_0]

llama.cpp, Ollama and LM Studio run GPT-2 GGUF files, and transformers loads them (`gguf_file=`). ToyGPT is GPT-2
(convert_gpt2.py), so the export renames tensors and writes GPT-2 metadata with the `gguf` package's GGUFWriter,
llama.cpp's own Python writer. The tensor types follow llama.cpp's convert_hf_to_gguf.py: 1-D tensors (LayerNorms,
biases) and the position embedding stay f32; the 2-D weights take the chosen type (q8_0 falls back to f16 for a
matrix whose rows do not split into q8_0's 32-value blocks). The tied LM head is not stored: readers reuse token_embd.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from toygpt.model_dir import ModelDirError, OutputFile, check_fp32_dir, load_fp32_model

MT, QT = gguf.MODEL_TENSOR, gguf.GGMLQuantizationType
# ToyGPT module -> llama.cpp's GPT-2 tensor; block modules follow "transformer.h.{i}.".
MODEL_TENSORS = {"transformer.wte": MT.TOKEN_EMBD, "transformer.wpe": MT.POS_EMBD, "transformer.ln_f": MT.OUTPUT_NORM,
                 "lm_head": MT.OUTPUT}
BLOCK_TENSORS = {"ln_1": MT.ATTN_NORM, "attn.c_attn": MT.ATTN_QKV, "attn.c_proj": MT.ATTN_OUT, "ln_2": MT.FFN_NORM,
                 "mlp.c_fc": MT.FFN_UP, "mlp.c_proj": MT.FFN_DOWN}
# The metadata key that marks a GGUF file as written by this project (OutputFile replaces only such files).
WRITTEN_BY = "toygpt.written_by"
# --type -> (type of the 2-D weights, the file type recorded in general.file_type)
GGUF_TYPES = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def gguf_name(name: str) -> str:
    """'transformer.h.3.attn.c_attn.bias' -> 'blk.3.attn_qkv.bias' (llama.cpp's GPT-2 tensor names)."""
    module, kind = name.rsplit(".", 1)
    if module.startswith("transformer.h."):
        block, sub = module[len("transformer.h."):].split(".", 1)
        return f"{gguf.TENSOR_NAMES[BLOCK_TENSORS[sub]].format(bid=int(block))}.{kind}"
    return f"{gguf.TENSOR_NAMES[MODEL_TENSORS[module]]}.{kind}"


def model_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 array, for every parameter but a tied LM head."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # the same matrix as token_embd
    tensors = {gguf_name(name): tensor.detach().float().cpu().numpy() for name, tensor in state.items()}
    # bias=False: llama.cpp's GPT-2 requires every LayerNorm and Linear bias, and a zero bias is the same function.
    for name, tensor in state.items():
        if name.startswith(("transformer.h.", "transformer.ln_f.")) and name.endswith(".weight"):
            tensors.setdefault(gguf_name(name[: -len("weight")] + "bias"), np.zeros(tensor.shape[0], np.float32))
    return tensors


def tensor_type(name: str, array: np.ndarray, matrix_type: QT) -> QT:
    """llama.cpp's rule: f32 for 1-D tensors and the position embedding; f16 where q8_0's blocks do not fit a row."""
    if array.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[MT.POS_EMBD]):
        return QT.F32
    if matrix_type == QT.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
        return QT.F16
    return matrix_type


def tokenizer_metadata(src: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their GGUF token types, BPE merges) from the dir's tokenizer.json (GPT-2 byte-level BPE)."""
    try:
        spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        ids = dict(spec["model"]["vocab"])
        special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        by_id = {int(i): token for token, i in ids.items()}
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # missing, cut short, not GPT-2's BPE
        raise ModelDirError(f"{src / 'tokenizer.json'} is missing or not a GPT-2 BPE tokenizer ({type(err).__name__}: "
                            f"{err}); copy it again, or re-create the directory with train.py. Nothing was "
                            "written.") from None
    if not by_id or max(by_id) >= vocab_size:
        problem = f"token id {max(by_id)}, beyond" if by_id else "no tokens, for"
        raise ModelDirError(f"{src}/tokenizer.json has {problem} the model's vocab_size {vocab_size}; re-create the "
                            "directory with train.py.")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # unused ids, as llama.cpp's converter names them
    types = [gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if by_id[i] in special
             else gguf.TokenType.NORMAL for i in range(vocab_size)]
    return tokens, types, merges


def write_gguf(model, src: Path, out: Path, out_type: str = "f32") -> None:
    """Write `model` (a loaded fp32 ToyGPTForCausalLM) and the tokenizer of its dir `src` to the GGUF file `out`."""
    matrix_type, file_type = GGUF_TYPES[out_type]
    c = model.config
    tokens, token_types, merges = tokenizer_metadata(src, c.vocab_size)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(src.resolve().name)
    writer.add_string(WRITTEN_BY, "ToyGPT toygpt/gguf_export.py")
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(c.layer_norm_epsilon)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex in llama.cpp
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_unk_token_id(c.eos_token_id)
    writer.add_pad_token_id(c.eos_token_id)
    writer.add_add_bos_token(False)  # GPT-2 prompts start with their first token, as in transformers
    for name, array in model_tensors(model).items():
        qtype = tensor_type(name, array, matrix_type)
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def is_project_gguf(path: Path) -> bool:
    """A GGUF file this project wrote (write_gguf records WRITTEN_BY in its metadata): the only file --overwrite
    replaces. Anything else (a user's GGUF, a link, a model's safetensors) is not."""
    try:
        return path.is_file() and not path.is_symlink() and WRITTEN_BY in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF file at all, or a damaged one: not ours to replace
        return False


def export_gguf(src, out, out_type: str = "f32", overwrite: bool = False, log=print) -> Path:
    """ToyGPT dir `src` -> GGUF file `out`, under OutputFile's rule: written beside it under a temporary name and
    renamed into place; an existing `out` only with `overwrite`, and only a GGUF file this project wrote."""
    src = Path(src)
    if out_type not in GGUF_TYPES:
        raise ModelDirError(f"--type must be one of {', '.join(GGUF_TYPES)}; got {out_type!r}.")
    refusal = "export the fp32 directory it came from (--type q8_0 gives llama.cpp's own 8-bit format)."
    check_fp32_dir(src, refusal)
    with OutputFile(out, inputs=[src], replace=overwrite, flag="DST", owned=is_project_gguf, log=log) as output:
        model = load_fp32_model(src, refusal, dtype="float32")
        with output.write() as tmp:
            write_gguf(model, src, tmp, out_type)
    return output.path
