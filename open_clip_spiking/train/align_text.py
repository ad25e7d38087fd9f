"""Text-tower alignment: the student's text tower alone learns the teacher's text embeddings.

Texts are every class x template prompt (``--classnames``/``--templates`` or a clip_benchmark dataset
folder) and every caption line of the ``txt`` fields of ``--train-data`` shards. Texts take no random
augmentation, so the frozen teacher embeds each of them once, before the first step, and the loss
``1 - cos(student_text, teacher_text)`` then costs the student's forward and backward alone. With
``--teacher-cache DIR`` those embeddings are also kept on disk for later runs with the same teacher.
The image tower and ``logit_scale`` are frozen.
"""
import logging
from typing import Dict, List, Optional

import torch

from .config import TrainConfig
from .data import expand_urls, load_classnames, load_templates, read_captions
from .distributed import DistributedEnv, all_reduce_sum
from .losses import cosine_alignment_loss
from .models import build_student, build_teacher, check_embed_dims, init_text_embeddings_from_teacher
from .teacher_cache import TeacherCache, teacher_identity
from .trainer import Trainer, autocast, run_stage

_logger = logging.getLogger(__name__)

# Texts embedded by the teacher in one forward call.
TEACHER_BATCH = 256


def class_prompts(classnames: List[str], templates: List[str]) -> List[str]:
    return [template.format(c=name) for name in classnames for template in templates]


