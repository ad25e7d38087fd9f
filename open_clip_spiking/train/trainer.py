"""The training loop every stage shares: steps, schedule, checkpoints, resume, metrics and DDP.

A stage subclasses ``Trainer``, builds its models and data in ``__init__``, calls ``setup`` with the
module it trains, and implements ``train_loader`` and ``compute_loss`` (and ``evaluate`` when it has
a validation metric).

One optimiser step takes ``--accum-freq`` batches from the stage's loader on every rank. Under DDP
the ranks make the same decisions at the same steps, because each decision rests on values summed
over the ranks. A batch that is empty on any rank after dropping bad samples is dropped on all of
them. The bad-sample share that aborts a run is the global one. A step whose loss or gradient is not
finite on any rank is skipped everywhere. A skipped step still advances the step counter and the
schedule, so both stay a function of the data position.

``save`` writes everything a run needs to continue after a crash (weights, optimiser, scheduler,
every rank's RNG states, step, epoch and the position inside the epoch) into one ``.state.pt`` file.
The loaders are deterministic functions of the seed, the epoch and the batches skipped, so a resumed
run trains on the same later batches as a run that was never interrupted.
"""
import dataclasses
import json
import logging
import math
import pickle
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..compiled import compile_model, run_with_fallback
from . import checkpoint as ckpt
from .config import AUTO_COMPILE_MIN_CPU_STEPS, TrainConfig
from .data import build_loader, check_shard_count, count_samples, expand_urls
from .distributed import (
    DistributedEnv,
    all_reduce_sum,
    cleanup_distributed,
    convert_sync_batchnorm,
    gather_objects,
    init_distributed,
)
from .optim import build_optimizer, cosine_schedule

_logger = logging.getLogger(__name__)

LATEST = "latest"
PREVIOUS = "previous"
METRICS_FILE = "metrics.jsonl"
# Version of the .state.pt layout. Version 1 had no weights: they were in the sibling weights file only.
STATE_FORMAT = 2
_STATE_KEYS = ("step", "epoch", "batches_done_in_epoch", "optimizer", "scheduler")


class TrainingError(RuntimeError):
    """A run stopped because training cannot usefully continue."""


