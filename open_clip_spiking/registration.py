"""Registration with timm, open_clip and clip_benchmark, and the one place that documents the seams.

* **timm**: the image towers in ``open_clip_spiking.vision`` are ordinary ``@register_model`` entry
  points (``spikeclip_vit_s``, ...). open_clip builds them through ``vision_cfg.timm_model_name``.
* **open_clip model configs**: the JSON files shipped in ``open_clip_spiking/model_configs`` are added
  with ``open_clip.add_model_config``. The offline teacher's config (``lit-effnetlite0-minilm``) names
  folders inside installed PyPI packages, so ``offline_teacher.register_config`` resolves them and
  adds it to open_clip's registry directly, when those packages are installed.
* **open_clip build seams**: open_clip has no registry for text towers, so
  ``open_clip.model._build_text_tower`` is wrapped. A ``text_cfg`` with ``"snn_tower": "spiking_mlp"``
  builds ``SpikingTextMlp`` (set ``"custom_text": true`` so the tower lives at ``model.text``); every
  other config goes to open_clip unchanged. ``open_clip.model._build_vision_tower`` is wrapped the same
  way for one key: ``vision_cfg.timm_model_kwargs`` (for example ``{"time_steps": 8}``) is passed to our
  timm entry points, which open_clip's ``TimmModel`` cannot forward. Both functions are looked up at
  call time by ``CLIP`` and ``CustomTextCLIP`` (open_clip_torch 3.x).
* **open_clip checkpoint loading**: ``open_clip.factory.load_checkpoint`` is wrapped so that a checkpoint
  written by our trainer for another config fails with a message naming both configs.
* **clip_benchmark**: ``--model_type spikeclip`` is added to ``clip_benchmark.models.TYPE2FUNC``. The
  default ``--model_type open_clip`` works too, since our configs are open_clip configs.
"""
import contextlib
import functools
import json
import logging
import threading
from pathlib import Path
from typing import Any, Dict, Optional

_logger = logging.getLogger(__name__)

_WRAPPED_MARK = "_open_clip_spiking_wrapped"
_lock = threading.RLock()

# Keyword arguments for our timm entry points while open_clip builds a vision tower.
_vision_overrides = threading.local()


def model_config_dir() -> Path:
    """Folder of the shipped open_clip model configs.

    A wheel contains them in ``open_clip_spiking/model_configs``; an editable install reads the
    repository's top-level ``model_configs`` folder.
    """
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "model_configs", package_dir.parent / "model_configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"model_configs folder not found next to {package_dir}; reinstall open_clip_spiking"
    )


def list_spiking_models() -> list:
    """Names of the open_clip model configs that this package ships."""
    return sorted(path.stem for path in model_config_dir().glob("*.json"))


def timm_model_overrides() -> Dict[str, Any]:
    """Keyword arguments that the open_clip vision seam passes to our timm entry points."""
    return dict(getattr(_vision_overrides, "kwargs", None) or {})


@contextlib.contextmanager
def _override_timm_kwargs(kwargs: Dict[str, Any]):
    previous = getattr(_vision_overrides, "kwargs", None)
    _vision_overrides.kwargs = kwargs
    try:
        yield
    finally:
        _vision_overrides.kwargs = previous


def _wrap_build_text_tower(original):
    @functools.wraps(original)
    def build_text_tower(embed_dim, text_cfg, quick_gelu=False, cast_dtype=None):
        if isinstance(text_cfg, dict) and "snn_tower" in text_cfg:
            from .text import SpikingTextCfg, SpikingTextMlp

            return SpikingTextMlp(embed_dim, SpikingTextCfg.from_dict(text_cfg))
        return original(embed_dim, text_cfg, quick_gelu, cast_dtype)

    setattr(build_text_tower, _WRAPPED_MARK, True)
    return build_text_tower


