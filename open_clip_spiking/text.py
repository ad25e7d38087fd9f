"""Spiking text tower of SpikeCLIP: a spiking MLP over a fixed-length token context.

Token embeddings plus position embeddings of ``context_length`` tokens are flattened into one vector
(20 x 512 = 10,240 values in the reference size), encoded directly (the same analog vector at every
time step), then ``LIF -> Linear -> LIF -> Linear`` and a learned weighted sum over the T time steps.
"""
import math
from dataclasses import dataclass, fields
from typing import Any, Dict

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from .neurons import NeuronCfg, TimeWeightedSum, create_lif, fold_time, unfold_time

__all__ = ["SpikingTextCfg", "SpikingTextMlp", "SPIKING_TEXT_TOWER"]

# Value of ``text_cfg["snn_tower"]`` that selects this tower in an open_clip model config.
SPIKING_TEXT_TOWER = "spiking_mlp"

# Weight scale of the linear layers at initialisation, in units of 1/sqrt(fan_in). Inputs that spike
# at a rate r give outputs of variance GAIN**2 * r, so 4 gives unit variance at r = 1/16.
SPIKING_FAN_IN_GAIN = 4.0


@dataclass
class SpikingTextCfg:
    """Text-tower part of an open_clip model config (``text_cfg``), with ``snn_*`` keys for the SNN."""

    context_length: int = 20
    vocab_size: int = 49408
    width: int = 512
    snn_tower: str = SPIKING_TEXT_TOWER
    snn_hidden_dim: int = 2048
    snn_time_steps: int = 4
    snn_tau: float = 2.0
    snn_v_threshold: float = 1.0
    snn_v_reset: float = 0.0
    snn_detach_reset: bool = True
    snn_surrogate: str = "sigmoid"
    snn_surrogate_alpha: float = 4.0
    pad_id: int = 0

    @classmethod
    def from_dict(cls, text_cfg: Dict[str, Any]) -> "SpikingTextCfg":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(text_cfg) - known)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} in text_cfg of a spiking text tower; allowed keys: {sorted(known)}"
            )
        cfg = cls(**text_cfg)
        if cfg.snn_tower != SPIKING_TEXT_TOWER:
            raise ValueError(f"snn_tower must be {SPIKING_TEXT_TOWER!r}, got {cfg.snn_tower!r}")
        if cfg.context_length < 1 or cfg.snn_time_steps < 1:
            raise ValueError(
                f"context_length and snn_time_steps must be at least 1, got {cfg.context_length} "
                f"and {cfg.snn_time_steps}"
            )
        return cfg

    def neuron_cfg(self) -> NeuronCfg:
        return NeuronCfg(
            tau=self.snn_tau,
            v_threshold=self.snn_v_threshold,
            v_reset=self.snn_v_reset,
            detach_reset=self.snn_detach_reset,
            surrogate=self.snn_surrogate,
            surrogate_alpha=self.snn_surrogate_alpha,
        )


class SpikingTextMlp(nn.Module):
    """Spiking MLP text encoder: token ids ``[B, context_length]`` -> embeddings ``[B, embed_dim]``.

    Token ids come from ``open_clip.get_tokenizer(model_name)``, which pads and truncates to
    ``context_length``. Shorter inputs are padded with ``pad_id``; longer ones are rejected because
    the flattened context has a fixed size.
    """

    def __init__(self, embed_dim: int, cfg: SpikingTextCfg):
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.width = cfg.width
        self.time_steps = cfg.snn_time_steps
        self.output_dim = embed_dim
        self.grad_checkpointing = False
        neuron_cfg = cfg.neuron_cfg()

        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.in_lif = create_lif(neuron_cfg)
        self.fc1 = nn.Linear(cfg.context_length * cfg.width, cfg.snn_hidden_dim)
        self.hidden_lif = create_lif(neuron_cfg)
        self.fc2 = nn.Linear(cfg.snn_hidden_dim, embed_dim)
        self.time_weight = TimeWeightedSum(cfg.snn_time_steps)
        self.init_parameters()

    def init_parameters(self):
        """Initialise so that both LIF layers fire from the first step.

        The tower has no normalisation layer, so scales are set at initialisation. Token embeddings of
        unit standard deviation make the input LIF (threshold 1) fire at 7 to 9% on short prompts, and
        each linear layer starts with weights of standard deviation ``SPIKING_FAN_IN_GAIN /
        sqrt(fan_in)``, which gives its output about unit variance at that input rate. With open_clip's
        usual 0.02 for the embeddings no neuron fires, and every text gets the same embedding until
        training grows them.
        """
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.positional_embedding, std=0.01)
        # Biases keep PyTorch's default initialisation, so the output is not exactly zero for a text that
        # makes no hidden neuron fire (a zero embedding has no direction for the cosine losses).
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, std=SPIKING_FAN_IN_GAIN / math.sqrt(linear.in_features))

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"positional_embedding", "time_weight.weight"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        # Two linear layers hold few activations; checkpointing would only cost a second forward pass.
        self.grad_checkpointing = enable

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        """Freeze the tower (open_clip's ``lock_text_tower``); ``unlocked_layers`` keeps the last N of
        (embeddings, fc1, fc2 with the time weighting) trainable."""
        groups = [
            [self.token_embedding.weight, self.positional_embedding],
            list(self.fc1.parameters()),
            list(self.fc2.parameters()) + list(self.time_weight.parameters()),
        ]
        for group in groups[: len(groups) - unlocked_layers] if unlocked_layers else groups:
            for param in group:
                param.requires_grad = False

    def _pad_or_reject(self, text: torch.Tensor) -> torch.Tensor:
        length = text.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token sequence of length {length} is longer than the spiking text tower's context of "
                f"{self.context_length}; tokenize with open_clip.get_tokenizer(MODEL_NAME), which truncates "
                "to the model's context length"
            )
        if length < self.context_length:
            text = nn.functional.pad(text, (0, self.context_length - length), value=self.cfg.pad_id)
        return text

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)
        text = self._pad_or_reject(text)
        T = self.time_steps
        x = self.token_embedding(text) + self.positional_embedding  # [B, L, W]
        x = x.flatten(1)  # [B, L * W]
        # Direct encoding: the same analog vector at every time step.
        s = self.in_lif(x.unsqueeze(0).expand(T, *x.shape))  # [T, B, L * W]
        h = unfold_time(self.fc1(fold_time(s)), T)
        h = unfold_time(self.fc2(fold_time(self.hidden_lif(h))), T)  # [T, B, D]
        return self.time_weight(h)
