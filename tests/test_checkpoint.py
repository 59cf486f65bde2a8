"""toygpt/checkpoint.py: atomic, pickle-free checkpoints that restore weights and optimizer exactly."""

from pathlib import Path

import pytest
import torch

from toygpt import checkpoint
from toygpt import optim

OPTIMIZER = dict(optimizer="adamw", lr=1e-3, weight_decay=0.1)
SCHEDULE = dict(schedule="cosine", lr=1e-3, min_lr=1e-4, warmup_steps=2)


def trainer_state(step):
    """What train.py passes to save_checkpoint (the fields a resume reads)."""
    return {"step": step, "total_steps": 10, "budget_fitted": False, "elapsed_s": 1.5, "tokens_seen": 64 * step,
            "args": {"lr": 1e-3}}


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from conftest import small_config
    from modeling_toygpt import ToyGPTForCausalLM

    torch.manual_seed(0)
    model = ToyGPTForCausalLM(small_config(block_size=16))
    optimizer = optim.build_optimizer(model, torch.device("cpu"), **OPTIMIZER)
    scheduler = optim.build_scheduler(optimizer, 10, **SCHEDULE)
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    rank_states = [{"stream": {"epoch": 0}, "python_random": [3, [1, 2], None]}]
    rngs = [checkpoint.rng_state()]
    good = checkpoint.save_checkpoint(tmp_path, model, optimizer, scheduler, trainer_state(3), rank_states, rngs)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    # A crash in the middle of writing the next checkpoint leaves the last good one as it was, and no temp dir.
    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "optimizer_to_files", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, model, optimizer, scheduler, trainer_state(6), rank_states, rngs)
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
    fresh_opt = optim.build_optimizer(fresh, torch.device("cpu"), **OPTIMIZER)
    state = checkpoint.load_checkpoint(good, fresh, fresh_opt, rank=0, world_size=1)
    assert state["step"] == 3 and state["rank_state"] == rank_states[0]
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    for one, fresh_one in zip(optimizer.optimizers, fresh_opt.optimizers):
        for key, value in one.state_dict()["state"][0].items():
            assert torch.equal(value, fresh_one.state_dict()["state"][0][key]), key
    with pytest.raises(checkpoint.CheckpointError, match="same number"):
        checkpoint.load_checkpoint(good, fresh, fresh_opt, rank=0, world_size=2)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_checkpoint_written_before_optimizers_had_a_state_dict_still_loads_exactly(name, tmp_path):
    """tests/data/checkpoint-6bf8614 was written by the checkpoint code of commit 6bf8614 (its make.py says how)."""
    import json

    from safetensors.torch import load_file

    from configuration_toygpt import ToyGPTConfig
    from modeling_toygpt import ToyGPTForCausalLM

    old = Path(__file__).parent / "data" / "checkpoint-6bf8614" / name
    saved_args = json.loads((old / "trainer_state.json").read_text())["args"]
    model = ToyGPTForCausalLM(ToyGPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=8, block_size=16))
    optimizer = optim.build_optimizer(model, torch.device("cpu"), optimizer=name, lr=saved_args["lr"],
                                      weight_decay=saved_args["weight_decay"], embedding_lr=saved_args["embedding_lr"])
    state = checkpoint.load_checkpoint(old, model, optimizer, rank=0, world_size=1)
    assert state["step"] == 3
    for key, value in load_file(old / "model.safetensors").items():
        assert torch.equal(model.state_dict()[key], value), key
    # Every per-parameter tensor and hyperparameter as written, tuples as the optimizers built them.
    loaded = optimizer.state_dict()["optimizers"]
    for key, value in load_file(old / "optimizer.safetensors").items():
        k, idx, field = key.split(".", 2)
        assert torch.equal(loaded[int(k)]["state"][int(idx)][field], value), key
    groups = json.loads((old / "optimizer.json").read_text())["optimizers"]
    assert json.loads(json.dumps([one["param_groups"] for one in loaded])) == groups
    for one in optimizer.optimizers:
        for group in one.param_groups:
            assert all(isinstance(group[key], tuple) for key in ("betas", "ns_coefficients") if key in group)
    # Written again by today's code, the optimizer files are the same: the format did not change.
    scheduler = optim.build_scheduler(optimizer, 10, 3, schedule="cosine", lr=saved_args["lr"],
                                      min_lr=saved_args["min_lr"], warmup_steps=2)
    trainer = {key: value for key, value in state.items() if key not in ("rank_state", "rank_rng")}
    new = checkpoint.save_checkpoint(tmp_path, model, optimizer, scheduler, trainer, state["ranks"],
                                     [state["rank_rng"]])
    assert (new / "optimizer.json").read_text() == (old / "optimizer.json").read_text()
    assert load_file(new / "optimizer.safetensors").keys() == load_file(old / "optimizer.safetensors").keys()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_checkpoint_gets_the_users_umask(umask, tmp_path):
    """Not only the last one, which the final model dir's write used to fix: safetensors writes 0600 files."""
    import os
    import stat

    from conftest import small_config
    from modeling_toygpt import ToyGPTForCausalLM

    model = ToyGPTForCausalLM(small_config(block_size=16, vocab_size=64))
    optimizer = optim.build_optimizer(model, torch.device("cpu"), **OPTIMIZER)
    scheduler = optim.build_scheduler(optimizer, 10, **SCHEDULE)
    rank_states = [{"stream": {"epoch": 0}, "python_random": [3, [1, 2], None]}]
    previous = os.umask(umask)
    try:
        written = checkpoint.save_checkpoint(tmp_path, model, optimizer, scheduler, trainer_state(1), rank_states,
                                             [checkpoint.rng_state()])
    finally:
        os.umask(previous)
    for path in [tmp_path / "checkpoint", written]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
    for path in written.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
