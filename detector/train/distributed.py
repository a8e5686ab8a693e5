"""One process of a ``torchrun`` job, or the only process: what a training loop needs to know of it.

``torchrun --nproc_per_node N -m casc train rcnn ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set (torchvision's detection reference scripts read the same variables); without them the
process is a job of one. The backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> torch.device:
        """``requested`` ("auto", "cpu", "cuda", "cuda:1"); under torchrun on CUDA, this process's GPU."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda" and self.distributed:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process (so that all of them stop at the same batch)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def from_main(self, make):
        """``make()`` run by process 0 alone, its result handed to every process (a numbered run folder is made
        once, and all processes name the same one)."""
        if not self.distributed:
            return make()
        value = [make() if self.is_main else None]
        dist.broadcast_object_list(value, src=0)
        return value[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start_process(device: str = "auto") -> Process:
    """This process, with its process group started when ``torchrun`` launched it (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Process()
    process = Process(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_nccl = process.device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return process
