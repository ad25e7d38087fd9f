"""WebDataset input for the trainers.

Shards follow the usual CLIP layout: one sample a key, an image under ``jpg``, ``jpeg``, ``png`` or
``webp``, an optional caption under ``txt`` (one or more lines) and an optional class index under
``cls``. Shards are split by node and by data-loader worker, as open_clip_train does.

A sample that cannot be used (no image, an image that does not decode) is not fatal. It reaches the
collate function marked as bad, and the collate function drops it and reports its shard and key.
The trainer counts these reports and aborts when their share grows too large.
"""
import glob
import io
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import braceexpand
import torch
import webdataset as wds
from PIL import Image

_logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def natural_sort_key(path: str) -> List[Union[int, str]]:
    """Sort key that orders numbered shards by number (``2.tar`` before ``10.tar``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def expand_urls(spec: Union[str, Sequence[str]]) -> List[str]:
    """Expand shard specs into a list of existing local ``.tar`` files.

    Accepts brace patterns (``data/{0..9}.tar``), ``::``-separated lists as open_clip_train does,
    shell globs, folders (every ``.tar`` inside), or a list of any of these.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs or not any(str(s).strip() for s in specs):
        raise ValueError("no training shards given: pass --train-data with a brace pattern such as 'data/{0..9}.tar'")
    urls: List[str] = []
    for item in specs:
        for part in str(item).split("::"):
            part = part.strip()
            if not part:
                continue
            for expanded in braceexpand.braceexpand(part):
                if os.path.isdir(expanded):
                    found = sorted(glob.glob(os.path.join(expanded, "*.tar")), key=natural_sort_key)
                    if not found:
                        raise FileNotFoundError(f"folder {expanded!r} contains no .tar shards")
                    urls.extend(found)
                elif any(ch in expanded for ch in "*?["):
                    found = sorted(glob.glob(expanded), key=natural_sort_key)
                    if not found:
                        raise FileNotFoundError(f"shard pattern {expanded!r} matches no files")
                    urls.extend(found)
                else:
                    urls.append(expanded)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no files")
    missing = [url for url in urls if not os.path.isfile(url)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        noun = "shard" if len(missing) == 1 else "shards"
        raise FileNotFoundError(f"{noun} not found: {shown} (from {spec!r}); check the path and brace pattern")
    return urls


def count_samples(urls: Sequence[str]) -> int:
    """Count the samples (distinct keys) in local tar shards by reading their headers only."""
    total = 0
    for url in urls:
        keys = set()
        try:
            with tarfile.open(url) as archive:
                for member in archive:
                    if member.isfile():
                        keys.add(member.name.split(".", 1)[0])
        except (tarfile.TarError, OSError) as error:
            raise ValueError(f"shard {url} is not a readable tar file: {error}") from error
        total += len(keys)
    return total


def read_lines(path: str, what: str) -> List[str]:
    """Read non-empty, stripped lines of a text file; ``what`` names the file in errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def load_classnames(path: str) -> List[str]:
    """Read class names, one a line, in label order.

    A blank line between names is rejected, since skipping it would shift every later label; so are
    duplicates, since they make labels ambiguous. Blank lines at the end are ignored.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class names file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"class names file {path} is empty")
    blank = [number for number, line in enumerate(lines, start=1) if not line]
    if blank:
        raise ValueError(
            f"class names file {path} has no name on line {blank[0]} (label {blank[0] - 1}); write one name a "
            f"line in label order, with no blank lines"
        )
    seen = set()
    duplicates = sorted({name for name in lines if name in seen or seen.add(name)})
    if duplicates:
        raise ValueError(f"class names file {path} lists {duplicates} more than once; each class needs one name")
    return lines


def load_templates(path: str) -> List[str]:
    """Read prompt templates, one a line, each with a ``{c}`` placeholder for the class name."""
    templates = read_lines(path, "templates")
    invalid = [t for t in templates if "{c}" not in t]
    if invalid:
        raise ValueError(f"templates in {path} lack the '{{c}}' placeholder: {invalid[:3]}")
    return templates


