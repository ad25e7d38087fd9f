"""On-disk cache of a frozen teacher's embeddings for the align stages (``--teacher-cache DIR``).

A frozen teacher gives the same embedding for the same input in every epoch, so the align stages
compute it once and read it afterwards. Image embeddings are keyed by the sample (absolute shard path
and ``__key__``), text embeddings by the text itself.

Layout of ``DIR``:

* ``cache.json``: format version and the teacher's identity (config name, pretrained weights file
  with its size and modification time or the pretrained tag, image preprocessing, precision). A run
  with another teacher refuses the folder instead of reading stale embeddings;
* ``images-*.safetensors`` and ``texts-*.safetensors``: chunks of float32 embeddings, one row per key,
  the keys in the file's metadata. Each rank writes its own chunks, atomically, at every checkpoint,
  so an interrupted run keeps what it computed and no two processes write the same file.

Every rank reads every chunk when the run starts and again after each epoch, so under DDP a rank
also finds the embeddings that other ranks computed.
"""
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_write

_logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
META_FILE = "cache.json"
_KINDS = ("images", "texts")


def teacher_identity(teacher: str, teacher_pretrained: Optional[str], preprocess, precision: str) -> Dict:
    """What the cached embeddings depend on, in a form that compares equal across runs."""
    if teacher_pretrained and os.path.isfile(teacher_pretrained):
        stat = os.stat(teacher_pretrained)
        pretrained = {"file": os.path.abspath(teacher_pretrained), "bytes": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns}
    else:
        pretrained = {"tag": teacher_pretrained}
    return {"format": CACHE_FORMAT, "teacher": teacher, "pretrained": pretrained,
            "preprocess": str(preprocess) if preprocess is not None else None, "precision": precision}


class TeacherCache:
    """Embeddings of one teacher, read from and written to ``folder``.

    ``image_embeddings`` and ``text_embeddings`` return the cached rows and the positions of the
    inputs that are not cached; ``add_images`` and ``add_texts`` store newly computed ones, which
    ``flush`` writes to disk.
    """

    def __init__(self, folder: str, identity: Dict, rank: int = 0, check_preprocess: bool = True):
        self.folder = Path(folder)
        self.rank = rank
        self.identity = identity
        self._rows: Dict[str, Dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
        self._pending: Dict[str, Dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
        self._loaded: Set[str] = set()
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / META_FILE
        if meta.is_file():
            self._check_identity(json.loads(meta.read_text(encoding="utf-8")), check_preprocess)
        elif rank == 0:
            text = json.dumps(identity, indent=2, sort_keys=True)
            atomic_write(meta, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.refresh()

    def _check_identity(self, saved: Dict, check_preprocess: bool) -> None:
        keys = [key for key in self.identity if key != "preprocess" or check_preprocess]
        changed = [key for key in keys if saved.get(key) != self.identity[key]]
        if changed:
            detail = "; ".join(f"{key}: cached {saved.get(key)!r}, now {self.identity[key]!r}" for key in changed)
            raise ValueError(
                f"--teacher-cache {self.folder} contains embeddings of another teacher setup ({detail}); pass "
                f"another --teacher-cache folder, or delete this one to rebuild it"
            )

    def refresh(self) -> int:
        """Read the chunk files that appeared since the last call; returns how many were read."""
        read = 0
        for kind in _KINDS:
            for path in sorted(self.folder.glob(f"{kind}-*.safetensors")):
                if path.name in self._loaded:
                    continue
                with safe_open(str(path), framework="pt") as handle:
                    keys = json.loads(handle.metadata()["keys"])
                    embeddings = handle.get_tensor("embeddings")
                if len(keys) != embeddings.shape[0]:
                    raise ValueError(f"teacher cache chunk {path} has {len(keys)} keys for {embeddings.shape[0]} "
                                     f"rows; delete the file, and it is recomputed")
                self._rows[kind].update(zip(keys, embeddings))
                self._loaded.add(path.name)
                read += 1
        return read

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def image_ids(self) -> Set[str]:
        return set(self._rows["images"])

    def _lookup(self, kind: str, keys: Sequence[str]) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        rows = self._rows[kind]
        found = [rows.get(key) for key in keys]
        return found, [i for i, row in enumerate(found) if row is None]

    def image_embeddings(self, ids: Sequence[str]) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        """Cached rows (None where missing) for sample ids from ``data.sample_id``, and the missing positions."""
        return self._lookup("images", ids)

    def text_embeddings(self, texts: Sequence[str]) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        return self._lookup("texts", texts)

    def _add(self, kind: str, keys: Iterable[str], embeddings: torch.Tensor) -> None:
        for key, row in zip(keys, embeddings.detach().float().cpu()):
            if key not in self._rows[kind]:
                self._rows[kind][key] = row
                self._pending[kind][key] = row

    def add_images(self, ids: Iterable[str], embeddings: torch.Tensor) -> None:
        self._add("images", ids, embeddings)

    def add_texts(self, texts: Iterable[str], embeddings: torch.Tensor) -> None:
        self._add("texts", texts, embeddings)

    def flush(self) -> int:
        """Write the embeddings added since the last flush; returns how many rows were written."""
        written = 0
        for kind in _KINDS:
            pending = self._pending[kind]
            if not pending:
                continue
            name = f"{kind}-r{self.rank}-{uuid.uuid4().hex[:12]}.safetensors"
            keys = list(pending)
            tensors = {"embeddings": torch.stack([pending[key] for key in keys]).contiguous()}
            metadata = {"keys": json.dumps(keys)}
            atomic_write(self.folder / name, lambda tmp: save_file(tensors, tmp, metadata=metadata))
            self._loaded.add(name)
            written += len(keys)
            pending.clear()
        if written:
            _logger.info("teacher cache %s: wrote %d embeddings (%d cached)", self.folder, written, len(self))
        return written
