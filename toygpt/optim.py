"""The optimizers and the learning-rate schedule train.py uses, and the fit of the schedule to a time budget.

--optimizer adamw: AdamW (betas 0.9/0.95) for everything. --optimizer muon: torch.optim.Muon for the blocks' weight
matrices (its Newton-Schulz orthogonalised momentum, with `match_rms_adamw` so --lr means the same as for AdamW;
computed for all same-shaped matrices at once: BatchedMuon), AdamW for the embeddings (token, tied with the head, and
position), LayerNorm gains and biases. The tied embedding has its own learning rate (--embedding-lr). Weight decay
applies to matrices and embeddings, never to gains/biases.

--schedule cosine: linear warmup, cosine decay to --min-lr. --schedule wsd: warmup, a stable phase at --lr, then a
cosine decay to --min-lr over the last WSD_DECAY_FRACTION of the steps (transformers' get_wsd_schedule). Both are
fitted to --time-budget-min the same way: the total step count is refitted, the schedule rebuilt at the current step.
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr
from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

from toygpt.defaults import OPTIMIZERS, SCHEDULES  # noqa: F401 (re-exported)

WSD_DECAY_FRACTION = 0.3  # the decay phase of --schedule wsd: this share of the (fitted) total steps, at the end


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon, its Newton-Schulz iteration run once per shape on the stacked matrices of that shape
    (torch.baddbmm) instead of once per matrix: a transformer's 4 x n_layer matrices come in 4 shapes. Same
    hyperparameters, state ("momentum_buffer") and update, to bf16 rounding. On a 2-core CPU the tiny preset's
    iterations took 7.6 ms a step instead of 27, and its training step 1.13-1.2x less time (README, "Training
    throughput"): small matrices gain most."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = [g.lerp(b, group["momentum"]) for g, b in zip(grads, buffers)] if group["nesterov"] else buffers
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            for shape, indices in by_shape.items():
                orthogonal = zeropower_batched(torch.stack([updates[i] for i in indices]), group["ns_coefficients"],
                                               group["ns_steps"], group["eps"])
                lr = _adjust_lr(group["lr"], group["adjust_lr_fn"], shape)
                for i, update in zip(indices, orthogonal.unbind()):
                    params[i].mul_(1 - group["lr"] * group["weight_decay"])
                    params[i].add_(update, alpha=-lr)
        return loss


def zeropower_batched(updates: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                      eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz orthogonalisation (bf16, ns_steps quintic steps, each matrix scaled to
    Frobenius norm 1 first) of a stack of matrices (n, rows, cols) at once."""
    a, b, c = ns_coefficients
    x = updates.bfloat16()
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Optimizers:
    """Several torch optimizers over disjoint parameters, used as one (stepped, zeroed, scheduled, saved together)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """{"optimizers": [each optimizer's torch state dict]}, in order: per-parameter tensors under "state",
        hyperparameters under "param_groups"."""
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned, also after a round trip through JSON: a hyperparameter that this
        optimizer holds as a tuple (AdamW's betas, Muon's ns_coefficients) is given back as one."""
        saved = state["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"the state holds {len(saved)} optimizer(s), this run has {len(self.optimizers)}")
        for optimizer, one in zip(self.optimizers, saved):
            if len(one["param_groups"]) != len(optimizer.param_groups):
                raise ValueError(f"the state holds {len(one['param_groups'])} parameter group(s) for "
                                 f"{type(optimizer).__name__}, this run has {len(optimizer.param_groups)}")
            groups = [{key: tuple(value) if isinstance(live.get(key), tuple) else value for key, value in group.items()}
                      for live, group in zip(optimizer.param_groups, one["param_groups"])]
            optimizer.load_state_dict({"state": one["state"], "param_groups": groups})


def parameter_groups(model) -> dict[str, list]:
    """The model's trainable parameters by role: block weight matrices, embeddings (the tied wte/lm_head appears
    once), and gains/biases (1-D)."""
    roles = {"matrices": [], "embeddings": [], "gains_biases": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = "gains_biases" if p.dim() < 2 else "matrices" if ".h." in f".{name}" else "embeddings"
        roles[role].append(p)
    return roles


def build_optimizer(model, device: torch.device, *, optimizer: str, lr: float, weight_decay: float,
                    embedding_lr: float | None = None) -> Optimizers:
    """`optimizer`'s optimizers (one of OPTIMIZERS) over the model's parameters (see the module docstring); the tied
    embedding at embedding_lr (None: lr); fused AdamW kernels where the device has them."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    roles = parameter_groups(model)
    adamw_groups = [
        {"params": roles["embeddings"], "lr": embedding_lr or lr, "weight_decay": weight_decay},
        {"params": roles["gains_biases"], "lr": lr, "weight_decay": 0.0},
    ]
    fused = device.type in _get_fused_kernels_supported_devices()
    if optimizer == "muon":
        muon = BatchedMuon(roles["matrices"], lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        return Optimizers(muon, torch.optim.AdamW(adamw_groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused))
    matrices = {"params": roles["matrices"], "lr": lr, "weight_decay": weight_decay}
    return Optimizers(torch.optim.AdamW([matrices, *adamw_groups], lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused))


def set_weight_decay(optimizer: Optimizers, weight_decay: float) -> None:
    """The weight decay of every group that decays (matrices and embeddings: parameters of dim >= 2), in place; the
    epochs rule (regularization.py) sets it once the run knows its step count."""
    for group in optimizer.param_groups:
        if any(p.dim() >= 2 for p in group["params"]):
            group["weight_decay"] = weight_decay


class Schedule:
    """One learning-rate scheduler per optimizer, all following the same curve."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> list[dict]:
        return [scheduler.state_dict() for scheduler in self.schedulers]

    def load_state_dict(self, states: list[dict]) -> None:
        for scheduler, state in zip(self.schedulers, states):
            scheduler.load_state_dict(state)


def build_scheduler(optimizer: Optimizers, total_steps: int, step: int = 0, *, schedule: str, lr: float,
                    min_lr: float, warmup_steps: int) -> Schedule:
    """`schedule`'s curve (one of SCHEDULES; each group relative to its own peak lr, ending at min_lr / lr of it) over
    total_steps, positioned at `step` (for refits and resume)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    total = max(total_steps, warmup_steps + 1)
    min_ratio = min_lr / lr if lr else 0.0
    schedulers = []
    for one in optimizer.optimizers:
        if schedule == "wsd":
            decay = max(1, int(WSD_DECAY_FRACTION * total))
            schedulers.append(get_wsd_schedule(one, num_warmup_steps=warmup_steps, num_decay_steps=decay,
                                               num_training_steps=total, min_lr_ratio=min_ratio,
                                               decay_type="cosine", last_epoch=step - 1))
        else:
            schedulers.append(get_cosine_with_min_lr_schedule_with_warmup(
                one, num_warmup_steps=warmup_steps, num_training_steps=total, min_lr_rate=min_ratio,
                last_epoch=step - 1))
    return Schedule(schedulers)


def fit_total_steps(*, step: int, steps_timed: int, seconds_timed: float, seconds_left: float, max_steps: int) -> int:
    """Total optimizer steps that end the schedule when the budget runs out, at the average pace timed so far."""
    seconds_per_step = seconds_timed / max(steps_timed, 1)
    return max(step + 1, min(max_steps, step + int(max(seconds_left, 0.0) / seconds_per_step)))
