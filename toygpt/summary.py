"""The closing summary of a command: what it produced and where, and the commands to run next.

    print(summary.render("trained", [summary.Item("model", out_dir, "4.2 MB")], [("quantize", "python quantize.py ...")]))

Every CLI that ends a step of the pipeline (train.py, quantize.py, `make demo`) ends with one, rendered here, so a new
user always sees where the result went and what comes next, with the exact flags.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Item:
    """One thing produced: what it is, where, and a short detail (size, figure)."""

    label: str
    path: Path | str
    detail: str = ""


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (links counted once each, as they appear)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n_bytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def python_command() -> str:
    """How to run Python again as this command was run: `python`, or the project's venv interpreter by its path
    (`make demo` runs .venv/bin/python, which a plain `python` in the user's shell is not)."""
    executable = Path(sys.executable)
    venv = Path(sys.prefix)
    if venv != Path(sys.base_prefix) and venv.resolve().is_relative_to(Path.cwd().resolve()):
        return shlex.quote(os.path.relpath(venv / "bin" / executable.name))
    return "python"


def render(title: str, items: list[Item], next_commands: list[tuple[str, str]]) -> str:
    """`title`, the items in aligned columns, then "next:" and each command under its purpose."""
    width = max((len(item.label) for item in items), default=0)
    lines = [title]
    for item in items:
        detail = f"  ({item.detail})" if item.detail else ""
        lines.append(f"  {item.label:<{width}}  {item.path}{detail}")
    if next_commands:
        lines.append("next:")
        for purpose, command in next_commands:
            lines.append(f"  # {purpose}")
            lines.append(f"  {command}")
    return "\n".join(lines)


def training_summary(out_dir: Path | str, final: dict, python: str | None = None) -> str:
    """train.py's summary of the model dir it wrote, from `final` (metrics.jsonl's final record)."""
    out = Path(out_dir)
    q, python = shlex.quote, python or python_command()
    int8 = out.with_name(out.name + "-int8")
    weights = out / "model.safetensors"
    items = [
        Item("model dir", out, f"{human_size(size_of(out))} in all; {final['n_params']:,} parameters"),
        Item("weights", weights, human_size(size_of(weights))),
        Item("bits/char", f"{final['val_bits_per_char']:.4f}", f"val loss {final['val_loss']:.4f}, perplexity "
             f"{final['val_perplexity']:.2f}, at step {final.get('best_step', final['step'])}"),
        Item("model card", out / "README.md"),
        Item("loss curve", out / "loss_curve.png"),
        Item("metrics", out / "metrics.jsonl"),
    ]
    if (out / "runs").is_dir():
        items.append(Item("TensorBoard", out / "runs", f"tensorboard --logdir {q(str(out / 'runs'))}"))
    commands = [
        ("quantize to int8 (smaller, faster on a CPU)", f"{python} quantize.py {q(str(out))} {q(str(int8))}"),
        ("serve it in the Gradio app", f"TOYGPT_MODEL={q(str(int8))} {python} space/app.py"),
        ("push both to the Hub (HF_TOKEN or `hf auth login`; --dry-run STAGE_DIR to see what would go)",
         f"{python} push_to_hub.py --model-dir {q(str(out))} --quantized-dir {q(str(int8))} "
         f"--repo-id USER/{out.name} --space-id USER/{out.name}-demo"),
    ]
    return render(f"trained: {out}", items, commands)


def _before_after(figures: dict, key: str, spec: str) -> str:
    before, after = figures["before"][key], figures["after"][key]
    return "not measured" if before is None or after is None else f"{before:{spec}} -> {after:{spec}}"


def quantization_summary(src: Path | str, out: Path | str, figures: dict, python: str | None = None) -> str:
    """quantize.py's summary of the int8 dir it wrote, from quantization.quantize_dir's figures."""
    src, out = Path(src), Path(out)
    q, python = shlex.quote, python or python_command()
    ratio = figures["size_int8"] / figures["size_fp32"]
    items = [
        Item("int8 dir", out, f"{human_size(size_of(out))} in all"),
        Item("weights", out / "model.safetensors", f"{human_size(figures['size_fp32'])} fp32 -> "
             f"{human_size(figures['size_int8'])} int8, {ratio:.3f}x"),
        Item("val loss", _before_after(figures, "val_loss", ".4f"), "fp32 -> int8, same held-out windows"),
        Item("bits/char", _before_after(figures, "val_bits_per_char", ".4f"), "fp32 -> int8"),
        Item("tokens/s", _before_after(figures, "tokens_per_s", ".1f"), "greedy, batch 1, fp32 -> int8"),
        Item("model card", out / "README.md"),
    ]
    commands = [
        ("serve it in the Gradio app (Ctrl+C stops it)", f"TOYGPT_MODEL={q(str(out))} {python} space/app.py"),
        ("push both to the Hub (HF_TOKEN or `hf auth login`; --dry-run STAGE_DIR to see what would go)",
         f"{python} push_to_hub.py --model-dir {q(str(src))} --quantized-dir {q(str(out))} "
         f"--repo-id USER/{src.name} --space-id USER/{src.name}-demo"),
    ]
    return render(f"quantized: {out}", items, commands)
