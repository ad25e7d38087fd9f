"""Checkpoints that rebuild their model from the file alone, written atomically.

Two files per checkpoint, both loadable without unpickling arbitrary objects:

* ``NAME.safetensors`` (or ``NAME.pt``): the model weights with open_clip key names, plus
  ``model_name``, ``model_cfg`` and ``args``. In a safetensors file these are string metadata holding
  JSON; a ``.pt`` file is the dict ``{"state_dict": ..., "model_name": ..., "model_cfg": JSON,
  "args": JSON}`` that ``torch.load(weights_only=True)`` reads. ``open_clip.create_model(name,
  pretrained=PATH)`` loads either.
* ``NAME.state.pt``: everything ``--resume`` needs in one file (the weights again, optimiser,
  scheduler, step, epoch, data position and RNG states), read with ``torch.load(weights_only=True)``.
  Two files written one after the other could disagree after a crash between the writes, and one
  file cannot.

Each file is written to a temporary name in the same folder, flushed to disk and renamed, so a crash
never leaves a half-written checkpoint under the final name.
"""
import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_logger = logging.getLogger(__name__)

WEIGHTS_SUFFIXES = (".safetensors", ".pt")
STATE_SUFFIX = ".state.pt"


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_name)`` to fill a temporary file beside ``path``, flush it and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp creates the file as 0600; give it the mode a plain open() would, so the
        # checkpoint is as readable as any other file the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        write(tmp_name)
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    """Flush a folder's entries, so that a rename survives a power loss (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rotate(path: Union[str, Path], previous: Union[str, Path]) -> bool:
    """Rename ``path`` to ``previous``, replacing it, when ``path`` exists; returns whether it did."""
    path = Path(path)
    if not path.exists():
        return False
    os.replace(path, previous)
    _fsync_directory(path.parent)
    return True


def save_weights(
        path: Union[str, Path],
        state_dict: Dict[str, torch.Tensor],
        model_name: str,
        model_cfg: Dict[str, Any],
        args: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write weights and the config that rebuilds them, atomically; the suffix picks the format."""
    path = Path(path)
    if path.suffix not in WEIGHTS_SUFFIXES or path.name.endswith(STATE_SUFFIX):
        raise ValueError(f"checkpoint path {path} must end in .safetensors or .pt (but not {STATE_SUFFIX})")
    # safetensors refuses tensors that share memory; clone each one into its own storage.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    metadata = {
        "format": "pt",
        "model_name": model_name,
        "model_cfg": json.dumps(model_cfg, sort_keys=True),
        "args": json.dumps(args or {}, sort_keys=True, default=str),
    }
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        payload = {"state_dict": tensors, **{k: v for k, v in metadata.items() if k != "format"}}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def save_training_state(path: Union[str, Path], state: Dict[str, Any]) -> Path:
    """Write a resumable training state with ``torch.save``, atomically."""
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_training_state(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a training state; ``weights_only=True`` rejects anything but tensors and plain containers."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_metadata(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """Return ``model_name``, ``model_cfg`` and ``args`` of a checkpoint written by this package.

    Returns None for files without that metadata (other open_clip checkpoints) or that cannot be read.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        elif path.suffix == ".pt" and not path.name.endswith(STATE_SUFFIX):
            payload = torch.load(path, map_location="cpu", weights_only=True)
            metadata = {k: v for k, v in payload.items() if k != "state_dict"} if isinstance(payload, dict) else {}
        else:
            return None
    except Exception as error:  # a truncated or foreign file: no metadata to report
        _logger.debug("cannot read checkpoint metadata of %s: %s", path, error)
        return None
    if "model_name" not in metadata:
        return None
    return {
        "model_name": metadata["model_name"],
        "model_cfg": json.loads(metadata.get("model_cfg", "null")),
        "args": json.loads(metadata.get("args", "{}")),
    }


def load_weights(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read the state dict of a ``.safetensors`` or ``.pt`` checkpoint written by ``save_weights``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload["state_dict"] if isinstance(payload, dict) and "state_dict" in payload else payload
