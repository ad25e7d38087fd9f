"""The training loop every stage shares: steps, schedule, checkpoints, resume, metrics and DDP.

A stage subclasses ``Trainer``, builds its models and data in ``__init__``, calls ``setup`` with the
module it trains, and implements ``train_loader`` and ``compute_loss`` (and ``evaluate`` when it has
a validation metric). Everything a run needs to continue after a crash (weights, optimiser,
scheduler, RNG states, step, epoch and the position inside the epoch) is saved by ``save``.
"""
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistributedEnv, cleanup_distributed, init_distributed
from .optim import build_optimizer, cosine_schedule

_logger = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too many samples could not be used."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``--precision bf16``, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class BadSampleCounter:
    """Count unusable samples, log each with its shard and key, and abort past ``max_fraction``."""

    # The first LOG_ALL_UP_TO bad samples are logged one by one. After that, one in LOG_EVERY_AFTER is
    # logged, with the running total.
    LOG_ALL_UP_TO = 20
    LOG_EVERY_AFTER = 100

    def __init__(self, max_fraction: float, min_samples: int):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.bad = 0
        self.seen = 0

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


class Trainer:
    """Shared loop of the training stages."""

    #: Name shown in progress bars and logs.
    stage = "train"
    #: Whether a fresh run validates once before its first step (recorded as epoch 0).
    evaluate_at_start = False

    def __init__(self, cfg: TrainConfig, env: DistributedEnv):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self.bad_samples = BadSampleCounter(cfg.max_bad_fraction, min_samples=cfg.batch_size)

    def setup(self, trainable: torch.nn.Module, model_name: str, num_samples: int) -> None:
        """Wrap ``trainable`` for DDP and build the optimiser and schedule for ``num_samples`` an epoch.

        ``trainable`` is the whole open_clip model whose weights the stage saves; its parameters with
        ``requires_grad`` set are the ones trained.
        """
        cfg, env = self.cfg, self.env
        self.trainable = trainable
        self.model_name = model_name
        self.model = trainable
        if env.distributed:
            self.model = DistributedDataParallel(
                trainable,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        global_batch = cfg.batch_size * env.world_size
        self.steps_per_epoch = max(1, math.ceil(num_samples / global_batch))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        trained = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
        _logger.info(
            "%s: %d samples an epoch; global batch %d (%d per device x %d devices); %d steps an epoch; "
            "%d trainable parameters",
            self.stage, num_samples, global_batch, cfg.batch_size, env.world_size, self.steps_per_epoch, trained,
        )
        self.optimizer = build_optimizer(trainable, cfg)
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup, self.total_steps, cfg.lr, cfg.lr_min)

    # ---------------------------------------------------------------------------------- stage hooks
    def train_loader(self, epoch: int) -> Iterable[Dict]:
        """Batches of one epoch; each is a dict with ``size`` (usable samples) and ``bad`` records."""
        raise NotImplementedError

    def compute_loss(self, batch: Dict, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Loss terms of one batch; ``loss`` is the one minimised."""
        raise NotImplementedError

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Validation metrics after an epoch, or None when the stage has no validation data."""
        return None

    def set_train_mode(self) -> None:
        self.model.train()

    # ---------------------------------------------------------------------------------- steps
    def optimizer_step(self, losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Back-propagate ``losses['loss']`` and step; returns extra metrics for the log."""
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.clip_and_step()
        return {}

    def clip_and_step(self) -> None:
        if self.cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.trainable.parameters() if p.requires_grad], self.cfg.grad_clip_norm
            )
        self.optimizer.step()
        self.scheduler.step()

    def train_step(self, batch: Dict) -> Dict[str, float]:
        self.set_train_mode()
        losses = self.compute_loss(batch, self.model)
        extra = self.optimizer_step(losses)
        self.step += 1
        metrics = {name: value.item() for name, value in losses.items()}
        metrics.update(extra)
        return metrics

    # ---------------------------------------------------------------------------------- state
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
        weights = self.output_dir / f"{name}.{self.cfg.checkpoint_format}"
        ckpt.save_weights(weights, self.trainable.state_dict(), self.model_name, _model_cfg(self.model_name),
                          self.cfg.to_dict())
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
        if metadata["model_name"] != self.model_name:
            raise ValueError(
                f"checkpoint {weights_path} was trained as {metadata['model_name']!r} but this {self.stage} run "
                f"trains {self.model_name!r}; resume with the model the checkpoint was trained as"
            )
        self.trainable.load_state_dict(ckpt.load_weights(weights_path))
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

    # ---------------------------------------------------------------------------------- loop
    def record(self, metrics: Dict) -> None:
        if not self.env.is_master:
            return
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics, sort_keys=True) + "\n")

    def fit(self) -> Dict[str, float]:
        """Train to the last epoch or ``--max-steps``; returns the last logged and validation metrics."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.env.is_master:
            with open(self.output_dir / "config.json", "w", encoding="utf-8") as handle:
                json.dump(cfg.to_dict(), handle, indent=2, sort_keys=True)
        last: Dict[str, float] = {}
        if self.evaluate_at_start and self.step == 0:
            initial = self.evaluate()
            if initial:
                _logger.info("validation before training: %s", initial)
                self.record({**initial, "epoch": 0, "step": 0})
        while self.epoch < cfg.epochs and self.step < self.total_steps:
            metrics, completed = self._train_epoch()
            last = metrics or last
            if not completed:
                # Stopped inside an epoch by --max-steps: keep the position so --resume continues there.
                self.save("latest")
                break
            self.epoch += 1
            self.batches_done_in_epoch = 0
            validation = self.evaluate()
            if validation:
                _logger.info("validation after epoch %d: %s", self.epoch, validation)
                last.update(validation)
                self.record({**validation, "epoch": self.epoch, "step": self.step})
            self.save(f"epoch_{self.epoch}")
            self.save("latest")
        return last

    def _train_epoch(self) -> Tuple[Optional[Dict[str, float]], bool]:
        """Train until the epoch's data or steps run out; returns the last metrics and whether the
        epoch completed (False when --max-steps stopped it early)."""
        cfg = self.cfg
        loader = self.train_loader(self.epoch)
        skip = self.batches_done_in_epoch
        progress = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"{self.stage} epoch {self.epoch}",
                        disable=not self.env.is_master, dynamic_ncols=True)
        metrics = None
        window_start, window_samples = time.perf_counter(), 0
        for index, batch in enumerate(loader):
            if index < skip:
                continue  # already trained on before the resume
            self.bad_samples.update(batch)
            if batch["size"] == 0:
                continue
            metrics = self.train_step(batch)
            self.batches_done_in_epoch = index + 1
            window_samples += batch["size"] * self.env.world_size
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step % cfg.log_every_n_steps == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    step=self.step,
                    epoch=self.epoch,
                    lr=self.optimizer.param_groups[0]["lr"],
                    samples_per_s=window_samples / max(elapsed, 1e-9),
                    bad_samples=self.bad_samples.bad,
                )
                _logger.info(
                    "step %d/%d epoch %d loss %.4f lr %.3g %.1f samples/s",
                    self.step, self.total_steps, self.epoch, metrics["loss"], metrics["lr"], metrics["samples_per_s"],
                )
                self.record(metrics)
                window_start, window_samples = time.perf_counter(), 0
            if self.batches_done_in_epoch >= self.steps_per_epoch:
                break
            if self.step >= self.total_steps:
                progress.close()
                return metrics, False
        progress.close()
        return metrics, True


def run_stage(trainer_class, cfg: TrainConfig) -> Dict[str, float]:
    """Join the process group, seed, build ``trainer_class``, resume if asked and train."""
    env = init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed + env.rank)
        trainer = trainer_class(cfg, env)
        if cfg.resume:
            trainer.resume(cfg.resume)
        return trainer.fit()
    finally:
        cleanup_distributed()


def _as_tuples(value):
    """``random.setstate`` needs tuples where a round trip through ``torch.save`` may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _model_cfg(model_name: str) -> dict:
    import open_clip

    return open_clip.get_model_config(model_name) or {}
