"""Process-group set-up for torchrun: NCCL on GPUs, gloo on CPUs."""
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


@dataclass
class DistributedEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistributedEnv:
    """Join the process group that torchrun describes in the environment, or run as one process.

    ``device`` overrides the default of ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if torch_device.index is None:
            torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        _logger.info("joined process group: rank %d of %d, backend %s", rank, world_size, backend)
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
