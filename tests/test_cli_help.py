"""Every CLI's --help: instant (neither torch nor transformers imported to build the parser), every default shown,
a user-facing description and the common commands as examples."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ["train", "quantize", "push_to_hub", "convert_gpt2"]
# Runs a CLI's --help in this fresh interpreter, then says which heavy modules it imported.
PROBE = """
import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit:
    pass
print("HEAVY:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def help_of(cli: str) -> str:
    script = str(ROOT / f"{cli}.py")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(script=script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("cli", CLIS)
def test_help_imports_neither_torch_nor_transformers_and_shows_examples(cli):
    out = help_of(cli)
    assert "HEAVY: []" in out, out[-300:]
    assert f"usage: {cli}.py" in out and "examples:" in out and f"python {cli}.py " in out.split("examples:")[1]
    assert '"""' not in out and "toygpt/" not in out.split("options:")[0]  # a user's description, not a docstring


def test_train_help_shows_each_presets_defaults_and_the_fine_tuning_ones():
    out = " ".join(help_of("train").split())  # argparse wraps lines
    assert "peak learning rate (default: tiny 0.004, gpt2 0.0006; with --init-from 6e-05)" in out
    assert "transformer blocks (default: tiny 6, gpt2 12)" in out
    assert "max gradient norm, 0 disables clipping (default: 1)" in out  # the same in every preset: once
    assert "(default: 1337)" in out and "then: python quantize.py out/toygpt out/toygpt-int8" in out


def test_the_help_defaults_are_the_ones_a_run_resolves():
    from configuration_toygpt import PRESETS
    from toygpt import defaults
    from toygpt.gguf_export import GGUF_TYPES
    from toygpt.train_config import TrainingConfig

    import convert_gpt2

    assert defaults.PRESETS == PRESETS  # read from configuration_toygpt.py's source, not imported
    assert TrainingConfig().resolved().lr == defaults.TRAINING_DEFAULTS["tiny"]["lr"]
    assert TrainingConfig(preset="gpt2").resolved().n_layer == PRESETS["gpt2"]["n_layer"]
    assert convert_gpt2.GGUF_TYPES == tuple(GGUF_TYPES)


def test_quantize_help_shows_every_default():
    out = " ".join(help_of("quantize").split())
    assert "(default: 8)" in out and "0 skips them (default: 128)" in out and "make serve" in out
