"""toygpt/optim.py: the warmup + cosine schedule, its resume, and the fit of the step count to a time budget."""

import math

import pytest
import torch

from toygpt import optim


def scheduled_lrs(total_steps, **overrides):
    hparams = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "schedule": "cosine", **overrides}
    optimizer = optim.Optimizers(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=hparams["lr"]))
    scheduler = optim.build_scheduler(optimizer, total_steps, **hparams)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]["lr"]


def test_schedule_is_linear_warmup_then_cosine_to_min_lr():
    lrs, after = scheduled_lrs(110)
    # Warmup: a straight line from 0 to --lr over --warmup-steps steps.
    assert lrs[:11] == pytest.approx([1e-3 * i / 10 for i in range(11)], abs=1e-12)
    # Then a half cosine from --lr down to --min-lr, reached at the last step.
    for i in range(10, 110):
        progress = (i - 10) / 100
        assert lrs[i] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-9)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert after == pytest.approx(1e-4)
    assert min(lrs[10:]) > 1e-4
    # Resuming the schedule mid-way (step=k) continues the same curve.
    hparams = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    optimizer = optim.Optimizers(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3))
    optim.build_scheduler(optimizer, 110, **hparams)  # sets initial_lr, as a real run does
    optim.build_scheduler(optimizer, 110, step=57, **hparams)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[57], rel=1e-12)


def test_fit_total_steps():
    def fit(seconds_left, max_steps):  # 10 steps timed in 5 s
        return optim.fit_total_steps(step=10, steps_timed=10, seconds_timed=5.0, seconds_left=seconds_left,
                                     max_steps=max_steps)

    assert fit(60.0, 10_000) == 130  # 60 s left: 120 more steps
    assert fit(60.0, 50) == 50  # capped by --max-steps
    assert fit(-3.0, 10_000) == 11  # budget already spent: end the schedule now



def test_wsd_schedule_warms_up_holds_then_decays_over_its_last_fraction():
    lrs, after = scheduled_lrs(100, schedule="wsd")
    decay_start = 100 - int(optim.WSD_DECAY_FRACTION * 100)
    assert lrs[:11] == pytest.approx([1e-3 * (0.1 + 0.9 * i / 10) for i in range(11)], abs=1e-12)  # from min_lr
    assert lrs[10:decay_start + 1] == pytest.approx([1e-3] * (decay_start - 9), rel=1e-12)  # stable at --lr
    assert all(a > b for a, b in zip(lrs[decay_start:], lrs[decay_start + 1:]))  # then a cosine decay
    assert after == pytest.approx(1e-4)


def test_muon_takes_the_block_matrices_adamw_the_rest_with_the_embeddings_own_lr():
    from conftest import small_config
    from modeling_toygpt import ToyGPTForCausalLM

    model = ToyGPTForCausalLM(small_config())
    muon, adamw = optim.build_optimizer(model, torch.device("cpu"), optimizer="muon", lr=1e-3, embedding_lr=5e-3,
                                        weight_decay=0.1).optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    assert isinstance(muon, optim.BatchedMuon) and isinstance(adamw, torch.optim.AdamW)
    assert {names[id(p)] for p in muon.param_groups[0]["params"]} == {
        n for n, p in model.named_parameters() if ".h." in n and p.dim() == 2}
    embeddings, gains_biases = adamw.param_groups
    assert {names[id(p)] for p in embeddings["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert embeddings["lr"] == 5e-3 and embeddings["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in gains_biases["params"]) and gains_biases["weight_decay"] == 0.0
    every = [id(p) for group in muon.param_groups + adamw.param_groups for p in group["params"]]
    assert sorted(every) == sorted({id(p) for p in model.parameters()})  # each parameter once (wte tied)


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_steps_as_torch_muon_and_shares_its_state(nesterov):
    """Same update as torch.optim.Muon (to bf16 rounding of the Newton-Schulz iteration) for tall, wide and square
    matrices, two of a shape and one alone, with weight decay; a parameter without a gradient stays put; the state
    loads both ways, so checkpoints written before or after the batching resume alike."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (16, 16), (48, 16), (7, 5), (3, 9)]
    params = [torch.nn.Parameter(torch.randn(shape) * 0.1) for shape in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hparams = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", nesterov=nesterov)
    reference, batched = torch.optim.Muon(params, **hparams), optim.BatchedMuon(twins, **hparams)
    for _ in range(3):
        for p, q in zip(params[:-1], twins[:-1]):  # the last has no gradient
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        reference.step()
        batched.step()
    for p, q, shape in zip(params, twins, shapes):
        step_size = 1e-2 * 0.2 * max(shape) ** 0.5  # match_rms_adamw's lr for this shape
        torch.testing.assert_close(q, p, atol=0.02 * step_size, rtol=0)
        assert not torch.equal(p, torch.zeros_like(p))
    assert torch.equal(twins[-1], params[-1]) and twins[-1] not in batched.state
    for p, q in zip(params[:-1], twins[:-1]):
        torch.testing.assert_close(batched.state[q]["momentum_buffer"], reference.state[p]["momentum_buffer"])
    torch.optim.Muon(twins, **hparams).load_state_dict(batched.state_dict())
    optim.BatchedMuon(params, **hparams).load_state_dict(reference.state_dict())


def test_zeropower_batched_orthogonalises_each_matrix_of_the_stack():
    # Muon's quintic iteration leaves singular values in roughly [0.5, 1.5] instead of exactly 1 (its docstring).
    stack = torch.randn(3, 32, 8) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]  # scaled apart: per-matrix norms
    singular_values = torch.linalg.svdvals(optim.zeropower_batched(stack, (3.4445, -4.7750, 2.0315), 5, 1e-7).float())
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizers_state_survives_a_json_round_trip_exactly(name):
    """What a checkpoint does: tensors kept, hyperparameters through JSON (tuples come back as lists)."""
    import copy
    import json

    from conftest import small_config
    from modeling_toygpt import ToyGPTForCausalLM

    def stepped(model, optimizer, steps):
        for seed in range(steps):
            ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model

    hparams = dict(optimizer=name, lr=1e-2, weight_decay=0.1, embedding_lr=2e-2)
    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(block_size=16, vocab_size=100)).eval()  # no dropout: same steps
    optimizer = optim.build_optimizer(model, torch.device("cpu"), **hparams)
    stepped(model, optimizer, 2)
    copy_model = copy.deepcopy(model)
    copy_optimizer = optim.build_optimizer(copy_model, torch.device("cpu"), **hparams)
    state = optimizer.state_dict()
    for one in state["optimizers"]:  # the tensors copied (as from a file), the rest through JSON
        one["state"] = {idx: {key: value.clone() for key, value in per.items()} for idx, per in one["state"].items()}
        one["param_groups"] = json.loads(json.dumps(one["param_groups"]))
    copy_optimizer.load_state_dict(state)
    assert [type(group.get("betas")) for group in copy_optimizer.param_groups] == [
        type(group.get("betas")) for group in optimizer.param_groups]
    for p, q in zip(stepped(model, optimizer, 2).parameters(), stepped(copy_model, copy_optimizer, 2).parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="optimizer"):
        copy_optimizer.load_state_dict({"optimizers": state["optimizers"][:0]})
