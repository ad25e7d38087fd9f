"""Process-group set-up for torchrun: NCCL on GPUs, gloo on CPUs."""
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional

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


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def gather_objects(value: Any) -> List[Any]:
    """Gather every rank's ``value`` on every rank, in rank order (``[value]`` in a single process)."""
    if not dist.is_initialized():
        return [value]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each forward."""
    if not dist.is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


class CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are computed over all ranks of a gloo process group.

    PyTorch's SyncBatchNorm works on GPUs only (a CPU input raises, and DDP rejects CPU modules that
    contain it). This module sums the per-channel counts, sums and squared deviations over the ranks
    with differentiable all-reduces, so its output and gradients equal those of BatchNorm over the
    concatenated global batch. In eval mode, and outside a process group, it is plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[Any] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (batch, channels, ...), got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        channels = input.shape[1]
        shape = [1, channels] + [1] * (input.dim() - 2)
        dims = [0] + list(range(2, input.dim()))
        values = input.float()
        count = values.new_full((1,), values.numel() / channels)
        totals = dist_functional.all_reduce(torch.cat([values.sum(dims), count]), group=group)
        total_count = totals[-1]
        mean = totals[:-1] / total_count
        centred = values - mean.view(shape)
        # Two passes (mean first, then squared deviations) keep the variance accurate when the mean
        # is large next to the spread.
        var = dist_functional.all_reduce(centred.pow(2).sum(dims), group=group) / total_count
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total_count.item())
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> int:
    """Replace the BatchNorm layers of ``module`` in place by synchronised ones; returns how many.

    The layers keep their parameters and statistics. On CPUs they become ``CpuSyncBatchNorm``, on
    other devices ``torch.nn.SyncBatchNorm``.
    """
    converted = 0
    for name, child in module.named_children():
        if isinstance(child, (CpuSyncBatchNorm, torch.nn.SyncBatchNorm)):
            continue
        if not isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            converted += convert_sync_batchnorm(child, device)
            continue
        layer_class = CpuSyncBatchNorm if device.type == "cpu" else torch.nn.SyncBatchNorm
        replacement = layer_class(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
        if child.affine:
            replacement.weight = child.weight
            replacement.bias = child.bias
        replacement.running_mean = child.running_mean
        replacement.running_var = child.running_var
        replacement.num_batches_tracked = child.num_batches_tracked
        replacement.train(child.training)
        setattr(module, name, replacement)
        converted += 1
    return converted