@dataclass
class SampleDecoder:
    """Turn a raw webdataset sample into the fields the trainers use, or a bad-sample record."""

    image_transforms: Dict[str, Callable]
    classnames: Optional[List[str]] = None
    templates: Optional[List[str]] = None
    require_label: bool = False

    def __call__(self, sample: Dict) -> Dict:
        key = sample.get("__key__", "?")
        url = sample.get("__url__", "?")
        try:
            return self._decode(sample, key, url)
        except Exception as error:  # any undecodable field makes one bad sample, never a crash
            return {"bad": f"{type(error).__name__}: {error}", "__key__": key, "__url__": url}

    def _decode(self, sample: Dict, key: str, url: str) -> Dict:
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            return {
                "bad": f"no image (expected one of {', '.join(IMAGE_KEYS)}; found {', '.join(fields) or 'nothing'})",
                "__key__": key,
                "__url__": url,
            }
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image.load()
            image = image.convert("RGB")
        out = {"__key__": key, "__url__": url}
        for name, transform in self.image_transforms.items():
            out[name] = transform(image)
        if "cls" in sample:
            label = int(sample["cls"].decode("utf-8").strip())
            if self.classnames is not None and not 0 <= label < len(self.classnames):
                return {
                    "bad": f"label {label} is outside the {len(self.classnames)} class names; the class names "
                           f"file misses names or belongs to another dataset",
                    "__key__": key,
                    "__url__": url,
                }
            out["label"] = label
        elif self.require_label:
            return {"bad": "no label ('cls' field)", "__key__": key, "__url__": url}
        out["text"] = self._text(sample, out.get("label"))
        return out

    def _text(self, sample: Dict, label: Optional[int]) -> Optional[str]:
        if "txt" in sample:
            captions = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
            if captions:
                return random.choice(captions)
        if label is not None and self.classnames and self.templates:
            return random.choice(self.templates).format(c=self.classnames[label])
        return None


@dataclass
class Collate:
    """Stack good samples, tokenize their texts and list the bad ones.

    ``tokenizers`` maps a batch field name to an open_clip tokenizer. Each tokenizer receives the texts
    of the samples that have one, and ``text_index`` gives those samples' positions in the batch.
    """

    image_fields: Tuple[str, ...]
    tokenizers: Dict[str, Callable] = field(default_factory=dict)

    def __call__(self, samples: List[Dict]) -> Dict:
        good = [s for s in samples if "bad" not in s]
        batch: Dict = {
            "bad": [(s["__url__"], s["__key__"], s["bad"]) for s in samples if "bad" in s],
            "keys": [(s["__url__"], s["__key__"]) for s in good],
            "size": len(good),
        }
        if not good:
            return batch
        for name in self.image_fields:
            batch[name] = torch.stack([s[name] for s in good])
        if all("label" in s for s in good):
            batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
        text_index = [i for i, s in enumerate(good) if s.get("text")]
        batch["text_index"] = torch.tensor(text_index, dtype=torch.long)
        if text_index and self.tokenizers:
            texts = [good[i]["text"] for i in text_index]
            for name, tokenizer in self.tokenizers.items():
                batch[name] = tokenizer(texts)
        return batch


def read_captions(urls: Sequence[str]) -> List[str]:
    """Return every caption line of the ``txt`` fields in the shards, in shard order."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples(handler=_log_and_continue))
    captions: List[str] = []
    for sample in pipeline:
        if "txt" in sample:
            captions.extend(line.strip() for line in sample["txt"].decode("utf-8", "replace").splitlines()
                            if line.strip())
    return captions


def _log_and_continue(error: Exception) -> bool:
    # Shard-level read errors (a truncated tar, say) lose the rest of that shard, not the run.
    _logger.warning("skipping unreadable shard data: %s", error)
    return True


def build_loader(
        urls: Sequence[str],
        decoder: SampleDecoder,
        collate: Collate,
        batch_size: int,
        workers: int,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        shuffle_buffer: int = 1000,
) -> torch.utils.data.DataLoader:
    """Build a DataLoader over webdataset shards for one epoch; shuffling depends on seed and epoch."""
    stages = [wds.SimpleShardList(list(urls))]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed, epoch=epoch - 1))
    stages += [
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_log_and_continue),
    ]
    if shuffle:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed + epoch)))
    stages.append(wds.map(decoder))
    pipeline = wds.DataPipeline(*stages)
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
