"""train.py's choices and defaults, torch-free: `train.py --help` shows every default without importing torch or
transformers (seconds), and toygpt/train_config.py resolves a run from the same values.
"""

from __future__ import annotations

import ast
from pathlib import Path

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
VOCAB_MODES = ("auto", "corpus", "full")
DEFAULT_INPUT = Path("input.txt")  # trained on when there is no --input/--dataset and it exists
# Training defaults per preset (the architecture is configuration_toygpt.PRESETS); every one has a flag.
TRAINING_DEFAULTS = {
    # tiny: tuned for minutes on 2 CPU cores (bench/quality.py probes, README), where the run is step-bound: small
    # batches (1024 tokens) give more optimizer steps; Muon for the matrices with warmup-stable-decay, and the tied
    # embedding at twice their learning rate, learned most per minute. Every eval reads the whole validation split
    # (eval_batches None: evaluation.validation_windows), 140 windows of tiny Shakespeare, ~1.4 s or 10 steps on 2
    # cores: every 200 steps (100 in the decay) that is ~5% of a 10-minute run; max_steps only bounds a
    # --time-budget-min run.
    "tiny": dict(
        batch_size=4, grad_accum=1, optimizer="muon", schedule="wsd", lr=4e-3, embedding_lr=8e-3, min_lr=4e-4,
        warmup_steps=20, max_steps=20000, weight_decay=None, grad_clip=1.0, eval_every=200, eval_batches=None,
        checkpoint_every=200,  # dropout: the architecture's 0.0 (EPOCH_RULES below says why)
        ema_decay=0.995,  # a moving average of the weights (toygpt/weight_average.py): README, "Quality"
    ),
    "gpt2": dict(
        batch_size=16, grad_accum=32, optimizer="adamw", schedule="cosine", lr=6e-4, embedding_lr=None, min_lr=6e-5,
        warmup_steps=700, max_steps=20000, weight_decay=0.1, grad_clip=1.0, eval_every=500, eval_batches=None,
        checkpoint_every=1000, ema_decay=0.0,  # unmeasured at this size: the trained weights
    ),
}
# The tiny preset's weight decay (on matrices and embeddings) by the epochs a run trains (toygpt/regularization.py):
# (epochs, value) points, linear between them, flat outside. Measured on tiny Shakespeare (README, "Quality"): 0.3
# beats 0.1 by 0.04-0.05 bits/char at 6.8 epochs (2,000 steps), by 0.015 at 13.6 and 0.012 at 27.1, and costs 0.02 at
# 2 epochs (the 3-minute demo).
EPOCH_WEIGHT_DECAY = ((2.0, 0.1), (6.8, 0.3))
# Dropout had a rule too (up to 0.15 at 27.1 epochs, measured without the average). With the moving average (the
# preset's ema_decay) none beat every dropout measured at 13.6, 27.1 and 54.3 epochs (4k, 8k, 16k steps; by 0.015-0.051
# bits/char), and any dropout costs a CPU 1.6x the step (its random masks), so the tiny preset trains without it.
# The rules by the TrainingConfig field each decides where the preset leaves it None.
EPOCH_RULES = {"weight_decay": EPOCH_WEIGHT_DECAY}
# --init-from: a pretrained model is fine-tuned gently (nanoGPT's finetune_shakespeare: a small, decaying lr), with
# AdamW for every weight (Muon's learning rates above are for training from scratch), and nanoGPT's weight decay
# (the epochs rule was measured from scratch).
FINE_TUNING_DEFAULTS = dict(optimizer="adamw", schedule="cosine", lr=6e-5, embedding_lr=None, min_lr=6e-6,
                            weight_decay=0.1, ema_decay=0.0)
# report_to: TensorBoard, a dependency already: offline, no account, and its event files travel in the model dir's runs/,
# which the Hub shows as the model repo's training metrics.
RUN_DEFAULTS = dict(seed=1337, device="auto", dtype="auto", compile=False, split="train", text_column="text",
                    vocab="auto", keep_best=True, report_to=["tensorboard"])


def _literal(node: ast.expr):
    """The value of a literal, where `dict(a=1)` counts as one (configuration_toygpt.PRESETS is written that way)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
    if isinstance(node, ast.Dict):
        return {ast.literal_eval(key): _literal(value) for key, value in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def architecture_presets() -> dict[str, dict]:
    """configuration_toygpt.PRESETS, read from its source: that remote-code file is the one definition (it travels to
    the Hub alone, so it cannot import this package), and importing it imports transformers (2 s of --help)."""
    source = Path(__file__).resolve().parents[1] / "configuration_toygpt.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PRESETS"]:
            return _literal(node.value)
    raise LookupError(f"{source} defines no PRESETS")


PRESETS = architecture_presets()
