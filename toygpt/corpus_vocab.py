"""The corpus vocabulary: train only the rows of the GPT-2 vocabulary that the training text uses, exactly.

Tiny Shakespeare's training split uses 11,234 of GPT-2's 50,257 token ids, yet the tied embedding / lm_head, 80% of
the tiny preset's FLOPs, computes a logit for every id at every position. The compact model keeps one row per id that
occurs in the training split, plus ONE shared row u standing for every id that never occurs there. The softmax
normaliser counts u once per unseen id,

    log Z = logsumexp(h . w_seen, h . u + ln n_unseen),

so the loss and its gradients are exactly those of the full-vocabulary model whose unseen rows all equal u (rows that
are equal get equal gradients and stay equal). Nothing is approximated: a target that never occurs in training (the
validation split has some) is scored as that full model scores it, through u. The model dir written at the end is
that full model, expanded (`expand`): the standard ToyGPT config, loader, conversions and int8 apply unchanged.

The optimizer must update u as the full model updates each unseen row: autograd gives u the sum of the n_unseen rows'
gradients, so `to_per_row_gradient` divides it by n_unseen, and `grad_norm` counts it n_unseen times, as clipping the
full model's gradient would.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from toygpt import sources
from toygpt.defaults import VOCAB_MODES  # noqa: F401 (re-exported)

AUTO_MAX_SEEN_FRACTION = 0.5  # --vocab auto: compact only when the corpus uses less than half of the vocabulary


class CorpusVocab:
    """The ids seen in training, their compact indices 0..n_seen-1, and u = n_seen for every other id."""

    def __init__(self, seen_ids, vocab_size: int, train_tokens: int | None = None):
        self.train_tokens = train_tokens  # the training split's length, counted by the same pass (regularization.py)
        self.seen_ids = torch.as_tensor(seen_ids, dtype=torch.long).sort().values  # (n_seen,) GPT-2 ids
        self.vocab_size, self.n_seen = vocab_size, len(self.seen_ids)
        self.n_unseen = vocab_size - self.n_seen
        self.u = self.n_seen  # the shared row's compact index
        self.to_compact = torch.full((vocab_size,), self.u, dtype=torch.long)  # GPT-2 id -> compact index
        self.to_compact[self.seen_ids] = torch.arange(self.n_seen)
        # Added to the logits inside the softmax normaliser only: u stands for n_unseen equal logits.
        self.logit_offset = torch.zeros(self.n_seen + 1, dtype=torch.float64)  # cast to the logits dtype when added
        self.logit_offset[self.u] = math.log(self.n_unseen) if self.n_unseen else -math.inf

    @classmethod
    def of_training_split(cls, source, vocab_size: int) -> tuple[CorpusVocab, float]:
        """One streaming pass over the training split (memory flat in its size); also the seconds it took."""
        start = time.perf_counter()
        seen, tokens = np.zeros(vocab_size, dtype=bool), 0
        for ids in sources.train_token_pieces(source):
            seen[ids] = True
            tokens += len(ids)
        return cls(np.flatnonzero(seen), vocab_size, tokens), time.perf_counter() - start

    def to(self, device) -> CorpusVocab:
        moved = copy.copy(self)
        moved.to_compact, moved.logit_offset = self.to_compact.to(device), self.logit_offset.to(device)
        return moved

    def compact(self, ids: torch.Tensor) -> torch.Tensor:
        """GPT-2 ids -> compact indices; -100 (ignored targets) stays -100."""
        return torch.where(ids < 0, ids, self.to_compact.to(ids.device)[ids.clamp(min=0)])

    def compact_config(self, config):
        """The config of the compact model: the full one with n_seen + 1 rows."""
        compact = copy.deepcopy(config)
        compact.vocab_size = self.n_seen + 1
        return compact

    def init_compact(self, model) -> None:
        """A freshly initialised compact model's u starts at zero: the full model it stands for then starts with all
        unseen rows equal (to zero), as the exactness needs."""
        with torch.no_grad():
            model.transformer.wte.weight[self.u].zero_()

    def expand(self, compact_model, full_config):
        """The full-vocabulary model that `compact_model` is: seen rows in place, u in every unseen row."""
        from modeling_toygpt import ToyGPTForCausalLM

        with torch.device("meta"):  # every tensor is assigned below
            full = ToyGPTForCausalLM(full_config)
        state = {name: tensor.detach().clone() for name, tensor in compact_model.state_dict().items()}
        state["transformer.wte.weight"] = state["transformer.wte.weight"][self.to_compact.to(
            state["transformer.wte.weight"].device)]
        state.pop("lm_head.weight", None)  # tied to wte
        full.load_state_dict(state, strict=False, assign=True)
        full.tie_weights()
        full.generation_config = copy.deepcopy(compact_model.generation_config)
        return full.train(compact_model.training)

    # -- the optimizer sees the full model's gradients ----------------------------------------------------------------

    def _u_grad(self, model) -> torch.Tensor | None:
        grad = model.transformer.wte.weight.grad
        return None if grad is None else grad[self.u]

    def to_per_row_gradient(self, model) -> None:
        """u's gradient: the sum over the unseen rows -> one unseen row's (each gets the same), in place."""
        grad = self._u_grad(model)
        if grad is not None and self.n_unseen:
            grad.div_(self.n_unseen)

    def grad_norm(self, model, parameters) -> torch.Tensor:
        """The full model's gradient norm: every parameter once, u's (per-row) gradient n_unseen times."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        grad = self._u_grad(model)
        if grad is None or self.n_unseen <= 1:
            return norm
        return (norm.square() + (self.n_unseen - 1) * grad.float().square().sum()).sqrt()

    def state_dict(self) -> dict:
        return {"seen_ids": self.seen_ids.tolist(), "vocab_size": self.vocab_size, "train_tokens": self.train_tokens}

    @classmethod
    def from_state_dict(cls, state: dict) -> CorpusVocab:
        return cls(state["seen_ids"], state["vocab_size"], state.get("train_tokens"))  # older checkpoints: None


def choose(mode: str, seen_fraction: float, fine_tuning: bool) -> bool:
    """Whether to train with the corpus vocabulary: --vocab corpus/full, or auto (corpus when under half the
    vocabulary is used, and the run starts from scratch: a fine-tuned model's unseen rows differ, so only the full
    vocabulary is exact for it)."""
    if mode == "auto":
        return seen_fraction < AUTO_MAX_SEEN_FRACTION and not fine_tuning
    return mode == "corpus"
