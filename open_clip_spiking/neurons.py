"""Spiking neurons built from spikingjelly, and helpers that fold time steps into the batch.

Every spiking layer in this package is a spikingjelly multi-step neuron (``step_mode='m'``) that reads
``x_seq`` shaped ``[T, B, ...]``. Stateless layers (convolution, linear, BatchNorm, attention matmuls)
run once on ``[T * B, ...]`` so only the neurons loop over time.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator

import torch
import torch.utils.checkpoint
from spikingjelly.activation_based import functional, neuron, surrogate

_SURROGATES: Dict[str, Callable[[float], surrogate.SurrogateFunctionBase]] = {
    "sigmoid": lambda alpha: surrogate.Sigmoid(alpha=alpha),
    "atan": lambda alpha: surrogate.ATan(alpha=alpha),
    "piecewise_quadratic": lambda alpha: surrogate.PiecewiseQuadratic(alpha=alpha),
}


@dataclass(frozen=True)
class NeuronCfg:
    """Settings of the multi-step LIF neurons of a tower.

    Defaults follow SpikeCLIP: tau 2.0, threshold 1.0, hard reset to 0, reset detached from the graph,
    sigmoid surrogate gradient with alpha 4.
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float = 0.0
    detach_reset: bool = True
    surrogate: str = "sigmoid"
    surrogate_alpha: float = 4.0

    def __post_init__(self):
        if self.surrogate not in _SURROGATES:
            raise ValueError(
                f"unknown surrogate {self.surrogate!r}; available: {', '.join(sorted(_SURROGATES))}"
            )
        if self.tau <= 1.0:
            raise ValueError(f"tau must be greater than 1.0 for a leaky neuron, got {self.tau}")


def create_lif(cfg: NeuronCfg, v_threshold: float = None) -> neuron.LIFNode:
    """Build a multi-step LIF neuron; ``v_threshold`` overrides the one in ``cfg``."""
    return neuron.LIFNode(
        tau=cfg.tau,
        v_threshold=cfg.v_threshold if v_threshold is None else v_threshold,
        v_reset=cfg.v_reset,
        detach_reset=cfg.detach_reset,
        # Each neuron gets its own surrogate instance, never a shared default object.
        surrogate_function=_SURROGATES[cfg.surrogate](cfg.surrogate_alpha),
        step_mode="m",
    )


def fold_time(x_seq: torch.Tensor) -> torch.Tensor:
    """``[T, B, ...]`` -> ``[T * B, ...]``."""
    return x_seq.flatten(0, 1)


def unfold_time(x: torch.Tensor, time_steps: int) -> torch.Tensor:
    """``[T * B, ...]`` -> ``[T, B, ...]``."""
    return x.unflatten(0, (time_steps, x.shape[0] // time_steps))


class TimeWeightedSum(torch.nn.Module):
    """Learned weighted sum over time steps: ``[T, B, ...]`` -> ``[B, ...]``.

    The T weights start at ``1 / T``, so an untrained tower outputs the mean over time.
    """

    def __init__(self, time_steps: int):
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be at least 1, got {time_steps}")
        self.weight = torch.nn.Parameter(torch.full((time_steps,), 1.0 / time_steps))

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.shape[0] != self.weight.shape[0]:
            raise ValueError(
                f"input has {x_seq.shape[0]} time steps but the weighting was built for {self.weight.shape[0]}"
            )
        weight = self.weight.view(-1, *([1] * (x_seq.dim() - 1)))
        return (x_seq * weight).sum(0)


@contextlib.contextmanager
def _recomputation(modules) -> Iterator[None]:
    """Context of the backward-pass recomputation of a checkpointed segment.

    The neurons start again from their reset state, as they did in the forward pass, and BatchNorm
    layers normalise with the batch statistics without adding them to their running statistics a
    second time. The neurons are reset once more afterwards: their membrane state refers to the
    recomputed graph, whose saved tensors backward never frees, so without the reset every
    recomputed segment would stay in memory until the next forward pass.
    """
    norms = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(norm.momentum, norm.num_batches_tracked.clone() if norm.num_batches_tracked is not None else None)
             for norm in norms]
    for module in modules:
        functional.reset_net(module)
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for module in modules:
            functional.reset_net(module)
        for norm, (momentum, tracked) in zip(norms, saved):
            norm.momentum = momentum
            if tracked is not None:
                norm.num_batches_tracked.copy_(tracked)


def checkpoint_segment(function: Callable, x_seq: torch.Tensor, *modules: torch.nn.Module) -> torch.Tensor:
    """Run ``function(x_seq)`` under activation checkpointing.

    ``modules`` are the stateful layers that ``function`` uses: their neurons are reset and their
    BatchNorm running statistics left alone while the backward pass recomputes the segment, so the
    recomputation reproduces the forward pass exactly and the statistics are updated once.
    """
    return torch.utils.checkpoint.checkpoint(
        function,
        x_seq,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _recomputation(modules)),
    )