def _wrap_build_vision_tower(original):
    @functools.wraps(original)
    def build_vision_tower(embed_dim, vision_cfg, quick_gelu=False, cast_dtype=None):
        if isinstance(vision_cfg, dict) and "timm_model_kwargs" in vision_cfg:
            vision_cfg = dict(vision_cfg)
            kwargs = vision_cfg.pop("timm_model_kwargs") or {}
            with _override_timm_kwargs(kwargs):
                return original(embed_dim, vision_cfg, quick_gelu, cast_dtype)
        return original(embed_dim, vision_cfg, quick_gelu, cast_dtype)

    setattr(build_vision_tower, _WRAPPED_MARK, True)
    return build_vision_tower


def _wrap_load_checkpoint(original):
    @functools.wraps(original)
    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        try:
            return original(model, checkpoint_path, *args, **kwargs)
        except (RuntimeError, AssertionError) as error:
            # open_clip reports a mismatch from load_state_dict (RuntimeError) or, for text
            # position embeddings of another width, from an assert before it.
            from .train.checkpoint import read_checkpoint_metadata

            metadata = read_checkpoint_metadata(checkpoint_path)
            if not metadata or "model_name" not in metadata:
                raise
            raise ValueError(
                f"checkpoint {checkpoint_path} was written for model {metadata['model_name']!r} "
                f"(config {json.dumps(metadata.get('model_cfg'), sort_keys=True)}) and does not fit "
                f"the model being built ({_describe_model(model)}); create the model as "
                f"{metadata['model_name']!r}. Details: {error}"
            ) from error

    setattr(load_checkpoint, _WRAPPED_MARK, True)
    return load_checkpoint


def _describe_model(model) -> str:
    parts = []
    visual = getattr(model, "visual", None)
    trunk = getattr(visual, "trunk", None)
    pretrained_cfg = getattr(trunk, "pretrained_cfg", None) or {}
    if pretrained_cfg.get("architecture"):
        parts.append(f"image tower {pretrained_cfg['architecture']!r}")
    text = getattr(model, "text", None)
    if getattr(text, "cfg", None) is not None:
        parts.append(f"text tower {text.cfg}")
    parts.append(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    return ", ".join(parts)


def _wrap_once(module, name: str, wrapper) -> None:
    current = getattr(module, name)
    if not getattr(current, _WRAPPED_MARK, False):
        setattr(module, name, wrapper(current))


def register_timm() -> None:
    """Register the spiking image towers with timm (importing the module runs ``@register_model``)."""
    from . import vision  # noqa: F401


def register_open_clip() -> None:
    """Add our model configs to open_clip and wrap its text-tower, vision-tower and checkpoint seams."""
    import open_clip
    import open_clip.factory
    import open_clip.model

    register_timm()
    with _lock:
        config_dir = model_config_dir()
        if config_dir not in open_clip.factory._MODEL_CONFIG_PATHS:
            open_clip.add_model_config(config_dir)
        _wrap_once(open_clip.model, "_build_text_tower", _wrap_build_text_tower)
        _wrap_once(open_clip.model, "_build_vision_tower", _wrap_build_vision_tower)
        _wrap_once(open_clip.factory, "load_checkpoint", _wrap_load_checkpoint)
    from . import offline_teacher

    offline_teacher.register_config()


def load_spikeclip(
        model_name: str,
        pretrained: Optional[str] = None,
        cache_dir: Optional[str] = None,
        device="cpu",
):
    """clip_benchmark loader: returns ``(model, transform, tokenizer)`` with the model in eval mode."""
    import open_clip

    register_open_clip()
    model, _, transform = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, cache_dir=cache_dir, device=device
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, transform, tokenizer


def register_clip_benchmark() -> None:
    """Add ``spikeclip`` to clip_benchmark's model types."""
    import clip_benchmark.models as models

    with _lock:
        models.TYPE2FUNC.setdefault("spikeclip", load_spikeclip)
        if "spikeclip" not in models.MODEL_TYPES:
            # Appended in place: clip_benchmark's CLI reads this list object for --model_type choices.
            models.MODEL_TYPES.append("spikeclip")


def register_all() -> None:
    """Register with every package of the three that is installed."""
    register_timm()
    register_open_clip()
    try:
        import clip_benchmark.models  # noqa: F401
    except ImportError:
        _logger.debug("clip_benchmark is not installed; skipping its registration")
    else:
        register_clip_benchmark()
