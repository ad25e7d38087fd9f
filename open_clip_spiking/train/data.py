"""WebDataset input for the trainers.

Shards follow the usual CLIP layout: one sample a key, an image under ``jpg``, ``jpeg``, ``png`` or
``webp``, an optional caption under ``txt`` (one or more lines) and an optional class index under
``cls``. Keys follow webdataset's convention: a member ``dir/abc.jpg`` belongs to the sample
``dir/abc`` and fills its field ``jpg``, and the members of one sample are consecutive.

Shards are split over the "global workers" of a run. Data-loader worker ``w`` of rank ``r`` is
global worker ``g = r * workers + w`` and reads the shards ``urls[g::world_size * workers]``. So the
stream of each global worker is the same for any split of the same total into ranks and workers.
A training stream starts over on its own shards when they run out, so every rank can produce the
same number of batches. With ``resampled=True`` each global worker draws shards with replacement
instead, as open_clip_train's ``--dataset-resampled`` does.

Everything random is a deterministic function of the seed and the epoch. That covers the shard
order, the sample shuffle of each global worker and, for each sample, the random choices of the
decoder (which caption line, which prompt template). Those choices are seeded from the seed, the
epoch, the pass over the data, the shard file name and the sample key. ``skip_batches`` relies on
this to resume inside an epoch: the samples of batches already trained on are read but not decoded.

A sample that cannot be used (no image, an image that does not decode, an empty or overlong caption,
a shard cut short) is not fatal. It reaches the collate function as a bad-sample record, and the
collate function drops it and reports its shard and key. The trainer counts these reports and
aborts when their share grows too large.
"""
import glob
import hashlib
import io
import logging
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import braceexpand
import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# PIL modes of 16-bit grayscale images (16-bit PNGs open as one of these). PIL's convert("RGB")
# clips their values at 255 instead of scaling them, which turns most pixels white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Tar members are padded to blocks of this many bytes.
_TAR_BLOCK = 512


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


def check_shard_count(num_shards: int, world_size: int, workers: int, option: str = "--train-data") -> None:
    """Raise ValueError when some data-loader worker of some rank would get no shard to read.

    Each worker reads whole shards, so ``world_size * max(1, workers)`` shards are the minimum. With
    fewer, the ranks would produce different numbers of batches, and a DDP run would hang.
    """
    readers = world_size * max(1, workers)
    if num_shards >= readers:
        return
    hints = ["pass more shards"]
    if num_shards >= world_size:
        hints.append(f"lower --workers to {num_shards // world_size}")
    hints.append("add --dataset-resampled to sample shards with replacement")
    raise ValueError(
        f"{option} has {num_shards} shard{'s' if num_shards != 1 else ''}, but {world_size} rank(s) x "
        f"{max(1, workers)} data-loader worker(s) need at least {readers}, because every worker reads whole "
        f"shards; {', '.join(hints[:-1])} or {hints[-1]}"
    )


def _split_member_name(name: str) -> Optional[Tuple[str, str]]:
    """Sample key and field of a tar member name (``dir/abc.x.jpg`` -> ``dir/abc``, ``x.jpg``)."""
    directory, base = os.path.split(name)
    if base.startswith(".") or "." not in base or "__MACOSX" in directory:
        return None
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension


def _bad_record(url: str, key: str, reason: str) -> Dict:
    return {"bad": reason, "__key__": key, "__url__": url}


def iter_shard(url: str) -> Iterator[Dict]:
    """Yield the samples of one local tar shard as dicts of raw field bytes plus ``__key__`` and ``__url__``.

    A shard that cannot be read to its end yields one bad-sample record, named after the sample being
    read, in place of its remaining samples. A shard without any sample yields one record too.
    """
    key, fields = None, {}
    yielded = 0
    try:
        with open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = _split_member_name(member.name)
                if parts is None:
                    continue
                member_key, extension = parts
                if member_key != key:
                    if fields:
                        yielded += 1
                        yield {**fields, "__key__": key, "__url__": url}
                    key, fields = member_key, {}
                data = archive.extractfile(member).read()
                if extension in fields:
                    fields["__duplicate__"] = extension
                fields[extension] = data
            end_offset = archive.offset
        # Python's tarfile stops quietly when a file ends at a block boundary without the two zero
        # blocks that close every tar archive, so their absence is checked here.
        size = os.path.getsize(url)
        if size % _TAR_BLOCK or end_offset >= size:
            raise tarfile.ReadError(f"the archive ends at byte {size} without its end-of-archive blocks")
    except (tarfile.TarError, OSError, EOFError) as error:
        where = f"sample {key}" if key is not None else "its first sample"
        _logger.warning("shard %s is truncated or corrupt at %s: %s", url, where, error)
        yield _bad_record(url, key or "-", f"shard is truncated or corrupt at this sample, and its remaining "
                                           f"samples are lost: {type(error).__name__}: {error}")
        return
    if fields:
        yielded += 1
        yield {**fields, "__key__": key, "__url__": url}
    if yielded == 0:
        yield _bad_record(url, "-", "shard contains no samples")


