"""Push a trained ToyGPT to the Hugging Face Hub: fp32 at the repo root, int8 in subfolder `int8`, a q8_0 GGUF file
for llama.cpp, plus its Space; or stage exactly what would be uploaded with --dry-run.

The command line only: toygpt/hub_push.py does the work (imported after parsing, so that `--help` is instant), and
its errors (toygpt.errors.ToyGPTError) become `push_to_hub.py: error: ...` with exit status 2 (bad input) or 1 (a
push that did not finish).
"""

from __future__ import annotations

import argparse
import sys

from toygpt.errors import ToyGPTError

PROG = "push_to_hub.py"
DESCRIPTION = ("Push a trained ToyGPT (fp32 at the repo root, int8 in int8/, a GGUF file for llama.cpp) and its "
               "Gradio Space to the Hugging Face Hub, or stage exactly what would be uploaded.")
EPILOG = """examples:
  python push_to_hub.py --model-dir out/toygpt --quantized-dir out/toygpt-int8 \\
      --repo-id you/toygpt --space-id you/toygpt-demo             # HF_TOKEN or `hf auth login`
  python push_to_hub.py --model-dir out/toygpt --quantized-dir out/toygpt-int8 \\
      --repo-id you/toygpt --space-id you/toygpt-demo --dry-run stage/   # writes stage/model, stage/space
re-running is safe: existing repos are reused and unchanged files are skipped."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="fp32 model dir written by train.py")
    parser.add_argument("--quantized-dir", help="int8 model dir written by quantize.py; goes to subfolder int8/ "
                        "(default: none, fp32 only)")
    parser.add_argument("--repo-id", required=True, help="model repo, USER/NAME")
    parser.add_argument("--space-id", help="also push the Gradio Space (space/) to this USER/NAME (default: none)")
    parser.add_argument("--private", action="store_true", help="create the repos private (default: public)")
    parser.add_argument("--revision", help="push the model to this branch, created if missing (default: main)")
    parser.add_argument("--dry-run", metavar="STAGE_DIR", help="write STAGE_DIR/model and STAGE_DIR/space only; "
                        "uploads nothing, needs no token")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from toygpt.hub_push import PushRequest, push  # after parsing: --help and usage errors stay instant

        push(PushRequest(**vars(args)))
    except ToyGPTError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # a stage is swapped in whole, an upload is one commit per repo
        print(f"{PROG}: error: interrupted (Ctrl-C); a --dry-run stage is as it was, and each repo holds its last "
              "complete commit: re-run the same command.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
