"""Convert weights between ToyGPT and transformers' native GPT-2 (GPT2LMHeadModel), both ways, losslessly; or to GGUF.

    python convert_gpt2.py from-gpt2 SRC DST   # GPT-2 dir (e.g. openai-community/gpt2 downloaded) -> ToyGPT dir
    python convert_gpt2.py to-gpt2 SRC DST     # ToyGPT dir -> GPT2LMHeadModel dir (no remote code needed)
    python convert_gpt2.py to-gguf SRC OUT.gguf [--type f32|f16|q8_0]   # ToyGPT dir -> llama.cpp (toygpt/gguf_export.py)
"""

from __future__ import annotations

import argparse
import sys

from toygpt.errors import ToyGPTError

GGUF_TYPES = ("f32", "f16", "q8_0")  # toygpt.gguf_export.GGUF_TYPES' names (a test checks), known without importing it
DESCRIPTION = ("Convert a model between ToyGPT and transformers' native GPT-2 (GPT2LMHeadModel), both ways with the "
               "same logits, or export it to one GGUF file for llama.cpp.")
EPILOG = """examples:
  python convert_gpt2.py to-gpt2 out/toygpt out/toygpt-as-gpt2             # native GPT2LMHeadModel dir
  python convert_gpt2.py from-gpt2 path/to/gpt2 out/from-gpt2              # start from a GPT-2 checkpoint
  python convert_gpt2.py to-gguf out/toygpt out/toygpt-q8_0.gguf --type q8_0   # llama.cpp, Ollama, LM Studio"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_gpt2.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["from-gpt2", "to-gpt2", "to-gguf"])
    parser.add_argument("src", help="source model directory")
    parser.add_argument("dst", help="output model directory, or the .gguf file for to-gguf (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--type", choices=list(GGUF_TYPES), help="to-gguf: the weights' type (default: f32, lossless)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.type is not None and args.direction != "to-gguf":
        parser.error(f"--type applies to to-gguf only; {args.direction} writes the fp32 weights as they are")
    try:
        from toygpt.gguf_export import export_gguf  # after parsing: --help and usage errors stay instant
        from toygpt.gpt2_conversion import convert_from_gpt2, convert_to_gpt2

        if args.direction == "to-gguf":
            out = export_gguf(args.src, args.dst, args.type or "f32", overwrite=args.overwrite)
        else:
            convert = convert_from_gpt2 if args.direction == "from-gpt2" else convert_to_gpt2
            out = convert(args.src, args.dst, overwrite=args.overwrite)
    except ToyGPTError as err:
        print(f"convert_gpt2.py: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"convert_gpt2.py: error: interrupted (Ctrl-C); {args.dst} was left as it was.", file=sys.stderr)
        return 130
    except OSError as err:  # writing failed: disk full, no permission
        print(f"convert_gpt2.py: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