def count_samples(urls: Sequence[str]) -> int:
    """Count the samples (distinct keys) in local tar shards by reading their headers only.

    A shard that ends early counts the samples before the damage, with a warning. A file that is not
    a tar archive at all raises ValueError.
    """
    total = 0
    for url in urls:
        keys = set()
        try:
            with tarfile.open(url) as archive:
                for member in archive:
                    parts = _split_member_name(member.name) if member.isfile() else None
                    if parts is not None:
                        keys.add(parts[0])
        except (tarfile.TarError, OSError) as error:
            if not keys:
                raise ValueError(f"shard {url} is not a readable tar file: {error}") from error
            _logger.warning("shard %s is truncated or corrupt after %d samples: %s", url, len(keys), error)
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB.

    16-bit grayscale is scaled to 8 bits (``value / 257``), where PIL's own conversion would clip it.
    Every other mode (grayscale, palette, CMYK, with or without alpha, 16-bit RGB, which PIL loads as
    8-bit) goes through ``convert("RGB")``, as open_clip's preprocessing does.
    """
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.getextrema()[1] > 255):
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; a truncated or unreadable image raises (PIL's OSError, for one)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


# Area share and aspect ratio range of the --augment crop.
AUGMENT_SCALE = (0.5, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)


def random_crop_flip(image: Image.Image, rng) -> Image.Image:
    """Crop a random box of ``AUGMENT_SCALE`` of the area and ``AUGMENT_RATIO`` aspect, and flip it
    horizontally with probability 1/2; the choices come from ``rng`` only.

    The crop keeps its size: each model's own preprocessing resizes it afterwards, so a student and a
    teacher of different input sizes see the same part of the image.
    """
    width, height = image.size
    area = width * height
    box = (0, 0, width, height)
    for _ in range(10):
        target = area * rng.uniform(*AUGMENT_SCALE)
        ratio = math.exp(rng.uniform(math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1])))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            break
    image = image.crop(box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def sample_id(url: str, key: str) -> str:
    """Identifier of a sample across runs: the absolute shard path and the ``__key__``."""
    return f"{os.path.abspath(url)}::{key}"


@dataclass
class SampleDecoder:
    """Turn a raw webdataset sample into the fields the trainers use, or a bad-sample record.

    ``read_text`` turns caption and prompt handling on. With it, a ``txt`` field without any text, or
    with a line longer than ``max_caption_chars`` characters, makes the sample bad. ``augment`` applies
    ``random_crop_flip`` before every image transform, with the sample's own random generator.
    ``skip`` names an image transform and the ``sample_id`` values for which it is not run (the align
    stage's cached teacher embeddings need no teacher input).
    """

    image_transforms: Dict[str, Callable]
    classnames: Optional[List[str]] = None
    templates: Optional[List[str]] = None
    require_label: bool = False
    read_text: bool = True
    max_caption_chars: Optional[int] = None
    augment: bool = False
    skip: Optional[Tuple[str, AbstractSet[str]]] = None

    def __call__(self, sample: Dict, rng: Optional[random.Random] = None) -> Dict:
        """Decode ``sample``; ``rng`` makes the caption and template choices (the ``random`` module when None)."""
        key = sample.get("__key__", "?")
        url = sample.get("__url__", "?")
        try:
            return self._decode(sample, key, url, rng or random)
        except Exception as error:  # any undecodable field makes one bad sample, never a crash
            return _bad_record(url, key, f"{type(error).__name__}: {error}")

    def _decode(self, sample: Dict, key: str, url: str, rng) -> Dict:
        if "__duplicate__" in sample:
            return _bad_record(url, key, f"field {sample['__duplicate__']!r} appears twice in the shard")
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            return _bad_record(
                url, key, f"no image (expected one of {', '.join(IMAGE_KEYS)}; found {', '.join(fields) or 'nothing'})"
            )
        image = decode_image(sample[image_key])
        out = {"__key__": key, "__url__": url}
        if "cls" in sample:
            label = int(sample["cls"].decode("utf-8").strip())
            if self.classnames is not None and not 0 <= label < len(self.classnames):
                return _bad_record(
                    url, key, f"label {label} is outside the {len(self.classnames)} class names; the class names "
                              f"file misses names or belongs to another dataset",
                )
            out["label"] = label
        elif self.require_label:
            return _bad_record(url, key, "no label ('cls' field)")
        if self.read_text:
            captions = self._captions(sample)
            if isinstance(captions, str):
                return _bad_record(url, key, captions)
            out["text"] = self._text(captions, out.get("label"), rng)
        if self.augment:
            image = random_crop_flip(image, rng)
        skipped = self.skip[0] if self.skip and sample_id(url, key) in self.skip[1] else None
        for name, transform in self.image_transforms.items():
            if name != skipped:
                out[name] = transform(image)
        return out

    def _captions(self, sample: Dict) -> Union[List[str], str]:
        """Caption lines of the ``txt`` field, or the reason the field is unusable."""
        if "txt" not in sample:
            return []
        captions = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
        if not captions:
            return "empty caption ('txt' field without text)"
        longest = max(len(line) for line in captions)
        if self.max_caption_chars and longest > self.max_caption_chars:
            return (f"caption of {longest} characters is longer than --max-caption-chars "
                    f"{self.max_caption_chars}")
        return captions

    def _text(self, captions: List[str], label: Optional[int], rng) -> Optional[str]:
        if captions:
            return rng.choice(captions)
        if label is not None and self.classnames and self.templates:
            return rng.choice(self.templates).format(c=self.classnames[label])
        return None


@dataclass
class Collate:
    """Stack good samples, tokenize their texts and list the bad ones.

    ``tokenizers`` maps a batch field name to an open_clip tokenizer. Each tokenizer receives the texts
    of the samples that have one, and ``text_index`` gives those samples' positions in the batch.
    Samples skipped on resume count in ``skipped`` only. ``texts`` lists the raw texts in the order of
    ``text_index``. When some samples lack an image field, ``NAME_index`` gives the positions of the
    rows of ``NAME``.
    """

    image_fields: Tuple[str, ...]
    tokenizers: Dict[str, Callable] = field(default_factory=dict)

    def __call__(self, samples: List[Dict]) -> Dict:
        skipped = sum(1 for s in samples if "skipped" in s)
        samples = [s for s in samples if "skipped" not in s]
        good = [s for s in samples if "bad" not in s]
        batch: Dict = {
            "bad": [(s["__url__"], s["__key__"], s["bad"]) for s in samples if "bad" in s],
            "keys": [(s["__url__"], s["__key__"]) for s in good],
            "size": len(good),
            "skipped": skipped,
        }
        if not good:
            return batch
        for name in self.image_fields:
            present = [i for i, s in enumerate(good) if name in s]
            if present:
                batch[name] = torch.stack([good[i][name] for i in present])
            if len(present) < len(good):
                batch[f"{name}_index"] = torch.tensor(present, dtype=torch.long)
        if all("label" in s for s in good):
            batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
        text_index = [i for i, s in enumerate(good) if s.get("text")]
        batch["text_index"] = torch.tensor(text_index, dtype=torch.long)
        batch["texts"] = [good[i]["text"] for i in text_index]
        if text_index and self.tokenizers:
            texts = batch["texts"]
            for name, tokenizer in self.tokenizers.items():
                batch[name] = tokenizer(texts)
        return batch


def read_captions(urls: Sequence[str]) -> List[str]:
    """Return every caption line of the ``txt`` fields in the shards, in shard order.

    Unreadable shard data is logged and skipped.
    """
    captions: List[str] = []
    for url in urls:
        for sample in iter_shard(url):
            if "txt" in sample:
                captions.extend(line.strip() for line in sample["txt"].decode("utf-8", "replace").splitlines()
                                if line.strip())
    return captions


def copy_shard_head(source: str, target: str, count: int) -> int:
    """Write the first ``count`` samples of tar shard ``source`` to ``target`` unchanged; returns how many
    were written (fewer when the shard is shorter)."""
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    keys: List[str] = []
    with tarfile.open(source) as reader, tarfile.open(target, "w") as writer:
        for member in reader:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == count:
                    break
                keys.append(key)
            writer.addfile(member, reader.extractfile(member))
    return len(keys)


def stable_seed(*parts) -> int:
    """Return a 63-bit seed that depends on ``parts`` only (unlike ``hash``, it is the same in every process)."""
    digest = hashlib.blake2b("\x1f".join(str(part) for part in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _shuffled(samples: Iterator[Dict], size: int, rng: random.Random) -> Iterator[Dict]:
    """Shuffle a stream through a buffer of ``size`` samples: once full, each new sample takes the
    place of a random one, which is emitted."""
    buffer: List[Dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples of one epoch for one rank; see the module docstring for the order."""

    def __init__(
            self,
            urls: Sequence[str],
            decoder: Callable,
            *,
            shuffle: bool,
            seed: int,
            epoch: int,
            shuffle_buffer: int,
            repeat: bool,
            resampled: bool,
            rank: int,
            world_size: int,
            batch_size: int,
            skip_batches: int,
    ):
        super().__init__()
        self.urls = list(urls)
        self.decoder = decoder
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.resampled = resampled
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[Dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.rank * workers + worker
        readers = self.world_size * workers
        samples = self._raw_samples(reader, readers)
        if self.shuffle:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(stable_seed(self.seed, self.epoch,
                                                                                       "samples", reader)))
        # The DataLoader takes batches from its workers in turn, so the first skip_batches batches hold
        # the first batch_size * (batches of this worker among them) samples of this worker.
        # NOTE: skipped samples are still read from the tar files, only not decoded, so resuming late
        # in a long epoch costs one pass of reading over the part already trained on.
        skip = len(range(worker, self.skip_batches, workers)) * self.batch_size
        for index, sample in enumerate(samples):
            if index < skip:
                yield {"skipped": True}
            elif "bad" in sample:
                yield sample
            else:
                yield self._decode(sample)

    def _decode(self, sample: Dict) -> Dict:
        shard = os.path.basename(sample["__url__"])
        rng = random.Random(stable_seed(self.seed, self.epoch, sample.pop("__pass__", 0), shard, sample["__key__"]))
        return self.decoder(sample, rng)

    def _raw_samples(self, reader: int, readers: int) -> Iterator[Dict]:
        for url, pass_index in self._shard_sequence(reader, readers):
            for sample in iter_shard(url):
                sample["__pass__"] = pass_index
                yield sample

    def _shard_sequence(self, reader: int, readers: int) -> Iterator[Tuple[str, int]]:
        """Shards of one global worker with the number of the pass over them."""
        if self.resampled:
            rng = random.Random(stable_seed(self.seed, self.epoch, "resampled", reader))
            draw = 0
            while True:
                yield rng.choice(self.urls), draw
                draw += 1
        order = list(self.urls)
        if self.shuffle:
            random.Random(stable_seed(self.seed, self.epoch, "shards")).shuffle(order)
        mine = order[reader::readers]
        pass_index = 0
        while mine:
            for url in mine:
                yield url, pass_index
            if not self.repeat:
                return
            pass_index += 1
            if self.shuffle:
                random.Random(stable_seed(self.seed, self.epoch, "pass", reader, pass_index)).shuffle(mine)


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
        *,
        repeat: bool = False,
        resampled: bool = False,
        skip_batches: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
) -> torch.utils.data.DataLoader:
    """Build a DataLoader over webdataset shards for one epoch.

    ``repeat`` starts each worker over on its shards when they run out, and ``resampled`` draws shards
    with replacement. Both make the loader endless, so the caller decides how many batches to take.
    ``skip_batches`` replaces the samples of the first batches by placeholders that are not decoded
    (their batches have ``size`` 0). ``rank`` and ``world_size`` default to the process group's.
    """
    if rank is None or world_size is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        world_size = torch.distributed.get_world_size() if distributed else 1
    dataset = ShardStream(
        urls, decoder, shuffle=shuffle, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, repeat=repeat,
        resampled=resampled, rank=rank, world_size=world_size, batch_size=batch_size, skip_batches=skip_batches,
    )
    # A generator of its own keeps the loader from drawing its base seed from the global torch RNG,
    # whose state a resumed run restores.
    generator = torch.Generator().manual_seed(stable_seed(seed, epoch, "loader", rank))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )
