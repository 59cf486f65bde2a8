"""toygpt/distributed.py: every collective of a training run goes through Processes, with tensors on the training device.

NCCL rejects tensors that are not on the process's GPU; on a CPU machine gloo accepts them, so a collective handed a
CPU tensor passes every CPU test and fails on the first GPU. These tests catch that class of bug without a GPU.
"""

import ast
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import REPO
from toygpt.distributed import Processes

COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce",
               "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast_object_list", "barrier"}


def collective_calls(path):
    """(line, call) for each `dist.X(...)` / `torch.distributed.X(...)` collective call in a Python file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed") or owner.endswith(".distributed"):
                calls.append((node.lineno, f"{owner}.{node.func.attr}"))
    return calls


def test_only_distributed_py_calls_collectives():
    """Training, evaluation and the benches reach other processes only through distributed.Processes."""
    offenders = {}
    for path in sorted([*REPO.glob("*.py"), *REPO.glob("toygpt/*.py"), *REPO.glob("bench/*.py"), *REPO.glob("space/*.py")]):
        if path.name != "distributed.py" and (calls := collective_calls(path)):
            offenders[path.name] = calls
    assert offenders == {}
    assert collective_calls(REPO / "toygpt" / "distributed.py")  # the one place that does


class Recorder:
    """Stands in for torch.distributed's collectives: records each call's tensor device."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: self.calls.append(("all_reduce", tensor)))
        monkeypatch.setattr(dist, "broadcast", lambda tensor, src, *a, **k: self.calls.append(("broadcast", tensor)))


def test_a_tensor_from_another_device_is_refused_naming_both(monkeypatch):
    recorder = Recorder(monkeypatch)
    processes = Processes(rank=0, world_size=2, device=torch.device("meta"), distributed=True)
    with pytest.raises(RuntimeError, match=r"tensor on cpu, but this process trains on meta"):
        processes.all_reduce_sum(torch.zeros(3))
    assert recorder.calls == []  # refused before it reached the backend
    processes.all_reduce_sum(torch.zeros(3, device="meta"))
    assert [(name, t.device.type) for name, t in recorder.calls] == [("all_reduce", "meta")]


def test_values_from_rank_0_travel_as_tensors_on_the_training_device(monkeypatch):
    recorder = Recorder(monkeypatch)
    processes = Processes(rank=1, world_size=2, device=torch.device("cpu"), distributed=True)
    assert processes.from_main(7) == 7 and processes.from_main(True) is True and processes.from_main(2.5) == 2.5
    assert [t.device for _, t in recorder.calls] == [torch.device("cpu")] * 3
    assert [t.dtype for _, t in recorder.calls] == [torch.int64, torch.int64, torch.float64]
    single = Processes()  # not launched by torchrun: no collective at all
    assert single.from_main(3) == 3 and single.gather_objects("x") == ["x"]
    assert len(recorder.calls) == 3


def test_evaluation_sums_on_the_training_device(monkeypatch, tiny_model_dir):
    """evaluate() hands the all-reduce tensors made on the device it evaluates on (the model's)."""
    from toygpt.stream import ValWindows
    from toygpt.evaluation import evaluate
    from modeling_toygpt import ToyGPTForCausalLM
    from toygpt.training_loss import CausalLMLoss

    recorder = Recorder(monkeypatch)
    model = ToyGPTForCausalLM.from_pretrained(tiny_model_dir)
    windows = torch.randint(0, 50257, (4, 9))
    val = ValWindows(windows, torch.full((4,), 20))
    processes = Processes(rank=0, world_size=1, device=torch.device("cpu"), distributed=True)
    result = evaluate(CausalLMLoss(model), val, batch_size=2, processes=processes)
    assert [(name, t.device, t.dtype) for name, t in recorder.calls] == [("all_reduce", torch.device("cpu"),
                                                                          torch.float64)]
    assert result["val_tokens"] == 4 * 8


def test_torchrun_with_one_process_initialises_the_process_group(tmp_path):
    """As nanoGPT: under torchrun (RANK/WORLD_SIZE set) the group exists even for one process (NCCL on a GPU)."""
    code = ("import torch.distributed as dist; from toygpt.distributed import Processes; p = Processes.launch('cpu'); "
            "print(p.distributed, dist.is_initialized(), dist.get_backend(), p.world_size); p.close()")
    script = tmp_path / "probe.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\n{code}\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "gloo", "1"]