class TextAlignTrainer(Trainer):
    stage = "align-text"
    loss_names = ("loss", "loss_text")

    def __init__(self, cfg: TrainConfig, env: DistributedEnv):
        super().__init__(cfg, env)
        texts: List[str] = []
        if cfg.classnames:
            prompts = class_prompts(load_classnames(cfg.classnames), load_templates(cfg.templates))
            texts.extend(prompts)
            _logger.info("%d class prompts from %s and %s", len(prompts), cfg.classnames, cfg.templates)
        if cfg.train_data:
            urls = expand_urls(cfg.train_data)
            captions = _drop_long_captions(read_captions(urls), cfg.max_caption_chars, "--train-data")
            if not captions and not texts:
                raise ValueError(
                    f"--train-data {cfg.train_data} carries no 'txt' captions; pass --classnames and --templates "
                    f"to train on class prompts, or shards with captions"
                )
            texts.extend(captions)
            _logger.info("%d captions from %d shards", len(captions), len(urls))
        val_texts = read_captions(expand_urls(cfg.val_data)) if cfg.val_data else []
        val_texts = _drop_long_captions(val_texts, cfg.max_caption_chars, "--val-data")
        if cfg.val_data and not val_texts:
            raise ValueError(f"--val-data {cfg.val_data} carries no 'txt' captions to validate the text tower on")

        self.student, _, student_tokenizer = build_student(cfg.model, cfg.pretrained, self.device)
        self.teacher, _, teacher_tokenizer = build_teacher(cfg.teacher, cfg.teacher_pretrained, self.device)
        check_embed_dims(self.student, cfg.model, self.teacher, cfg.teacher, self.device)
        if cfg.pretrained is None and cfg.resume is None and cfg.init_text_embeddings_from_teacher:
            init_text_embeddings_from_teacher(self.student, self.teacher)
        for name, param in self.student.named_parameters():
            param.requires_grad_(not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"))

        self.cache = None
        if cfg.teacher_cache:
            # Text embeddings do not depend on the image preprocessing.
            identity = teacher_identity(cfg.teacher, cfg.teacher_pretrained, None, cfg.precision)
            self.cache = TeacherCache(cfg.teacher_cache, identity, rank=self.env.rank, check_preprocess=False)
        self.tokens = student_tokenizer(texts)
        self.targets = self._teacher_embeddings(texts, teacher_tokenizer, self.cache)
        if self.cache is not None and self.env.is_master:  # every rank embedded the same texts
            self.cache.flush()
        self.val_tokens = student_tokenizer(val_texts) if val_texts else None
        self.val_targets = self._teacher_embeddings(val_texts, teacher_tokenizer) if val_texts else None
        self.setup(self.student, cfg.model, cfg.train_num_samples or len(texts))

    @torch.no_grad()
    def _teacher_embeddings(self, texts: List[str], tokenizer, cache: Optional[TeacherCache] = None) -> torch.Tensor:
        """Normalised teacher embeddings of ``texts``; those in ``cache`` are read, the others computed
        and added to it."""
        rows, missing = cache.text_embeddings(texts) if cache is not None else ([None] * len(texts), list(range(len(texts))))
        if cache is not None:
            _logger.info("--teacher-cache %s: %d of %d texts cached", cache.folder, len(texts) - len(missing), len(texts))
        for start in range(0, len(missing), TEACHER_BATCH):
            index = missing[start: start + TEACHER_BATCH]
            tokens = tokenizer([texts[i] for i in index]).to(self.device)
            with autocast(self.cfg.precision, self.device):
                computed = self.teacher.encode_text(tokens, normalize=True).float().cpu()
            if cache is not None:
                cache.add_texts([texts[i] for i in index], computed)
            for i, row in zip(index, computed):
                rows[i] = row
        return torch.stack(rows) if rows else torch.zeros(0)

    def set_train_mode(self) -> None:
        self.model.train()
        self.student.visual.eval()

    def train_loader(self, epoch: int, skip_batches: int = 0):
        """Shuffled index batches; each rank takes every world_size-th index of the permutation.

        The order depends on the seed and the epoch only, so the batches after ``skip_batches`` are
        those of an uninterrupted run.
        """
        cfg, env = self.cfg, self.env
        generator = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        order = torch.randperm(len(self.tokens), generator=generator)
        per_epoch = self.steps_per_epoch * cfg.batch_size * env.world_size * cfg.accum_freq
        order = order.repeat((per_epoch + len(order) - 1) // len(order))[:per_epoch]
        mine = order[env.rank::env.world_size]
        for start in range(0, len(mine), cfg.batch_size):
            index = mine[start: start + cfg.batch_size]
            yield {"size": len(index), "bad": [], "index": index}

    def compute_loss(self, batch: Dict, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        return self._text_loss(model, self.tokens[batch["index"]], self.targets[batch["index"]])

    def _text_loss(self, model, tokens: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        with autocast(self.cfg.precision, self.device):
            output = model(image=None, text=tokens.to(self.device))
        features = output["text_features"] if isinstance(output, dict) else output[1]
        loss = cosine_alignment_loss(features, targets.to(self.device))
        return {"loss": loss, "loss_text": loss.detach()}

    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, float]]:
        if self.val_tokens is None:
            return None
        self.student.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        mine = range(self.env.rank, len(self.val_tokens), self.env.world_size)
        indices = torch.tensor(list(mine), dtype=torch.long)
        for start in range(0, len(indices), self.cfg.batch_size):
            index = indices[start: start + self.cfg.batch_size]
            loss = self._text_loss(self.student, self.val_tokens[index], self.val_targets[index])["loss"]
            totals += torch.tensor([loss.item() * len(index), len(index)], dtype=torch.float64)
        totals = all_reduce_sum(totals.to(self.device)).cpu()
        return {"val_loss_text": (totals[0] / max(totals[1], 1)).item(), "val_samples": int(totals[1])}


def _drop_long_captions(captions: List[str], max_chars: int, option: str) -> List[str]:
    """Keep the captions of at most ``max_chars`` characters (all when it is 0), with a warning for the rest."""
    if not max_chars:
        return captions
    kept = [caption for caption in captions if len(caption) <= max_chars]
    if len(kept) < len(captions):
        _logger.warning("skipped %d captions of %s longer than --max-caption-chars %d", len(captions) - len(kept),
                        option, max_chars)
    return kept


def run(cfg: TrainConfig) -> Dict[str, float]:
    """Run the align-text stage; returns the last logged and validation metrics."""
    return run_stage(TextAlignTrainer, cfg)