class BadDataError(TrainingError):
    """Too many samples could not be used."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient stayed non-finite for too many steps in a row."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``--precision bf16``, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def warn_if_bf16_emulated(device: torch.device) -> None:
    """Log a warning when bf16 autocast runs on a CPU without bf16 instructions (AVX512-BF16 or AMX)."""
    if device.type != "cpu":
        return
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if not native:
        _logger.warning("--precision bf16 on a CPU without AVX512-BF16 or AMX instructions: bf16 is emulated and "
                        "runs slower than fp32 here")


class BadSampleCounter:
    """Count unusable samples, log each with its shard and key, and abort past ``max_fraction``.

    ``log`` reports the bad samples of one local batch. ``add`` takes counts that the caller summed
    over the ranks, so every rank reaches the same verdict at the same step.
    """

    # The first LOG_ALL_UP_TO bad samples of a process are logged one by one. After that, one in
    # LOG_EVERY_AFTER is logged, with the running total.
    LOG_ALL_UP_TO = 20
    LOG_EVERY_AFTER = 100

    def __init__(self, max_fraction: float, min_samples: int):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.bad = 0
        self.seen = 0
        self.logged = 0

    def log(self, batch: Dict) -> Tuple[int, int]:
        """Log the bad samples of ``batch``; returns its bad and total sample counts."""
        for url, key, reason in batch["bad"]:
            self.logged += 1
            if self.logged <= self.LOG_ALL_UP_TO or self.logged % self.LOG_EVERY_AFTER == 0:
                _logger.warning("skipped bad sample %s in %s (%d so far): %s", key, url, self.logged, reason)
        return len(batch["bad"]), len(batch["bad"]) + batch["size"]

    def add(self, bad: int, seen: int, example: Optional[Tuple[str, str, str]] = None) -> None:
        """Add counts and raise BadDataError when the share of bad samples is too large."""
        self.bad += bad
        self.seen += seen
        if self.seen >= self.min_samples and self.bad > self.max_fraction * self.seen:
            detail = f"; last one here: {example[1]} in {example[0]}: {example[2]}" if example else ""
            raise BadDataError(
                f"{self.bad} of {self.seen} samples could not be used, more than --max-bad-fraction "
                f"{self.max_fraction}{detail}"
            )

    def update(self, batch: Dict) -> None:
        """``log`` and ``add`` for one batch of a single process."""
        bad, seen = self.log(batch)
        self.add(bad, seen, batch["bad"][-1] if batch["bad"] else None)


class Trainer:
    """Shared loop of the training stages."""

    #: Name shown in progress bars and logs.
    stage = "train"
    #: Whether a fresh run validates once before its first step (recorded as epoch 0).
    evaluate_at_start = False
    #: Loss terms of ``compute_loss`` that are averaged over batches and ranks for the log.
    loss_names: Tuple[str, ...] = ("loss",)

    def __init__(self, cfg: TrainConfig, env: DistributedEnv):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.steps_run = 0
        self.bad_samples = BadSampleCounter(cfg.max_bad_fraction, min_samples=cfg.batch_size)

    def read_shards(self) -> int:
        """Expand and check ``--train-data`` and ``--val-data`` into ``train_urls`` and ``val_urls``.

        Returns the samples of an epoch: ``--train-num-samples``, or the count of the training shards.
        """
        cfg = self.cfg
        self.train_urls = expand_urls(cfg.train_data)
        self.check_train_shards(self.train_urls)
        self.val_urls = expand_urls(cfg.val_data) if cfg.val_data else None
        return cfg.train_num_samples or count_samples(self.train_urls)

    def check_train_shards(self, urls: List[str]) -> None:
        """Reject too few shards for the ranks and data-loader workers, unless shards are resampled."""
        if not self.cfg.dataset_resampled:
            check_shard_count(len(urls), self.env.world_size, self.cfg.workers)

    def shard_loader(self, urls: List[str], decoder, collate, epoch: int, skip_batches: int):
        """Build the endless training loader over webdataset shards for ``epoch`` (see ``data.build_loader``),
        with ``--augment`` applied."""
        cfg, env = self.cfg, self.env
        if cfg.augment:
            decoder = dataclasses.replace(decoder, augment=True)
        return build_loader(urls, decoder, collate, cfg.batch_size, cfg.workers, shuffle=True, seed=cfg.seed,
                            epoch=epoch, shuffle_buffer=cfg.shuffle_buffer, repeat=True,
                            resampled=cfg.dataset_resampled, skip_batches=skip_batches, rank=env.rank,
                            world_size=env.world_size)

    def setup(self, trainable: torch.nn.Module, model_name: str, num_samples: int) -> None:
        """Wrap ``trainable`` for DDP and build the optimiser and schedule for ``num_samples`` an epoch.

        ``trainable`` is the whole open_clip model whose weights the stage saves; its parameters with
        ``requires_grad`` set are the ones trained. Frozen models (the teacher) stay outside DDP.
        """
        cfg, env = self.cfg, self.env
        self.trainable = trainable
        self.model_name = model_name
        self.model = trainable
        if cfg.grad_checkpointing:
            trainable.set_grad_checkpointing(True)
        if cfg.precision == "bf16":
            warn_if_bf16_emulated(self.device)
        if env.distributed:
            if cfg.sync_bn:
                converted = convert_sync_batchnorm(trainable, self.device)
                _logger.info("--sync-bn: %d BatchNorm layers synchronised over %d ranks", converted, env.world_size)
            # Parameters can go without a gradient in a step (the text tower in an align batch without
            # texts), which DDP only tolerates with find_unused_parameters.
            self.model = DistributedDataParallel(
                trainable,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        elif cfg.sync_bn:
            _logger.info("--sync-bn has no effect in a single process")
        global_batch = cfg.batch_size * env.world_size * cfg.accum_freq
        self.steps_per_epoch = max(1, math.ceil(num_samples / global_batch))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        trained = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
        _logger.info(
            "%s: %d samples an epoch; global batch %d (%d per device x %d devices x %d accumulation steps); "
            "%d steps an epoch; %d trainable parameters",
            self.stage, num_samples, global_batch, cfg.batch_size, env.world_size, cfg.accum_freq,
            self.steps_per_epoch, trained,
        )
        self.optimizer = build_optimizer(trainable, cfg)
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup, self.total_steps, cfg.lr, cfg.lr_min)
        self.compiled = self._compile(trainable)

    def _compile(self, trainable: torch.nn.Module) -> bool:
        """Apply --compile to the trained towers; returns whether they are compiled."""
        cfg = self.cfg
        if cfg.compile == "off":
            return False
        if cfg.compile == "auto" and self.device.type != "cuda" and self.total_steps < AUTO_COMPILE_MIN_CPU_STEPS:
            _logger.info("--compile auto: running eager, since %d steps on %s are too few to repay compilation "
                         "(at least %d; --compile on forces it)", self.total_steps, self.device,
                         AUTO_COMPILE_MIN_CPU_STEPS)
            return False
        return compile_model(trainable, self.device, backend=cfg.compile_backend)

    # ---------------------------------------------------------------------------------- stage hooks
    def train_loader(self, epoch: int, skip_batches: int = 0) -> Iterable[Dict]:
        """Batches of one epoch; each is a dict with ``size`` (usable samples) and ``bad`` records.

        The first ``skip_batches`` batches are ignored by the caller, so a loader may return cheap
        placeholders for them.
        """
        raise NotImplementedError

    def compute_loss(self, batch: Dict, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Loss terms of one batch; ``loss`` is the one minimised."""
        raise NotImplementedError

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Validation metrics after an epoch, or None when the stage has no validation data."""
        return None

    def set_train_mode(self) -> None:
        self.model.train()

    def on_epoch_end(self) -> None:
        """Called on every rank after the last step of an epoch, before validation and saving."""

    def on_save(self) -> None:
        """Called on every rank before a checkpoint is written."""

    def check_first_batches(self, batches: List[Dict]) -> None:
        """Validate the batches of the first step this process runs; raise to stop with a message."""

    def forward_model(self) -> torch.nn.Module:
        """The module ``compute_loss`` runs during training: the DDP wrapper when there is one."""
        return self.model

    def backward(self, losses: Dict[str, torch.Tensor], scale: float) -> None:
        """Accumulate the gradient of ``scale * losses['loss']`` into the parameters' ``grad``."""
        (losses["loss"] * scale).backward()

    def finish_gradients(self) -> Dict[str, float]:
        """Turn the accumulated gradients into the ones to step on; returns extra metrics for the log."""
        return {}

    # ---------------------------------------------------------------------------------- steps
    def train_step(self, batches: List[Dict]) -> Dict[str, float]:
        """Take one optimiser step on the gradient averaged over ``batches`` (and, under DDP, over ranks)."""
        self.set_train_mode()
        self.optimizer.zero_grad(set_to_none=True)
        model = self.forward_model()
        sums: Dict[str, List[torch.Tensor]] = {}
        for index, batch in enumerate(batches):
            # DDP reduces gradients in the backward pass of the last batch only.
            last = index == len(batches) - 1
            context = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
            with context:
                losses = self.compute_loss(batch, model)
                self.backward(losses, 1.0 / len(batches))
            for name, value in losses.items():
                sums.setdefault(name, []).append(value.detach().float())
        extra = self.finish_gradients()
        grad_norm = self._gradient_norm()
        metrics = self._mean_losses(sums)
        if all(math.isfinite(value) for value in metrics.values()) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self._skip_update(metrics, grad_norm)
        self.scheduler.step()
        self.step += 1
        metrics.update(extra)
        metrics["grad_norm"] = grad_norm
        return metrics

    def _gradient_norm(self) -> float:
        """Global gradient norm, after clipping it to --grad-clip-norm when that is set."""
        params = [p for p in self.trainable.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.grad_clip_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params]))

    def _mean_losses(self, sums: Dict[str, List[torch.Tensor]]) -> Dict[str, float]:
        """Mean of each loss term over the batches that have it, on this rank and (for
        ``loss_names``) over all ranks."""
        names = list(self.loss_names)
        columns = []
        for name in names:
            values = sums.get(name, [])
            total = torch.stack(values).sum() if values else torch.zeros((), device=self.device)
            columns += [total.double(), torch.tensor(float(len(values)), dtype=torch.float64, device=total.device)]
        reduced = all_reduce_sum(torch.stack(columns).to(self.device)).tolist()
        metrics = {name: reduced[2 * i] / reduced[2 * i + 1] for i, name in enumerate(names) if reduced[2 * i + 1]}
        for name, values in sums.items():
            if name not in metrics:
                metrics[name] = torch.stack(values).mean().item()
        return metrics

    def _skip_update(self, metrics: Dict[str, float], grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_steps += 1
        step = self.step + 1
        terms = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        _logger.warning("step %d: non-finite loss or gradient (%s, gradient norm %.4g); skipped the update "
                        "(%d in a row)", step, terms, grad_norm, self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row < self.cfg.max_nonfinite_steps:
            return
        hints = [f"lower --lr (now {self.cfg.lr:g})"]
        if self.cfg.grad_clip_norm is None:
            hints.append("set --grad-clip-norm")
        if self.cfg.precision != "fp32":
            hints.append(f"train with --precision fp32 (now {self.cfg.precision})")
        raise NonFiniteLossError(
            f"the loss or gradient was not finite in {self.nonfinite_in_a_row} consecutive steps (steps "
            f"{step - self.nonfinite_in_a_row + 1} to {step}; --max-nonfinite-steps {self.cfg.max_nonfinite_steps}); "
            f"{', '.join(hints)}, or check the data of these steps"
        )

    def _run_step(self, batches: List[Dict]) -> Tuple[Optional[Dict[str, float]], int]:
        """Count bad samples, drop empty batches and train.

        Returns the metrics, or None when every batch was empty, and the number of good samples over
        all ranks.
        """
        counts = torch.zeros(3 + len(batches), dtype=torch.int64)  # bad, seen, good, then one empty flag a batch
        example = None
        for index, batch in enumerate(batches):
            bad, seen = self.bad_samples.log(batch)
            counts[0] += bad
            counts[1] += seen
            counts[2] += batch["size"]
            counts[3 + index] = int(batch["size"] == 0)
            if batch["bad"]:
                example = batch["bad"][-1]
        counts = all_reduce_sum(counts.to(self.device)).cpu().tolist()
        self.bad_samples.add(counts[0], counts[1], example)
        usable = [batch for batch, empty in zip(batches, counts[3:]) if not empty]
        if not usable:
            _logger.warning("step %d: every batch is empty on some rank after dropping bad samples; no update",
                            self.step + 1)
            self.scheduler.step()
            self.step += 1
            return None, counts[2]
        if self.steps_run == 0:
            self.check_first_batches(usable)
        self.steps_run += 1
        if self.compiled:
            # Compilation happens in the first step, and again when a batch of a new shape arrives.
            return run_with_fallback(self.trainable, lambda: self.train_step(usable)), counts[2]
        return self.train_step(usable), counts[2]

    # ---------------------------------------------------------------------------------- state
    def _rng_state(self) -> Dict:
        numpy_name, numpy_keys, numpy_position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": {"name": numpy_name, "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
                      "position": int(numpy_position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: Dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuples(state["python"]))
        if "numpy" in state:
            numpy_state = state["numpy"]
            np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                                 numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def state_dict(self, rng_states: Optional[List[Dict]] = None) -> Dict:
        """Everything ``resume`` restores; ``rng_states`` lists every rank's RNG states."""
        return {
            "format": STATE_FORMAT,
            "stage": self.stage,
            "model_name": self.model_name,
            "model_cfg": json.dumps(_model_cfg(self.model_name), sort_keys=True),
            "model": self.trainable.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "world_size": self.env.world_size,
            "batch_size": self.cfg.batch_size,
            "accum_freq": self.cfg.accum_freq,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "bad_samples": {"bad": self.bad_samples.bad, "seen": self.bad_samples.seen},
            "nonfinite": {"in_a_row": self.nonfinite_in_a_row, "total": self.nonfinite_steps},
            "rng": rng_states if rng_states is not None else [self._rng_state()],
            "config": json.dumps(self.cfg.to_dict(), sort_keys=True),
        }

    def save(self, name: str) -> None:
        """Write ``NAME.<format>`` (weights) and ``NAME.state.pt`` (resume state) on rank 0.

        Every rank must call it, because the RNG states of all ranks are gathered. Saving ``latest``
        first renames the existing ``latest.state.pt`` to ``previous.state.pt``, so a resume can fall
        back to it.
        """
        self.on_save()
        rng_states = gather_objects(self._rng_state())
        if not self.env.is_master:
            return
        weights = self.output_dir / f"{name}.{self.cfg.checkpoint_format}"
        ckpt.save_weights(weights, self.trainable.state_dict(), self.model_name, _model_cfg(self.model_name),
                          self.cfg.to_dict())
        state_path = self.output_dir / f"{name}{ckpt.STATE_SUFFIX}"
        if name == LATEST:
            ckpt.rotate(state_path, self.output_dir / f"{PREVIOUS}{ckpt.STATE_SUFFIX}")
        ckpt.save_training_state(state_path, self.state_dict(rng_states))
        _logger.info("saved checkpoint %s at step %d", weights, self.step)

    def resume(self, spec: str) -> None:
        """Restore the state written by ``save``: ``latest`` (falling back to ``previous``) or a path."""
        state, state_path = self._read_resume_state(spec)
        self._check_resume_compatible(state, state_path)

        if "model" in state:
            weights = state["model"]
        else:
            weights = ckpt.load_weights(self._weights_beside(state_path))
        try:
            self.trainable.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"resume state {state_path} does not fit the {self.stage} run being built (model "
                f"{self.model_name!r}, config {json.dumps(_model_cfg(self.model_name), sort_keys=True)}); "
                f"resume with the flags of the run that wrote it. Details: {error}"
            ) from error
        self.scheduler.load_state_dict(state["scheduler"])

        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batches_done_in_epoch = state["batches_done_in_epoch"]
        self.bad_samples.bad = state.get("bad_samples", {}).get("bad", 0)
        self.bad_samples.seen = state.get("bad_samples", {}).get("seen", 0)
        self.nonfinite_in_a_row = state.get("nonfinite", {}).get("in_a_row", 0)
        self.nonfinite_steps = state.get("nonfinite", {}).get("total", 0)

        self._restore_rng(state)
        self._warn_on_layout_change(state)
        self._rewind_metrics()
        _logger.info(
            "resumed from %s at step %d (epoch %d, %d batches into it)",
            state_path, self.step, self.epoch, self.batches_done_in_epoch,
        )

    def _read_resume_state(self, spec: str) -> Tuple[Dict, Path]:
        if spec != LATEST:
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(
                    f"resume state {path} not found; run without --resume or point it at a .state.pt file"
                )
            return _load_state(path), path
        latest = self.output_dir / f"{LATEST}{ckpt.STATE_SUFFIX}"
        previous = self.output_dir / f"{PREVIOUS}{ckpt.STATE_SUFFIX}"
        candidates = [path for path in (latest, previous) if path.is_file()]
        if not candidates:
            raise FileNotFoundError(
                f"resume state {latest} not found; run without --resume or point it at a .state.pt file"
            )
        problems = [] if latest.is_file() else [f"{latest} is missing"]
        for path in candidates:
            try:
                state = _load_state(path)
            except ValueError as error:
                _logger.warning("%s", error)
                problems.append(str(error))
                continue
            if problems:
                _logger.warning("resuming from the previous checkpoint %s (step %d) because %s", path,
                                state["step"], "; ".join(problems))
            return state, path
        raise ValueError(f"no readable resume state in {self.output_dir}: {'; '.join(problems)}")

    def _check_resume_compatible(self, state: Dict, path: Path) -> None:
        """Raise ValueError naming both sides when the state comes from another stage or model config."""
        saved_cfg = json.loads(state.get("config", "{}"))
        saved_stage = state.get("stage", saved_cfg.get("stage"))
        if saved_stage is not None and saved_stage != self.stage:
            raise ValueError(
                f"resume state {path} was written by the {saved_stage} stage, but this run is the {self.stage} "
                f"stage; resume with --stage {saved_stage}, or start the new stage from its weights with --pretrained"
            )
        if "model_name" in state:
            saved_name, saved_model_cfg = state["model_name"], state.get("model_cfg")
        else:
            weights = self._weights_beside(path)
            metadata = ckpt.read_checkpoint_metadata(weights)
            if metadata is None:
                raise FileNotFoundError(f"weights {weights} for resume state {path} are missing or unreadable")
            saved_name, saved_model_cfg = metadata["model_name"], json.dumps(metadata["model_cfg"], sort_keys=True)
        current_model_cfg = json.dumps(_model_cfg(self.model_name), sort_keys=True)
        if saved_name != self.model_name or (saved_model_cfg is not None and saved_model_cfg != current_model_cfg):
            raise ValueError(
                f"resume state {path} was trained as {saved_name!r} (config {saved_model_cfg}) but this "
                f"{self.stage} run trains {self.model_name!r} (config {current_model_cfg}); resume with the model "
                f"the checkpoint was trained as"
            )
        current = self.cfg.to_dict()
        changed = {key: (saved_cfg[key], value) for key, value in current.items()
                   if key in saved_cfg and key != "resume" and saved_cfg[key] != value}
        if changed:
            _logger.info("resuming with changed settings: %s",
                         ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items())))

    def _weights_beside(self, state_path: Path) -> Path:
        return Path(str(state_path)[: -len(ckpt.STATE_SUFFIX)] + f".{self.cfg.checkpoint_format}")

    def _restore_rng(self, state: Dict) -> None:
        saved = state["rng"]
        if isinstance(saved, dict):  # format 1: the states of rank 0 only
            saved = [saved]
        if len(saved) != self.env.world_size:
            _logger.warning("the resume state contains the RNG states of %d ranks but this run has %d; rank r "
                            "restores the states of saved rank r modulo %d", len(saved), self.env.world_size,
                            len(saved))
        self._set_rng_state(saved[self.env.rank % len(saved)])

    def _warn_on_layout_change(self, state: Dict) -> None:
        saved = (state.get("world_size", 1), state.get("batch_size", self.cfg.batch_size),
                 state.get("accum_freq", 1))
        current = (self.env.world_size, self.cfg.batch_size, self.cfg.accum_freq)
        if saved != current:
            _logger.warning(
                "the resume state was written with %d ranks x batch %d x %d accumulation steps and this run has "
                "%d x %d x %d; it continues at batch %d of epoch %d, but the batches differ from the interrupted "
                "run's", *saved, *current, self.batches_done_in_epoch, self.epoch,
            )

    def _rewind_metrics(self) -> None:
        """Drop the records that the interrupted run logged after the step being resumed."""
        path = self.output_dir / METRICS_FILE
        if not self.env.is_master or not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:  # a line cut short by the crash
                dropped += 1
                continue
            if step > self.step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            text = "".join(line + "\n" for line in kept)
            ckpt.atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            _logger.info("dropped %d records of %s written after step %d", dropped, path, self.step)

    # ---------------------------------------------------------------------------------- loop
    def record(self, metrics: Dict) -> None:
        if not self.env.is_master:
            return
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
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
                self.save(LATEST)
                break
            self.epoch += 1
            self.batches_done_in_epoch = 0
            self.on_epoch_end()
            validation = self.evaluate()
            if validation:
                _logger.info("validation after epoch %d: %s", self.epoch, validation)
                last.update(validation)
                self.record({**validation, "epoch": self.epoch, "step": self.step})
            self.save(f"epoch_{self.epoch}")
            self.save(LATEST)
        return last

    def _train_epoch(self) -> Tuple[Optional[Dict[str, float]], bool]:
        """Train until the epoch's batches or the steps run out; returns the last metrics and whether
        the epoch completed (False when --max-steps stopped it early)."""
        cfg = self.cfg
        batches_per_epoch = self.steps_per_epoch * cfg.accum_freq
        skip = self.batches_done_in_epoch
        loader = self.train_loader(self.epoch, skip)
        progress = tqdm(total=self.steps_per_epoch, initial=skip // cfg.accum_freq,
                        desc=f"{self.stage} epoch {self.epoch}", disable=not self.env.is_master, dynamic_ncols=True)
        metrics = None
        window_start, window_samples = time.perf_counter(), 0
        pending: List[Dict] = []
        for index, batch in enumerate(loader):
            if index < skip:
                continue  # already trained on before the resume
            pending.append(batch)
            if len(pending) < cfg.accum_freq:
                continue

            self.batches_done_in_epoch = index + 1
            step_metrics, samples = self._run_step(pending)
            pending = []
            window_samples += samples
            progress.update(1)
            if step_metrics is not None:
                metrics = step_metrics
                progress.set_postfix(loss=f"{metrics['loss']:.4f}")

            if metrics is not None and (self.step % cfg.log_every_n_steps == 0 or self.step == self.total_steps):
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    step=self.step,
                    epoch=self.epoch,
                    lr=self.optimizer.param_groups[0]["lr"],
                    samples_per_s=window_samples / max(elapsed, 1e-9),
                    bad_samples=self.bad_samples.bad,
                    nonfinite_steps=self.nonfinite_steps,
                )
                _logger.info(
                    "step %d/%d epoch %d loss %.4f lr %.3g %.1f samples/s",
                    self.step, self.total_steps, self.epoch, metrics["loss"], metrics["lr"], metrics["samples_per_s"],
                )
                self.record(metrics)
                window_start, window_samples = time.perf_counter(), 0

            epoch_done = self.batches_done_in_epoch >= batches_per_epoch
            if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and not epoch_done \
                    and self.step < self.total_steps:
                self.save(LATEST)
            if epoch_done:
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


def _load_state(path: Path) -> Dict:
    """Read and check a ``.state.pt`` file, raising ValueError with the reason when it cannot be used."""
    try:
        state = ckpt.load_training_state(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"resume state {path} is unreadable (truncated or corrupt?): "
                         f"{type(error).__name__}: {error}") from error
    missing = [key for key in _STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"resume state {path} lacks {', '.join(missing)}; it was not written by this trainer")
    return state


def _as_tuples(value):
    """``random.setstate`` needs tuples where a round trip through ``torch.save`` may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _model_cfg(model_name: str) -> dict:
    import open_clip

    return open_clip.get_model_config(model_name) or {}
