"""Firing statistics of spikingjelly neurons, collected with forward hooks around any inference code.

A firing rate is the fraction of a neuron layer's output elements that are non-zero, so for 0/1
spikes it is the mean spike count per neuron and time step. The rate is averaged over every call while
the hooks are installed: all T time steps and all samples of every batch, weighted by element count.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import monitor, neuron

__all__ = ["FiringRateMonitor", "NeuronStats"]


@dataclass(frozen=True)
class NeuronStats:
    """Spike counts of one neuron layer over all monitored calls.

    ``step_rates`` contains the rate at each time step for multi-step neurons (``step_mode='m'``, output
    ``[T, B, ...]``) when every call had the same T, and is None otherwise.
    """

    spikes: int
    elements: int
    calls: int
    step_rates: Optional[Tuple[float, ...]]

    @property
    def rate(self) -> float:
        return self.spikes / self.elements if self.elements else 0.0


def _count_spikes(output: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Return the non-zero count of each slice along dim 0 and the element count of one slice."""
    output = output.detach()
    if output.dim() == 0:
        output = output.reshape(1)
    flat = output.reshape(output.shape[0], -1)
    return torch.count_nonzero(flat, dim=1).cpu(), flat.shape[1]


class FiringRateMonitor:
    """Collect per-layer firing rates of every spiking neuron in ``model`` while hooks are installed.

    Example::

        with FiringRateMonitor(model) as monitor:
            model.encode_image(images)
            model.encode_text(tokens)
        monitor.rates()  # {"visual.trunk.blocks.0.attn.q_lif": 0.11, ..., "text.in_lif": 0.21}

    Layer names are those of ``model.named_modules()``. Leaving the ``with`` block, or ``close()``,
    removes the hooks and keeps the counts, so a clip_benchmark run or any other inference loop can be
    wrapped the same way. Counting detaches the output and never changes it.

    Args:
        model: Module whose neurons are monitored.
        neuron_types: Module types treated as spiking neurons; spikingjelly's ``BaseNode`` covers LIF,
            IF and the other spikingjelly neurons.
    """

    def __init__(
            self,
            model: nn.Module,
            neuron_types: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]] = neuron.BaseNode,
    ):
        self._step_modes = {
            name: getattr(module, "step_mode", "s")
            for name, module in model.named_modules()
            if isinstance(module, neuron_types)
        }
        if not self._step_modes:
            raise ValueError(
                f"{type(model).__name__} contains no modules of type {neuron_types}; "
                "pass the model that holds the spiking neurons, or set neuron_types"
            )
        self._monitor = monitor.OutputMonitor(model, neuron_types, function_on_output=_count_spikes)

    @property
    def layer_names(self) -> List[str]:
        return list(self._monitor.monitored_layers)

    def __enter__(self) -> "FiringRateMonitor":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Remove the hooks. The counts collected so far stay readable."""
        self._monitor.close()

    def reset(self) -> None:
        """Drop the counts collected so far and keep counting."""
        self._monitor.clear_recorded_data()

    def stats(self) -> Dict[str, NeuronStats]:
        """Return the spike counts of every monitored layer, including layers that never ran."""
        result = {}
        for name in self._monitor.monitored_layers:
            records = self._monitor[name]
            spikes = sum(int(counts.sum()) for counts, _ in records)
            elements = sum(len(counts) * per_slice for counts, per_slice in records)
            result[name] = NeuronStats(
                spikes=spikes,
                elements=elements,
                calls=len(records),
                step_rates=self._step_rates(name, records),
            )
        return result

    def _step_rates(self, name: str, records) -> Optional[Tuple[float, ...]]:
        if self._step_modes[name] != "m" or not records:
            return None
        steps = {len(counts) for counts, _ in records}
        if len(steps) != 1:
            return None
        spikes = torch.stack([counts for counts, _ in records]).sum(0)
        elements = sum(per_slice for _, per_slice in records)
        return tuple(float(count) / elements for count in spikes)

    def rates(self, prefix: str = "") -> Dict[str, float]:
        """Return the firing rate of every layer that ran, optionally only names starting with ``prefix``."""
        return {
            name: stats.rate
            for name, stats in self.stats().items()
            if stats.calls and name.startswith(prefix)
        }

    def mean_rate(self, prefix: str = "") -> float:
        """Return the firing rate over all neurons of the layers that ran, weighted by element count."""
        selected = [stats for name, stats in self.stats().items() if name.startswith(prefix)]
        elements = sum(stats.elements for stats in selected)
        return sum(stats.spikes for stats in selected) / elements if elements else 0.0
