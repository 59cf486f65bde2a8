"""toygpt/checkpoint.py: atomic, pickle-free checkpoints that restore weights and optimizer exactly."""

import argparse

import pytest
import torch

from toygpt import checkpoint
from toygpt import optim


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from conftest import small_config
    from modeling_toygpt import ToyGPTForCausalLM

    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(block_size=16))
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.1)
    optimizer = optim.build_optimizer(model, args, torch.device("cpu"))
    scheduler = optim.build_scheduler(optimizer, args, 10)
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    rank_states = [{"stream": {"epoch": 0}, "python_random": [3, [1, 2], None]}]
    rngs = [checkpoint.rng_state()]
    good = checkpoint.save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 3}, rank_states, rngs)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    # A crash in the middle of writing the next checkpoint leaves the last good one as it was, and no temp dir.
    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "optimizer_to_files", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 6}, rank_states, rngs)
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == [good.name]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    # What a SIGKILL mid-write leaves (a temp dir; a step dir without trainer_state.json) is never resumed from.
    (tmp_path / "checkpoint" / ".tmp-killed").mkdir()
    (tmp_path / "checkpoint" / "step-00000009").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path) == good

    # Loading restores weights and optimizer without unpickling anything.
    monkeypatch.setattr(torch, "load", crash)
    torch.manual_seed(1)
    fresh = ToyGPTForCausalLM(small_config(block_size=16))
    fresh_opt = optim.build_optimizer(fresh, args, torch.device("cpu"))
    state = checkpoint.load_checkpoint(good, fresh, fresh_opt, rank=0, world_size=1)
    assert state["step"] == 3 and state["rank_state"] == rank_states[0]
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    for one, fresh_one in zip(optimizer.optimizers, fresh_opt.optimizers):
        for key, value in one.state_dict()["state"][0].items():
            assert torch.equal(value, fresh_one.state_dict()["state"][0][key]), key
    with pytest.raises(checkpoint.CheckpointError, match="same number"):
        checkpoint.load_checkpoint(good, fresh, fresh_opt, rank=0, world_size=2)
