"""Checkpoints that rebuild their model from the file alone, written atomically.

Two files per checkpoint, both loadable without unpickling arbitrary objects:

* ``NAME.safetensors``: the model weights with open_clip key names, plus string metadata
  (``model_name``, ``model_cfg`` and ``args`` as JSON). ``open_clip.create_model(name,
  pretrained="NAME.safetensors")`` loads it.
* ``NAME.state.pt``: optimiser, scheduler, step, epoch and RNG states for ``--resume``, read with
  ``torch.load(weights_only=True)``.

Each file is written to a temporary name in the same folder and renamed, so a crash never leaves a
half-written checkpoint under the final name.
"""
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with_suppressed_unlink(tmp_name)
        raise


def with_suppressed_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_weights(
        path: Union[str, Path],
        state_dict: Dict[str, torch.Tensor],
        model_name: str,
        model_cfg: Dict[str, Any],
        args: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write weights and the config that rebuilds them to a ``.safetensors`` file, atomically."""
    path = Path(path)
    # safetensors refuses tensors that share memory; clone each one into its own storage.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    metadata = {
        "format": "pt",
        "model_name": model_name,
        "model_cfg": json.dumps(model_cfg, sort_keys=True),
        "args": json.dumps(args or {}, sort_keys=True, default=str),
    }
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def save_training_state(path: Union[str, Path], state: Dict[str, Any]) -> Path:
    """Write a resumable training state with ``torch.save``, atomically."""
    path = Path(path)
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_training_state(path: Union[str, Path]) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_metadata(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """Return ``model_name``, ``model_cfg`` and ``args`` of a checkpoint written by this package.

    Returns None for files without that metadata (other open_clip checkpoints) or that cannot be read.
    """
    path = Path(path)
    if path.suffix != WEIGHTS_SUFFIX:
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # a truncated or foreign file: no metadata to report
        _logger.debug("cannot read safetensors metadata of %s: %s", path, error)
        return None
    if "model_name" not in metadata:
        return None
    return {
        "model_name": metadata["model_name"],
        "model_cfg": json.loads(metadata.get("model_cfg", "null")),
        "args": json.loads(metadata.get("args", "{}")),
    }
