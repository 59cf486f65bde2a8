"""Quantize a ToyGPT model dir to int8: `python quantize.py SRC_DIR OUT_DIR [--overwrite] [--eval-input PATH]`.

OUT_DIR is a complete int8 model directory (int8 weights + an fp16 scale per 32 of them, safetensors only) that
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)` loads; its quantization_report.json holds the
figures measured before/after and the sha256 of SRC's model.safetensors. The work is toygpt/quantization.py's,
imported after parsing so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from toygpt.errors import ToyGPTError, UsageError

PROG = "quantize.py"
DESCRIPTION = ("Quantize a trained ToyGPT model to int8 (about 4x smaller, fast on a plain CPU), measuring its "
               "validation loss and speed before and after.")
EPILOG = """examples:
  python quantize.py out/toygpt out/toygpt-int8
  python quantize.py out/toygpt out/toygpt-int8 --overwrite --eval-input input.txt
then: TOYGPT_MODEL=out/toygpt-int8 python space/app.py   (or: make serve)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_dir", help="fp32 ToyGPT model dir (train.py or convert_gpt2.py output)")
    p.add_argument("out_dir", help="where to write the int8 model dir (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--eval-input", default=None,
                   help="text corpus the model was trained on (default: the input recorded in SRC/training_args.json); "
                        "val loss before/after is measured on its last 10%%")
    p.add_argument("--eval-batches", type=int, default=None, help="validation batches to evaluate (default: the "
                   "windows of train.py's validation loss, the whole held-out split unless the run said otherwise)")
    p.add_argument("--batch-size", type=int, default=8, help="validation batch size (default: %(default)s)")
    p.add_argument("--speed-tokens", type=int, default=128,
                   help="new tokens for the tokens/s figures; 0 skips them (default: %(default)s)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("eval_batches", "batch_size"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
        if args.speed_tokens < 0:
            raise UsageError(f"--speed-tokens must be 0 (skip the speed figures) or positive, got {args.speed_tokens}.")
        from toygpt import summary  # after parsing: --help and usage errors stay instant
        from toygpt.quantization import quantize_dir

        figures = quantize_dir(args.src_dir, args.out_dir, overwrite=args.overwrite, eval_input=args.eval_input,
                               eval_batches=args.eval_batches, batch_size=args.batch_size,
                               speed_tokens=args.speed_tokens)
    except ToyGPTError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted (Ctrl-C); {args.out_dir} was left as it was.", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as err:  # a failure at run time: OUT_DIR is as it was (written atomically)
        print(f"{PROG}: error: quantizing {args.src_dir} failed ({type(err).__name__}: {err}); {args.out_dir} "
              "was left as it was.", file=sys.stderr)
        return 1
    print(summary.quantization_summary(args.src_dir, args.out_dir, figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
