"""The processes of a training run: one, or torchrun's, and the few collectives training needs, on the right device.

NCCL (GPUs) accepts only tensors on the process's own GPU, gloo (CPU) only CPU tensors. Every collective the
training code runs goes through `Processes`: it makes the tensors it sends itself, on its `device`, and refuses a
tensor from another device. A CPU run then catches what would otherwise fail only inside NCCL on a GPU machine.

Launched by torchrun (RANK and WORLD_SIZE set), the process group is always initialised, even for one process, as
nanoGPT does: `torchrun --nproc_per_node 1` on one GPU runs the NCCL path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def pick_device(device_arg: str) -> torch.device:
    """`auto`: CUDA, else MPS, else CPU."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(device_arg)


class Processes:
    """This process's rank, the number of processes, its device, and collectives whose tensors live on that device."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
                 distributed: bool = False):
        self.rank, self.world_size, self.device, self.distributed = rank, world_size, device, distributed

    @classmethod
    def launch(cls, device_arg: str = "auto") -> Processes:
        """torchrun's processes (NCCL on GPUs, gloo on CPU) when its environment is set, else a single process."""
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        device = pick_device(device_arg)
        if device.type == "cuda":
            if device.index is None:
                local_rank = int(os.environ.get("LOCAL_RANK", "0"))
                device = torch.device("cuda", local_rank if launched else torch.cuda.current_device())
            torch.cuda.set_device(device)
        if launched and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        return cls(rank, world_size, device, distributed=launched)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _check(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != self.device:
            raise RuntimeError(
                f"collective on a tensor on {tensor.device}, but this process trains on {self.device}: NCCL and gloo "
                "take tensors on the process's own device only; create it with device=processes.device."
            )
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over every process, in place (it must be on this process's device); returns it."""
        self._check(tensor)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def from_main(self, value):
        """Rank 0's value of a bool, int or float, on every rank (wall clocks differ slightly between processes)."""
        if not self.distributed:
            return value
        dtype = torch.float64 if isinstance(value, float) else torch.int64
        tensor = self._check(torch.tensor([value], dtype=dtype, device=self.device))
        dist.broadcast(tensor, 0)
        return type(value)(tensor.item())

    def from_main_object(self, obj):
        """Rank 0's picklable `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order."""
        if not self.distributed:
            return [obj]
        objs = [None] * self.world_size
        dist.all_gather_object(objs, obj)
        return objs

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
