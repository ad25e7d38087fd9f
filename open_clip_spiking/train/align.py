"""Alignment pre-training: the spiking student learns to reproduce a frozen teacher's embeddings.

Loss per step: ``image_loss_weight * (1 - cos(student_image, teacher_image))`` plus, for the samples
that carry a caption (or a prompt built from their class), ``text_loss_weight * (1 - cos(student_text,
teacher_text))``. The student receives its own preprocessing (32x32 for ``spikeclip-vit-s``) and the
teacher its own, of the same image.
"""
import dataclasses
import logging
from typing import Dict, List, Optional

import torch

from .config import TrainConfig
from .data import Collate, SampleDecoder, build_loader, load_classnames, load_templates, sample_id
from .distributed import DistributedEnv, all_reduce_sum, barrier
from .losses import cosine_alignment_loss
from .models import build_student, build_teacher, check_embed_dims, init_text_embeddings_from_teacher
from .teacher_cache import TeacherCache, teacher_identity
from .trainer import Trainer, autocast, run_stage

_logger = logging.getLogger(__name__)

STUDENT_IMAGE = "student_image"
TEACHER_IMAGE = "teacher_image"
STUDENT_TEXT = "student_text"
TEACHER_TEXT = "teacher_text"


class AlignTrainer(Trainer):
    """Aligns the student's image tower (and text tower, where texts exist) to a frozen teacher."""

    stage = "align"
    loss_names = ("loss", "loss_image", "loss_text")

    def __init__(self, cfg: TrainConfig, env: DistributedEnv):
        super().__init__(cfg, env)
        # Inputs are checked before any model is built, so a typo fails in seconds.
        num_samples = self.read_shards()
        classnames = load_classnames(cfg.classnames) if cfg.classnames else None
        templates = load_templates(cfg.templates) if cfg.templates else None

        self.student, student_preprocess, student_tokenizer = build_student(cfg.model, cfg.pretrained, self.device)
        self.teacher, teacher_preprocess, teacher_tokenizer = build_teacher(
            cfg.teacher, cfg.teacher_pretrained, self.device
        )
        check_embed_dims(self.student, cfg.model, self.teacher, cfg.teacher, self.device)
        if cfg.pretrained is None and cfg.resume is None and cfg.init_text_embeddings_from_teacher:
            init_text_embeddings_from_teacher(self.student, self.teacher)

        self.decoder = SampleDecoder(
            image_transforms={STUDENT_IMAGE: student_preprocess, TEACHER_IMAGE: teacher_preprocess},
            classnames=classnames,
            templates=templates,
            max_caption_chars=cfg.max_caption_chars or None,
        )
        tokenizers = {STUDENT_TEXT: student_tokenizer, TEACHER_TEXT: teacher_tokenizer}
        self.collate = Collate(image_fields=(STUDENT_IMAGE, TEACHER_IMAGE), tokenizers=tokenizers)
        self.cache = None
        if cfg.teacher_cache:
            identity = teacher_identity(cfg.teacher, cfg.teacher_pretrained, teacher_preprocess, cfg.precision)
            self.cache = TeacherCache(cfg.teacher_cache, identity, rank=self.env.rank)
            _logger.info("--teacher-cache %s: %d embeddings cached", cfg.teacher_cache, len(self.cache))
        self.setup(self.student, cfg.model, num_samples)

    def train_loader(self, epoch: int, skip_batches: int = 0):
        decoder = self.decoder
        if self.cache is not None:
            # Samples whose teacher embedding is cached skip the teacher's preprocessing.
            decoder = dataclasses.replace(decoder, skip=(TEACHER_IMAGE, frozenset(self.cache.image_ids())))
        return self.shard_loader(self.train_urls, decoder, self.collate, epoch, skip_batches)

    def on_epoch_end(self) -> None:
        if self.cache is not None:
            self.cache.flush()
            barrier()
            self.cache.refresh()

    def on_save(self) -> None:
        if self.cache is not None:
            self.cache.flush()

    def check_first_batches(self, batches: List[Dict]) -> None:
        """Stop when the text loss is on but no sample of the first step, on any rank, has a text."""
        if self.cfg.text_loss_weight == 0:
            return
        texts = torch.tensor([sum(len(batch["text_index"]) for batch in batches)], device=self.device)
        if all_reduce_sum(texts).item() > 0:
            return
        raise ValueError(
            f"no sample of the first {sum(batch['size'] for batch in batches)} in --train-data {self.cfg.train_data} "
            f"has a text: the shards carry no 'txt' captions, and no 'cls' labels with --classnames and --templates "
            f"to build prompts from; pass shards with captions, add --classnames and --templates for labelled "
            f"shards, or set --text-loss-weight 0 to align the image tower alone"
        )

    def compute_loss(self, batch: Dict, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        device = self.device
        with_text = self.cfg.text_loss_weight > 0 and len(batch["text_index"]) > 0
        # The cache serves training batches; validation batches are embedded afresh.
        cache = self.cache if self.student.training else None
        teacher_image = self._teacher_images(batch, cache)
        teacher_text = self._teacher_texts(batch, cache) if with_text else None
        # One forward call through the (possibly DDP-wrapped) model, so gradients of both towers are
        # reduced together.
        with autocast(self.cfg.precision, device):
            student_image, student_text = _image_text_features(
                model(
                    image=batch[STUDENT_IMAGE].to(device),
                    text=batch[STUDENT_TEXT].to(device) if with_text else None,
                )
            )
        losses = {"loss_image": cosine_alignment_loss(student_image, teacher_image)}
        loss = self.cfg.image_loss_weight * losses["loss_image"]
        if with_text:
            losses["loss_text"] = cosine_alignment_loss(student_text, teacher_text)
            loss = loss + self.cfg.text_loss_weight * losses["loss_text"]
        losses["loss"] = loss
        if cache is not None:
            losses["teacher_cached"] = torch.tensor(self._cached_share)
        return losses

    @torch.no_grad()
    def _teacher_images(self, batch: Dict, cache: Optional[TeacherCache]) -> torch.Tensor:
        """Normalised teacher image embeddings of the batch, read from ``cache`` where it has them."""
        device = self.device
        if cache is None:
            with autocast(self.cfg.precision, device):
                return self.teacher.encode_image(batch[TEACHER_IMAGE].to(device), normalize=True).float()
        ids = [sample_id(url, key) for url, key in batch["keys"]]
        rows, missing = cache.image_embeddings(ids)
        self._cached_share = 1.0 - len(missing) / max(len(ids), 1)
        if missing:
            # Rows of batch[TEACHER_IMAGE] belong to the positions in TEACHER_IMAGE_index (all when absent).
            present = batch.get(f"{TEACHER_IMAGE}_index")
            position = {int(p): i for i, p in enumerate(present)} if present is not None else None
            lost = [ids[i] for i in missing if position is not None and i not in position]
            if lost:
                raise RuntimeError(f"--teacher-cache {self.cfg.teacher_cache} lost the embedding of {lost[0]} "
                                   f"during the run; restart with --resume latest")
            select = torch.tensor([position[i] if position is not None else i for i in missing], dtype=torch.long)
            with autocast(self.cfg.precision, device):
                computed = self.teacher.encode_image(batch[TEACHER_IMAGE][select].to(device), normalize=True)
            computed = computed.float()
            cache.add_images([ids[i] for i in missing], computed)
            for index, row in zip(missing, computed.cpu()):
                rows[index] = row
        return torch.stack(rows).to(device)

    @torch.no_grad()
    def _teacher_texts(self, batch: Dict, cache: Optional[TeacherCache]) -> torch.Tensor:
        """Normalised teacher text embeddings of the batch's texts, read from ``cache`` where it has them."""
        device = self.device
        if cache is None:
            with autocast(self.cfg.precision, device):
                return self.teacher.encode_text(batch[TEACHER_TEXT].to(device), normalize=True).float()
        rows, missing = cache.text_embeddings(batch["texts"])
        if missing:
            select = torch.tensor(missing, dtype=torch.long)
            with autocast(self.cfg.precision, device):
                computed = self.teacher.encode_text(batch[TEACHER_TEXT][select].to(device), normalize=True).float()
            cache.add_texts([batch["texts"][i] for i in missing], computed)
            for index, row in zip(missing, computed.cpu()):
                rows[index] = row
        return torch.stack(rows).to(device)

    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, float]]:
        """Mean image alignment loss on --val-data."""
        if not self.val_urls:
            return None
        self.student.eval()
        loader = build_loader(self.val_urls, self.decoder, self.collate, self.cfg.batch_size,
                              self.cfg.workers, shuffle=False, seed=self.cfg.seed)
        totals = torch.zeros(4, dtype=torch.float64)  # image loss sum, samples, bad samples, samples read
        for batch in loader:
            bad, seen = self.bad_samples.log(batch)
            totals[2:] += torch.tensor([bad, seen], dtype=torch.float64)
            if batch["size"] == 0:
                continue
            losses = self.compute_loss(batch, self.student)
            totals[:2] += torch.tensor([losses["loss_image"].item() * batch["size"], batch["size"]],
                                       dtype=torch.float64)
        totals = all_reduce_sum(totals.to(self.device)).cpu()
        self.bad_samples.add(int(totals[2]), int(totals[3]))
        return {"val_loss_image": (totals[0] / max(totals[1], 1)).item(), "val_samples": int(totals[1])}


def _image_text_features(output):
    """Image and text features from an open_clip model's forward output (dict or tuple)."""
    if isinstance(output, dict):
        return output["image_features"], output.get("text_features")
    return output[0], output[1]


def run(cfg: TrainConfig) -> Dict[str, float]:
    """Run the align stage; returns the last logged metrics."""
    return run_stage(AlignTrainer, cfg)

