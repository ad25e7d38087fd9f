"""Task teacher: fine-tune an open_clip model on labelled shards through its own class-prompt classifier.

The classifier is the teacher's zero-shot head: its text tower's embeddings of every class x template
prompt, normalised, averaged over templates and normalised again. It is computed once and frozen, and
the text tower stays frozen, so the fine-tuned checkpoint rebuilds the same head from the templates
(``clip_benchmark eval`` does exactly that). The image tower is trained with cross-entropy on
``logit_scale * cos(image, class)``; ``--lock-image`` restricts training to the last layer groups.
"""
import logging
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .classification import evaluate_top1, image_features
from .config import TrainConfig
from .data import Collate, SampleDecoder, load_classnames, load_templates
from .distributed import DistributedEnv
from .losses import cosine_logits
from .models import build_teacher, class_embeddings
from .trainer import Trainer, autocast, run_stage

_logger = logging.getLogger(__name__)

IMAGE = "image"


class TeacherFinetuneTrainer(Trainer):
    stage = "teacher-finetune"
    evaluate_at_start = True
    loss_names = ("loss", "loss_ce")

    def __init__(self, cfg: TrainConfig, env: DistributedEnv):
        super().__init__(cfg, env)
        num_samples = self.read_shards()
        classnames = load_classnames(cfg.classnames)
        templates = load_templates(cfg.templates)

        self.teacher, preprocess, tokenizer = build_teacher(cfg.teacher, cfg.teacher_pretrained, self.device)
        self.classifier = class_embeddings(self.teacher, tokenizer, classnames, templates, self.device)
        _logger.info("teacher classifier: %d classes x %d templates", len(classnames), len(templates))
        self.teacher.visual.requires_grad_(True)
        if cfg.lock_image:
            self.teacher.lock_image_tower(
                unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=cfg.lock_image_freeze_bn_stats
            )
        self.decoder = SampleDecoder(image_transforms={IMAGE: preprocess}, classnames=classnames, require_label=True,
                                     read_text=False)
        self.collate = Collate(image_fields=(IMAGE,))
        self.setup(self.teacher, cfg.teacher, num_samples)

    def set_train_mode(self) -> None:
        self.model.train()
        # The text tower is frozen and unused in training; keep its dropout off.
        text = getattr(self.teacher, "text", None)
        if text is not None:
            text.eval()

    def train_loader(self, epoch: int, skip_batches: int = 0):
        return self.shard_loader(self.train_urls, self.decoder, self.collate, epoch, skip_batches)

    def compute_loss(self, batch: Dict, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        with autocast(self.cfg.precision, self.device):
            features = image_features(model(image=batch[IMAGE].to(self.device)))
        logits = cosine_logits(features, self.classifier, self.cfg.logit_scale)
        loss = F.cross_entropy(logits, batch["label"].to(self.device))
        return {"loss": loss, "loss_ce": loss.detach()}

    def evaluate(self) -> Optional[Dict[str, float]]:
        if not self.val_urls:
            return None
        return evaluate_top1(self.teacher, self.val_urls, self.decoder, self.collate, IMAGE, self.classifier,
                             self.cfg.batch_size, self.cfg.workers, self.device, self.cfg.precision, self.bad_samples)


def run(cfg: TrainConfig) -> Dict[str, float]:
    """Run the teacher-finetune stage; returns the last logged and validation metrics."""
    return run_stage(TeacherFinetuneTrainer, cfg)
