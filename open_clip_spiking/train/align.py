"""Alignment pre-training: the spiking student learns to reproduce a frozen teacher's embeddings.

Loss per step: ``image_loss_weight * (1 - cos(student_image, teacher_image))`` plus, for the samples
that carry a caption (or a prompt built from their class), ``text_loss_weight * (1 - cos(student_text,
teacher_text))``. The student receives its own preprocessing (32x32 for ``spikeclip-vit-s``) and the
teacher its own, of the same image.
"""
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import Collate, SampleDecoder, build_loader, count_samples, expand_urls, load_classnames, load_templates
from .distributed import DistributedEnv, all_reduce_sum, cleanup_distributed, init_distributed
from .losses import cosine_alignment_loss
from .models import build_student, build_teacher, embed_dim_of, init_text_embeddings_from_teacher
from .optim import build_optimizer, cosine_schedule

_logger = logging.getLogger(__name__)

STUDENT_IMAGE = "student_image"
TEACHER_IMAGE = "teacher_image"
STUDENT_TEXT = "student_text"
TEACHER_TEXT = "teacher_text"


class BadDataError(RuntimeError):
    """Too many samples could not be used."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class BadSampleCounter:
    """Count unusable samples, log each with its shard and key, and abort past ``max_fraction``."""

    def __init__(self, max_fraction: float, min_samples: int):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.bad = 0
        self.seen = 0

    # The first LOG_ALL_UP_TO bad samples are logged one by one. After that, one in LOG_EVERY_AFTER is
    # logged, with the running total.
    LOG_ALL_UP_TO = 20
    LOG_EVERY_AFTER = 100

    def update(self, batch: Dict) -> None:
        for url, key, reason in batch["bad"]:
            self.bad += 1
            if self.bad <= self.LOG_ALL_UP_TO or self.bad % self.LOG_EVERY_AFTER == 0:
                _logger.warning("skipped bad sample %s in %s (%d so far): %s", key, url, self.bad, reason)
        self.seen += len(batch["bad"]) + batch["size"]
        if self.seen >= self.min_samples and self.bad > self.max_fraction * self.seen:
            last = batch["bad"][-1] if batch["bad"] else None
            example = f"; last one: {last[1]} in {last[0]}: {last[2]}" if last else ""
            raise BadDataError(
                f"{self.bad} of {self.seen} samples could not be used, more than --max-bad-fraction "
                f"{self.max_fraction}{example}"
            )


class AlignTrainer:
    """Owns the models, data and optimiser of one alignment run."""

    def __init__(self, cfg: TrainConfig, env: DistributedEnv):
        self.cfg = cfg
        self.env = env
        self.output_dir = Path(cfg.output_dir)
        self.device = env.device

        # Inputs are checked before any model is built, so a typo fails in seconds.
        self.train_urls = expand_urls(cfg.train_data)
        self.val_urls = expand_urls(cfg.val_data) if cfg.val_data else None
        classnames = load_classnames(cfg.classnames) if cfg.classnames else None
        templates = load_templates(cfg.templates) if cfg.templates else None
        num_samples = cfg.train_num_samples or count_samples(self.train_urls)

        self.student, self.student_preprocess, self.student_tokenizer = build_student(
            cfg.model, cfg.pretrained, self.device
        )
        self.teacher, self.teacher_preprocess, self.teacher_tokenizer = build_teacher(
            cfg.teacher, cfg.teacher_pretrained, self.device
        )
        student_dim = embed_dim_of(self.student, self.device)
        teacher_dim = embed_dim_of(self.teacher, self.device)
        if student_dim != teacher_dim:
            raise ValueError(
                f"student {cfg.model!r} embeds into {student_dim} dimensions but teacher {cfg.teacher!r} into "
                f"{teacher_dim}; choose a teacher that embeds into {student_dim} (ViT-B-16 and "
                f"lit-effnetlite0-minilm embed into 512), or add a copy of the student's config with "
                f"embed_dim {teacher_dim} through open_clip.add_model_config"
            )
        if cfg.pretrained is None and cfg.resume is None and cfg.init_text_embeddings_from_teacher:
            init_text_embeddings_from_teacher(self.student, self.teacher)

        global_batch = cfg.batch_size * env.world_size
        self.steps_per_epoch = max(1, math.ceil(num_samples / global_batch))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        _logger.info(
            "%d training samples in %d shards; global batch %d (%d per device x %d devices); %d steps per epoch",
            num_samples, len(self.train_urls), global_batch, cfg.batch_size, env.world_size, self.steps_per_epoch,
        )

        self.decoder = SampleDecoder(
            image_transforms={STUDENT_IMAGE: self.student_preprocess, TEACHER_IMAGE: self.teacher_preprocess},
            classnames=classnames,
            templates=templates,
        )
        tokenizers = {STUDENT_TEXT: self.student_tokenizer, TEACHER_TEXT: self.teacher_tokenizer}
        self.collate = Collate(image_fields=(STUDENT_IMAGE, TEACHER_IMAGE), tokenizers=tokenizers)

        self.model = self.student
        if env.distributed:
            self.model = DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.optimizer = build_optimizer(self.student, cfg)
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup, self.total_steps, cfg.lr, cfg.lr_min)
        self.step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self.bad_samples = BadSampleCounter(cfg.max_bad_fraction, min_samples=cfg.batch_size)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "config": json.dumps(self.cfg.to_dict(), sort_keys=True),
        }

    def save(self, name: str) -> None:
        if not self.env.is_master:
            return
        model_cfg = _model_cfg(self.cfg.model)
        weights = self.output_dir / f"{name}.{self.cfg.checkpoint_format}"
        ckpt.save_weights(weights, self.student.state_dict(), self.cfg.model, model_cfg, self.cfg.to_dict())
        ckpt.save_training_state(self.output_dir / f"{name}{ckpt.STATE_SUFFIX}", self.state_dict())
        _logger.info("saved checkpoint %s", weights)

    def resume(self, spec: str) -> None:
        state_path = self.output_dir / f"latest{ckpt.STATE_SUFFIX}" if spec == "latest" else Path(spec)
        if not state_path.is_file():
            raise FileNotFoundError(
                f"resume state {state_path} not found; run without --resume or point it at a .state.pt file"
            )
        weights_path = Path(str(state_path)[: -len(ckpt.STATE_SUFFIX)] + f".{self.cfg.checkpoint_format}")
        metadata = ckpt.read_checkpoint_metadata(weights_path)
        if metadata is None:
            raise FileNotFoundError(f"weights {weights_path} for resume state {state_path} are missing or unreadable")
        if metadata["model_name"] != self.cfg.model:
            raise ValueError(
                f"checkpoint {weights_path} was trained as {metadata['model_name']!r} but --model is "
                f"{self.cfg.model!r}; pass --model {metadata['model_name']}"
            )
        self.student.load_state_dict(ckpt.load_weights(weights_path))
        state = ckpt.load_training_state(state_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batches_done_in_epoch = state["batches_done_in_epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuples(state["rng"]["python"]))
        _logger.info(
            "resumed from %s at step %d (epoch %d, %d batches into it)",
            state_path, self.step, self.epoch, self.batches_done_in_epoch,
        )

    # ----------------------------------------------------------------------------------------- steps
    def _loss(self, batch: Dict, model: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
        device = self.device
        with_text = self.cfg.text_loss_weight > 0 and len(batch["text_index"]) > 0
        with torch.no_grad(), _autocast(self.cfg, device):
            teacher_image = self.teacher.encode_image(batch[TEACHER_IMAGE].to(device), normalize=True)
            teacher_text = (
                self.teacher.encode_text(batch[TEACHER_TEXT].to(device), normalize=True) if with_text else None
            )
        # One forward call through the (possibly DDP-wrapped) model, so gradients of both towers are
        # reduced together.
        with _autocast(self.cfg, device):
            student_image, student_text = _image_text_features(
                (model or self.model)(
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
        return losses

    def train_step(self, batch: Dict) -> Dict[str, float]:
        self.model.train()
        losses = self._loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {name: value.item() for name, value in losses.items()}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Mean image alignment loss (and text, where captions exist) on --val-data."""
        self.student.eval()
        loader = build_loader(self.val_urls, self.decoder, self.collate, self.cfg.batch_size,
                              self.cfg.workers, shuffle=False, seed=self.cfg.seed)
        totals = torch.zeros(3, dtype=torch.float64)  # image loss sum, samples, batches
        for batch in loader:
            self.bad_samples.update(batch)
            if batch["size"] == 0:
                continue
            losses = self._loss(batch, model=self.student)
            totals += torch.tensor([losses["loss_image"].item() * batch["size"], batch["size"], 1.0],
                                   dtype=torch.float64)
        totals = all_reduce_sum(totals.to(self.device)).cpu()
        result = {"val_loss_image": (totals[0] / max(totals[1], 1)).item(), "val_samples": int(totals[1])}
        _logger.info("validation after epoch %d: %s", self.epoch, result)
        return result

    # ----------------------------------------------------------------------------------------- loop
    def _record(self, metrics: Dict) -> None:
        if not self.env.is_master:
            return
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics, sort_keys=True) + "\n")

    def fit(self) -> Dict[str, float]:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.env.is_master:
            with open(self.output_dir / "config.json", "w", encoding="utf-8") as handle:
                json.dump(cfg.to_dict(), handle, indent=2, sort_keys=True)
        last: Dict[str, float] = {}
        while self.epoch < cfg.epochs and self.step < self.total_steps:
            metrics, completed = self._train_epoch()
            last = metrics or last
            if not completed:
                # Stopped inside an epoch by --max-steps: keep the position so --resume continues there.
                self.save("latest")
                break
            self.epoch += 1
            self.batches_done_in_epoch = 0
            if self.val_urls:
                validation = self.evaluate()
                last.update(validation)
                self._record({**validation, "epoch": self.epoch, "step": self.step})
            self.save(f"epoch_{self.epoch}")
            self.save("latest")
        return last

    def _train_epoch(self) -> Tuple[Optional[Dict[str, float]], bool]:
        """Train until the epoch's data or steps run out; returns the last metrics and whether the
        epoch completed (False when --max-steps stopped it early)."""
        cfg = self.cfg
        loader = build_loader(self.train_urls, self.decoder, self.collate, cfg.batch_size, cfg.workers,
                              shuffle=True, seed=cfg.seed, epoch=self.epoch, shuffle_buffer=cfg.shuffle_buffer)
        skip = self.batches_done_in_epoch
        progress = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"align epoch {self.epoch}",
                        disable=not self.env.is_master, dynamic_ncols=True)
        metrics = None
        window_start, window_images = time.perf_counter(), 0
        for index, batch in enumerate(loader):
            if index < skip:
                continue  # already trained on before the resume
            self.bad_samples.update(batch)
            if batch["size"] == 0:
                continue
            metrics = self.train_step(batch)
            self.batches_done_in_epoch = index + 1
            window_images += batch["size"] * self.env.world_size
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step % cfg.log_every_n_steps == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    step=self.step,
                    epoch=self.epoch,
                    lr=self.optimizer.param_groups[0]["lr"],
                    images_per_s=window_images / max(elapsed, 1e-9),
                    bad_samples=self.bad_samples.bad,
                )
                _logger.info(
                    "step %d/%d epoch %d loss %.4f lr %.3g %.1f images/s",
                    self.step, self.total_steps, self.epoch, metrics["loss"], metrics["lr"], metrics["images_per_s"],
                )
                self._record(metrics)
                window_start, window_images = time.perf_counter(), 0
            if self.batches_done_in_epoch >= self.steps_per_epoch:
                break
            if self.step >= self.total_steps:
                progress.close()
                return metrics, False
        progress.close()
        return metrics, True


def _as_tuples(value):
    """``random.setstate`` needs tuples where a round trip through ``torch.save`` may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _image_text_features(output):
    """Image and text features from an open_clip model's forward output (dict or tuple)."""
    if isinstance(output, dict):
        return output["image_features"], output.get("text_features")
    return output[0], output[1]


def _model_cfg(model_name: str) -> dict:
    import open_clip

    return open_clip.get_model_config(model_name) or {}


def run(cfg: TrainConfig) -> Dict[str, float]:
    """Run the align stage; returns the last logged metrics."""
    env = init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed + env.rank)
        trainer = AlignTrainer(cfg, env)
        if cfg.resume:
            trainer.resume(cfg.resume)
        return trainer.fit()
    finally:
        cleanup_distributed()
