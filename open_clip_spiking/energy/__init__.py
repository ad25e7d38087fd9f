"""Firing statistics and energy estimates of spiking open_clip models.

* ``FiringRateMonitor``: per-layer firing rates of every spikingjelly neuron, collected with forward
  hooks around any inference code (``encode_image``, ``encode_text``, a clip_benchmark run);
* ``OperationCounter``: exact multiply-accumulates (MACs) and spike-driven accumulates (ACs) per layer,
  including the attention matrix products;
* ``python -m open_clip_spiking.energy``: both on real images for a student and a teacher, written as
  ``energy.json``, ``energy.md`` and ``energy.png``.
"""
from .counting import LayerOps, OperationCounter
from .report import CONVENTIONS, EnergyCosts, tower_report
from .stats import FiringRateMonitor, NeuronStats

__all__ = [
    "CONVENTIONS",
    "EnergyCosts",
    "FiringRateMonitor",
    "LayerOps",
    "NeuronStats",
    "OperationCounter",
    "tower_report",
]
