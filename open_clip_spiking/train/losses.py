"""Distillation losses."""
import math
from typing import Sequence

import torch
import torch.nn.functional as F


def cosine_alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(student, teacher)`` over the batch; embeddings are ``[B, D]``."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student embeddings {tuple(student.shape)} and teacher embeddings {tuple(teacher.shape)} differ in shape"
        )
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def cosine_logits(features: torch.Tensor, classifier: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * normalize(features) @ classifier.T`` for a ``[C, D]`` classifier of unit rows."""
    return scale * F.normalize(features.float(), dim=-1) @ classifier.float().T


def distillation_kl(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: float = 1.0,
        reduction: str = "sum",
) -> torch.Tensor:
    """``KL(softmax(teacher / t) || softmax(student / t)) * t**2``.

    ``reduction="sum"`` adds the divergence of every sample (SpikeCLIP's choice); ``"batchmean"``
    divides that sum by the batch size. The factor ``t**2`` keeps the gradient scale independent of
    the temperature, as in Hinton et al. (2015); at ``t = 1`` the term is the plain KL divergence.
    """
    if reduction not in ("sum", "batchmean"):
        raise ValueError(f"reduction must be 'sum' or 'batchmean', got {reduction!r}")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction=reduction, log_target=True)
    return kl * temperature ** 2


def gradient_angle(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> float:
    """Angle in degrees between two gradients given as matching lists of tensors (None counts as 0)."""
    dot = torch.zeros((), dtype=torch.float64)
    norm_first = torch.zeros((), dtype=torch.float64)
    norm_second = torch.zeros((), dtype=torch.float64)
    for a, b in zip(first, second):
        if a is None or b is None:
            if a is not None:
                norm_first += a.double().pow(2).sum().cpu()
            if b is not None:
                norm_second += b.double().pow(2).sum().cpu()
            continue
        dot += (a.double() * b.double()).sum().cpu()
        norm_first += a.double().pow(2).sum().cpu()
        norm_second += b.double().pow(2).sum().cpu()
    denominator = (norm_first.sqrt() * norm_second.sqrt()).item()
    if denominator == 0.0:
        return 0.0
    cosine = max(-1.0, min(1.0, dot.item() / denominator))
    return math.degrees(math.acos(cosine))
