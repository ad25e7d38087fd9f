"""Run a spiking student and an ANN teacher on the same real images and write the energy report.

Each model gets its own open_clip preprocessing of every image. Shards are read with the trainers'
reader (``train.data``), in shard order and without shuffling, so two runs see the same images.
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron
from tqdm import tqdm

from .counting import OperationCounter
from .report import CONVENTIONS, EnergyCosts, tower_report, write_figure, write_json, write_markdown
from .stats import FiringRateMonitor

_logger = logging.getLogger(__name__)

__all__ = ["ProfileConfig", "run_profile", "TEXT_SOURCES"]

TEXT_SOURCES = ("none", "prompts", "captions")


@dataclass
class ProfileConfig:
    """Settings of one profiler run, filled from the command line by ``__main__``."""

    model: str
    data: str
    output: Path
    pretrained: Optional[str] = None
    teacher: Optional[str] = None
    teacher_pretrained: Optional[str] = None
    num_images: int = 256
    batch_size: int = 32
    costs: EnergyCosts = field(default_factory=EnergyCosts)
    device: str = "cpu"
    text_source: str = "none"
    classnames: Optional[str] = None
    templates: Optional[str] = None
    num_texts: int = 256
    seed: int = 0


@dataclass
class _Profiled:
    """A model with its preprocessing, tokenizer and the counters of its two towers."""

    name: str
    pretrained: Optional[str]
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    image_counter: OperationCounter
    text_counter: OperationCounter
    image_rates: Optional[FiringRateMonitor] = None
    text_rates: Optional[FiringRateMonitor] = None


# --- models ----------------------------------------------------------------------------------------

def _has_neurons(model: nn.Module) -> bool:
    return any(isinstance(module, neuron.BaseNode) for module in model.modules())


def _time_steps(tower: Optional[nn.Module]) -> Optional[int]:
    """Return the ``time_steps`` of the first submodule that has one, or None for an ANN tower."""
    if tower is None:
        return None
    for module in tower.modules():
        steps = getattr(module, "time_steps", None)
        if isinstance(steps, int):
            return steps
    return None


def _load(name: str, pretrained: Optional[str], option: str, device: str) -> _Profiled:
    import open_clip

    from ..registration import list_spiking_models

    if name not in open_clip.list_models():
        raise ValueError(
            f"{option} {name!r} is not an open_clip model config; this package ships "
            f"{list_spiking_models()}, and open_clip.list_models() lists every name"
        )
    if pretrained is None:
        _logger.warning("%s %s: no weights given, so the profile uses random initial weights", option, name)
    elif not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"{option}-pretrained {pretrained} not found; pass the .safetensors or .pt checkpoint of {name!r}"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except RuntimeError as error:
        # open_clip reports unreadable or mismatched checkpoints as RuntimeError.
        raise ValueError(f"failed to build {option} {name!r} from {pretrained}: {error}") from error
    model.eval()
    return _Profiled(
        name=name,
        pretrained=pretrained,
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        image_counter=OperationCounter(model),
        text_counter=OperationCounter(model),
    )


# --- data ------------------------------------------------------------------------------------------

def _shard_urls(spec: str) -> List[str]:
    from ..train.data import expand_urls

    try:
        return expand_urls(spec)
    except (FileNotFoundError, ValueError) as error:
        raise FileNotFoundError(
            f"--data {spec!r} names no readable shards ({error}); pass a .tar file, a brace pattern such as "
            f"'DIR/test/{{0..4}}.tar' or a folder that contains .tar shards"
        ) from error


def _truncate(batch: Dict[str, Any], count: int, image_fields, text_fields) -> Dict[str, Any]:
    """Keep the first ``count`` samples of a collated batch."""
    if count >= batch["size"]:
        return batch
    keep = batch["text_index"] < count
    truncated = dict(batch, size=count, text_index=batch["text_index"][keep])
    for name in image_fields:
        truncated[name] = batch[name][:count]
    for name in text_fields:
        if name in batch:
            truncated[name] = batch[name][keep]
    return truncated


def _image_batches(cfg: ProfileConfig, urls: List[str], transforms: Dict[str, Callable],
                   tokenizers: Dict[str, Callable], skipped: List[int]) -> Iterator[Dict[str, Any]]:
    """Yield collated batches until ``cfg.num_images`` good images were read or the shards end."""
    from ..train.data import Collate, SampleDecoder, build_loader

    loader = build_loader(
        urls,
        SampleDecoder(image_transforms=transforms),
        Collate(image_fields=tuple(transforms), tokenizers=tokenizers),
        batch_size=cfg.batch_size,
        workers=0,
        shuffle=False,
        seed=cfg.seed,
    )
    seen = 0
    for batch in loader:
        for url, key, reason in batch["bad"]:
            if skipped[0] < 5:
                _logger.warning("skipping sample %s in %s: %s", key, url, reason)
            skipped[0] += 1
        if batch["size"] == 0:
            continue
        batch = _truncate(batch, cfg.num_images - seen, tuple(transforms), tuple(tokenizers))
        seen += batch["size"]
        yield batch
        if seen >= cfg.num_images:
            return


def _prompts(cfg: ProfileConfig) -> List[str]:
    from ..train.data import load_classnames, load_templates

    classnames = load_classnames(cfg.classnames)
    templates = load_templates(cfg.templates)
    # Template-major order, so that a cap on the number of texts still covers every class.
    prompts = [template.replace("{c}", name) for template in templates for name in classnames]
    return prompts[: cfg.num_texts]


# --- runs ------------------------------------------------------------------------------------------

def _encode_images(profiled: _Profiled, images: torch.Tensor, device: str) -> None:
    with profiled.image_counter:
        profiled.model.encode_image(images.to(device))


def _encode_texts(profiled: _Profiled, tokens: torch.Tensor, device: str) -> None:
    with profiled.text_counter:
        profiled.model.encode_text(tokens.to(device))


def _run_images(cfg: ProfileConfig, urls: List[str], models: List[_Profiled], captions: Dict[str, list]):
    transforms = {profiled.name: profiled.preprocess for profiled in models}
    tokenizers = {}
    if cfg.text_source == "captions":
        tokenizers = {f"{profiled.name}/text": profiled.tokenizer for profiled in models}
    skipped = [0]
    num_images = 0
    for profiled in models:
        if _has_neurons(profiled.model):
            profiled.image_rates = FiringRateMonitor(profiled.model)
    progress = tqdm(total=cfg.num_images, desc="energy profile", unit="img", dynamic_ncols=True)
    try:
        for batch in _image_batches(cfg, urls, transforms, tokenizers, skipped):
            for profiled in models:
                _encode_images(profiled, batch[profiled.name], cfg.device)
                text_field = f"{profiled.name}/text"
                if text_field in batch:
                    captions[profiled.name].append(batch[text_field])
            num_images += batch["size"]
            progress.update(batch["size"])
            _logger.info("profiled %d of %d images", num_images, cfg.num_images)
    finally:
        progress.close()
        for profiled in models:
            if profiled.image_rates is not None:
                profiled.image_rates.close()
    return num_images, skipped[0]


def _run_texts(cfg: ProfileConfig, models: List[_Profiled], captions: Dict[str, list]) -> int:
    if cfg.text_source == "prompts":
        prompts = _prompts(cfg)
        batches = {
            profiled.name: [profiled.tokenizer(prompts[start:start + cfg.batch_size])
                            for start in range(0, len(prompts), cfg.batch_size)]
            for profiled in models
        }
    else:
        batches = {profiled.name: captions[profiled.name] for profiled in models}
    num_texts = sum(len(tokens) for tokens in batches[models[0].name])
    if num_texts == 0:
        raise ValueError(
            f"no texts to profile: the images read from {cfg.data} have no 'txt' captions; use "
            "--text-source prompts with --classnames and --templates, or --text-source none"
        )
    for profiled in models:
        if _has_neurons(profiled.model):
            profiled.text_rates = FiringRateMonitor(profiled.model)
        try:
            for tokens in batches[profiled.name]:
                _encode_texts(profiled, tokens, cfg.device)
        finally:
            if profiled.text_rates is not None:
                profiled.text_rates.close()
    return num_texts


def _tower(profiled: _Profiled, counter: OperationCounter, rates: Optional[FiringRateMonitor],
           num_items: int, costs: EnergyCosts, tower: Optional[nn.Module]) -> Dict[str, Any]:
    return tower_report(
        counter.layers(),
        num_items,
        costs,
        model=profiled.name,
        pretrained=profiled.pretrained,
        time_steps=_time_steps(tower),
        neuron_stats=rates.stats() if rates is not None else None,
        uncounted_ops=counter.uncounted_ops,
    )


def _ratio(student: Dict[str, Any], teacher: Optional[Dict[str, Any]]) -> Optional[float]:
    if not teacher or not teacher["energy_mj"]:
        return None
    return student["energy_mj"] / teacher["energy_mj"]


def _check_config(cfg: ProfileConfig) -> None:
    if cfg.text_source not in TEXT_SOURCES:
        raise ValueError(f"text source must be one of {TEXT_SOURCES}, got {cfg.text_source!r}")
    if cfg.text_source == "prompts" and not (cfg.classnames and cfg.templates):
        raise ValueError("--text-source prompts needs --classnames and --templates")
    if cfg.teacher_pretrained and not cfg.teacher:
        raise ValueError(
            "--teacher-pretrained was given without --teacher. Pass --teacher with the checkpoint's model config"
        )


def run_profile(cfg: ProfileConfig, command: str = "") -> Dict[str, Any]:
    """Profile the student (and the teacher, if set), write ``energy.json``, ``energy.md`` and
    ``energy.png`` into ``cfg.output`` and return the report."""
    _check_config(cfg)
    started = time.monotonic()
    urls = _shard_urls(cfg.data)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)

    student = _load(cfg.model, cfg.pretrained, "--model", cfg.device)
    models = [student]
    teacher = None
    if cfg.teacher:
        if cfg.teacher == cfg.model:
            raise ValueError(f"--teacher {cfg.teacher!r} equals --model; name a different model config")
        teacher = _load(cfg.teacher, cfg.teacher_pretrained, "--teacher", cfg.device)
        models.append(teacher)

    captions: Dict[str, list] = {profiled.name: [] for profiled in models}
    with torch.no_grad():
        num_images, skipped = _run_images(cfg, urls, models, captions)
        if num_images == 0:
            raise ValueError(f"no decodable images in {cfg.data} ({skipped} samples skipped); check the shards")
        if num_images < cfg.num_images:
            _logger.warning("the shards hold %d usable images, fewer than --num-images %d", num_images, cfg.num_images)
        num_texts = _run_texts(cfg, models, captions) if cfg.text_source != "none" else 0

    costs = cfg.costs
    reports = {
        profiled.name: _tower(profiled, profiled.image_counter, profiled.image_rates, num_images, costs,
                              profiled.model.visual)
        for profiled in models
    }
    student_report = reports[student.name]
    teacher_report = reports[teacher.name] if teacher else None
    report: Dict[str, Any] = {
        "student": student_report,
        "teacher": teacher_report,
        "ratio": _ratio(student_report, teacher_report),
        "num_images": num_images,
        "command": command,
        "settings": {
            "data": cfg.data,
            "shards": urls,
            "num_images_requested": cfg.num_images,
            "skipped_samples": skipped,
            "batch_size": cfg.batch_size,
            "mac_pj": costs.mac_pj,
            "ac_pj": costs.ac_pj,
            "technology": costs.technology,
            "device": cfg.device,
            "text_source": cfg.text_source,
            "seed": cfg.seed,
            "torch": torch.__version__,
        },
        "conventions": list(CONVENTIONS),
    }
    if num_texts:
        text_reports = {
            profiled.name: _tower(profiled, profiled.text_counter, profiled.text_rates, num_texts, costs,
                                  getattr(profiled.model, "text", None))
            for profiled in models
        }
        text_student = text_reports[student.name]
        text_teacher = text_reports[teacher.name] if teacher else None
        report["text"] = {
            "source": cfg.text_source,
            "num_texts": num_texts,
            "student": text_student,
            "teacher": text_teacher,
            "ratio": _ratio(text_student, text_teacher),
        }
    report["elapsed_s"] = round(time.monotonic() - started, 1)

    write_json(report, output / "energy.json")
    write_markdown(report, output / "energy.md")
    write_figure(report, output / "energy.png")
    _log_totals(report, output)
    return report


def _log_totals(report: Dict[str, Any], output: Path) -> None:
    student, teacher = report["student"], report["teacher"]
    _logger.info(
        "student %s: %.4g mJ per image (%.3e ACs, %.3e MACs, mean firing rate %.4f)",
        student["model"], student["energy_mj"], student["acs"], student["macs"], student.get("mean_firing_rate", 0.0),
    )
    if teacher:
        _logger.info("teacher %s: %.4g mJ per image (%.3e MACs); student / teacher %.4g",
                     teacher["model"], teacher["energy_mj"], teacher["macs"], report["ratio"] or 0.0)
    _logger.info("wrote energy.json, energy.md and energy.png to %s after %.1f s", output, report["elapsed_s"])
