"""Optimiser and learning-rate schedule shared by the training stages."""
import math

import torch

from .config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (AMSGrad by default, as SpikeCLIP trains) over the trainable parameters.

    Weight decay skips biases, normalisation parameters, embeddings listed by ``no_weight_decay`` and
    the time weights, the way open_clip_train excludes 1-D parameters.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "embedding" in name or "time_weight" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.Adam(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, amsgrad=cfg.amsgrad
    )


def cosine_schedule(
        optimizer: torch.optim.Optimizer, warmup: int, total_steps: int, lr: float, lr_min: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``lr``, then cosine decay to ``lr_min`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
