"""Dual-loss fine-tuning of the spiking student on a labelled downstream set.

The classifier is the student's own text tower: every class x template prompt is embedded and
L2-normalised, the prompts of a class are averaged and normalised again, and the result is frozen.
The text tower stays frozen, so the fine-tuned checkpoint rebuilds the same classifier from the
templates and ``clip_benchmark eval`` scores it as trained. Only the image tower learns, with

    loss = ce_weight * CE(student_logits, label) + kd_weight * KL(teacher_logits || student_logits)

where ``logits = logit_scale * cos(image_embedding, class_embedding)``. The teacher (usually the task
teacher from the teacher-finetune stage) is frozen; its logits use its own class embeddings, or the
student's with ``--kd-classifier student``. Defaults follow SpikeCLIP: weights 1, no temperature, KL
summed over the batch, logits without a scale.

``--grad-angle-bound DEGREES`` switches on a gradient rule: the two terms' gradients are computed
separately, and the step follows their sum only when the angle between them is at most the bound;
otherwise it follows the cross-entropy gradient alone, so the teacher never pulls against the labels
by more than the bound. (The SpikeCLIP release uses a variant that steps on cross-entropy alone within
the bound and skips the step beyond it.)
"""
import logging
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .classification import evaluate_top1, image_features
from .config import TrainConfig
from .data import Collate, SampleDecoder, load_classnames, load_templates
from .distributed import DistributedEnv, broadcast_buffers
from .losses import cosine_logits, distillation_kl, gradient_angle
from .models import build_student, build_teacher, check_embed_dims, class_embeddings
from .trainer import Trainer, autocast, run_stage

_logger = logging.getLogger(__name__)

STUDENT_IMAGE = "student_image"
TEACHER_IMAGE = "teacher_image"


def dual_loss(
        student_logits: torch.Tensor,
        teacher_logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        cfg: TrainConfig,
) -> Dict[str, torch.Tensor]:
    """Cross-entropy on the labels plus the distillation KL; ``loss`` is their weighted sum."""
    loss_ce = F.cross_entropy(student_logits.float(), labels)
    losses = {"loss_ce": loss_ce}
    loss = cfg.ce_weight * loss_ce
    if teacher_logits is not None and cfg.kd_weight != 0:
        loss_kd = distillation_kl(student_logits, teacher_logits, cfg.kd_temperature, cfg.kd_reduction)
        losses["loss_kd"] = loss_kd
        loss = loss + cfg.kd_weight * loss_kd
    losses["loss"] = loss
    return losses


class FinetuneTrainer(Trainer):
    stage = "finetune"
    evaluate_at_start = True
    loss_names = ("loss", "loss_ce", "loss_kd")

    def __init__(self, cfg: TrainConfig, env: DistributedEnv):
        super().__init__(cfg, env)
        num_samples = self.read_shards()
        classnames = load_classnames(cfg.classnames)
        templates = load_templates(cfg.templates)

        if cfg.pretrained is None and cfg.resume is None:
            _logger.warning("no --pretrained student given: fine-tuning a randomly initialised %s; pass the "
                            "checkpoint of the align and align-text stages", cfg.model)
        self.student, student_preprocess, student_tokenizer = build_student(cfg.model, cfg.pretrained, self.device)
        self.teacher, teacher_preprocess, teacher_tokenizer = build_teacher(
            cfg.teacher, cfg.teacher_pretrained, self.device
        )
        check_embed_dims(self.student, cfg.model, self.teacher, cfg.teacher, self.device)
        self.classifier = class_embeddings(self.student, student_tokenizer, classnames, templates, self.device)
        if cfg.kd_classifier == "teacher":
            self.teacher_classifier = class_embeddings(self.teacher, teacher_tokenizer, classnames, templates,
                                                       self.device)
        else:
            self.teacher_classifier = self.classifier
        _logger.info("class embeddings: %d classes x %d templates (teacher logits use the %s's)",
                     len(classnames), len(templates), cfg.kd_classifier)
        self.student.requires_grad_(False)
        self.student.visual.requires_grad_(True)

        image_transforms = {STUDENT_IMAGE: student_preprocess}
        if cfg.kd_weight != 0:
            image_transforms[TEACHER_IMAGE] = teacher_preprocess
        self.decoder = SampleDecoder(image_transforms=image_transforms, classnames=classnames, require_label=True,
                                     read_text=False)
        self.collate = Collate(image_fields=tuple(image_transforms))
        # The angle rule's per-term gradients, summed over the batches of the current step.
        self._ce_grads: Optional[List[torch.Tensor]] = None
        self._kd_grads: Optional[List[torch.Tensor]] = None
        self.setup(self.student, cfg.model, num_samples)

    def train_loader(self, epoch: int, skip_batches: int = 0):
        return self.shard_loader(self.train_urls, self.decoder, self.collate, epoch, skip_batches)

    def compute_loss(self, batch: Dict, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        cfg, device = self.cfg, self.device
        teacher_logits = None
        if cfg.kd_weight != 0:
            with torch.no_grad(), autocast(cfg.precision, device):
                teacher_features = self.teacher.encode_image(batch[TEACHER_IMAGE].to(device))
            teacher_logits = cosine_logits(teacher_features, self.teacher_classifier, cfg.logit_scale)
        with autocast(cfg.precision, device):
            features = image_features(model(image=batch[STUDENT_IMAGE].to(device)))
        student_logits = cosine_logits(features, self.classifier, cfg.logit_scale)
        return dual_loss(student_logits, teacher_logits, batch["label"].to(device), cfg)

    def _angle_rule(self) -> bool:
        return self.cfg.grad_angle_bound is not None and self.cfg.kd_weight != 0

    def forward_model(self) -> torch.nn.Module:
        # The angle rule takes the two gradients with autograd.grad, outside DDP's reducer, and
        # averages them over ranks by hand. So its forward runs on the unwrapped model.
        return self.trainable if self._angle_rule() else self.model

    def train_step(self, batches: List[Dict]) -> Dict[str, float]:
        if self._angle_rule():
            self._ce_grads = self._kd_grads = None
            # DDP copies rank 0's BatchNorm statistics to the other ranks in its forward. This path
            # bypasses that forward, so it copies them itself.
            broadcast_buffers(self.trainable)
        return super().train_step(batches)

    def backward(self, losses: Dict[str, torch.Tensor], scale: float) -> None:
        if not self._angle_rule():
            super().backward(losses, scale)
            return
        cfg = self.cfg
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        ce_grads = torch.autograd.grad(scale * cfg.ce_weight * losses["loss_ce"], params, retain_graph=True,
                                       allow_unused=True)
        kd_grads = torch.autograd.grad(scale * cfg.kd_weight * losses["loss_kd"], params, allow_unused=True)
        self._ce_grads = _accumulate(self._ce_grads, ce_grads, params)
        self._kd_grads = _accumulate(self._kd_grads, kd_grads, params)

    def finish_gradients(self) -> Dict[str, float]:
        """Under the angle rule, set the step's gradient to CE + KD or to CE alone."""
        if not self._angle_rule():
            return {}
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        ce_grads, kd_grads = _average_over_ranks(self._ce_grads), _average_over_ranks(self._kd_grads)
        angle = gradient_angle(ce_grads, kd_grads)
        combined = angle <= self.cfg.grad_angle_bound
        for param, ce, kd in zip(params, ce_grads, kd_grads):
            param.grad = ce + kd if combined else ce
        return {"grad_angle": angle, "kd_applied": float(combined)}

    def evaluate(self) -> Optional[Dict[str, float]]:
        if not self.val_urls:
            return None
        return evaluate_top1(self.student, self.val_urls, self.decoder, self.collate, STUDENT_IMAGE,
                             self.classifier, self.cfg.batch_size, self.cfg.workers, self.device,
                             self.cfg.precision, self.bad_samples)


def _accumulate(total: Optional[List[torch.Tensor]], grads, params) -> List[torch.Tensor]:
    """Add ``grads`` to ``total``, with zeros for parameters that got no gradient."""
    dense = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if total is None:
        return dense
    return [t + g for t, g in zip(total, dense)]


def _average_over_ranks(grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """Gradients averaged over ranks when running distributed.

    Every rank reduces one flat tensor of the same length (unused parameters hold zeros), so a
    parameter unused on one rank only cannot make the ranks disagree.
    """
    if not dist.is_initialized():
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]


def run(cfg: TrainConfig) -> Dict[str, float]:
    """Run the finetune stage; returns the last logged and validation metrics."""
    return run_stage(FinetuneTrainer, cfg)
