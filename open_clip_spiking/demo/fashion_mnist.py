"""Fashion-MNIST (MIT licence) as WebDataset shards in the layout that ``clip_benchmark`` reads.

The four idx files (``train-images-idx3-ubyte.gz`` and the rest) come from the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) when it is installed, from another
folder given by the caller, or from torchvision's download. They are written once to a dataset folder:

    fashion_mnist/
        train/0.tar ... train/29.tar, train/nshards.txt    60,000 samples
        test/0.tar ... test/4.tar, test/nshards.txt         10,000 samples
        classnames.txt
        zeroshot_classification_templates.txt
        fashion_mnist.json                                  source files and their SHA-256

Each sample has ``png`` (the 28x28 grayscale image), ``cls`` (the label, 0 to 9) and ``txt`` (a
caption built from the class name). Keys are ``sNNNNNNN`` in the order of the idx files.
"""
import gzip
import io
import json
import logging
import os
import shutil
import struct
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..provenance import sha256

_logger = logging.getLogger(__name__)

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASET_NAME = "fashion_mnist"
SPLITS = ("train", "test")
# Image and label file of each split, as Zalando publishes them and the Debian package installs them.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SAMPLES_PER_SHARD = 2000
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
MANIFEST_FILE = "fashion_mnist.json"

# Labels 0 to 9 in Zalando's order. Zalando names label 0 "T-shirt/top", and a slash reads badly in a prompt.
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
              "ankle boot"]
TEMPLATES = [
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a grayscale photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a photo of the {c}.",
    "a product photo of a {c}.",
    "a picture of a {c}.",
    "a close-up photo of a {c}.",
]
CAPTION = "a black and white product photo of a {c}."

# idx magic numbers: two zero bytes, the type code 0x08 (unsigned byte) and the number of dimensions.
_IDX_UBYTE = 0x08


class DatasetUnavailableError(RuntimeError):
    """Fashion-MNIST could be neither found on disk nor downloaded."""


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzip-compressed when the name ends in ``.gz``) into an array.

    Raises ValueError naming the file when the header is not that of an unsigned-byte idx file or the
    data is shorter than the header gives.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable idx file: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()}); "
                         f"expected the Fashion-MNIST files {', '.join(name for pair in IDX_FILES.values() for name in pair)}")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = int(np.prod(shape))
    if len(data) - header_size != expected:
        raise ValueError(f"{path} contains {len(data) - header_size} data bytes but its header gives shape {shape} "
                         f"({expected} bytes); the file is truncated or corrupt, so fetch it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_split(folder: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Return the images ``[N, 28, 28]`` and labels ``[N]`` of a split from the idx files in ``folder``."""
    image_file, label_file = (folder / name for name in IDX_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{image_file} must contain [N, H, W] images and {label_file} [N] labels, got shapes "
                         f"{images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{image_file} contains {len(images)} images but {label_file} {len(labels)} labels; "
                         f"use the image and label files of the same split")
    if len(labels) and int(labels.max()) >= len(CLASSNAMES):
        raise ValueError(f"{label_file} contains label {int(labels.max())}; Fashion-MNIST labels run from 0 to "
                         f"{len(CLASSNAMES) - 1}")
    return images, labels


def _has_idx_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in IDX_FILES.values() for name in pair)


def _torchvision_download(folder: Path) -> Path:
    """Download the idx files with torchvision into ``folder`` and return the folder that contains them."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(folder), train=train, download=True)
    return folder / "FashionMNIST" / "raw"


def locate_idx_files(source_dir: Optional[Path], download_dir: Path, allow_download: bool) -> Path:
    """Return the folder that contains the four Fashion-MNIST idx files.

    Looks in ``source_dir`` when given, and then only there. Otherwise it looks in the Debian package's
    folder, then in ``download_dir``, where an earlier torchvision download puts them, and finally
    downloads them there with torchvision when ``allow_download`` is set. Raises
    DatasetUnavailableError, naming every way to get the data, when none of these works.
    """
    if source_dir is not None:
        if _has_idx_files(source_dir):
            return source_dir
        if source_dir.is_dir():
            missing = [name for pair in IDX_FILES.values() for name in pair if not (source_dir / name).is_file()]
            problem = f"--fashion-mnist-dir {source_dir} lacks {', '.join(missing)}"
        else:
            problem = f"--fashion-mnist-dir {source_dir} not found"
        raise DatasetUnavailableError(f"Fashion-MNIST is not available: {problem}. {_ways_to_get_it()}")

    if _has_idx_files(DEBIAN_DIR):
        return DEBIAN_DIR
    downloaded = download_dir / "FashionMNIST" / "raw"
    if _has_idx_files(downloaded):
        return downloaded
    problem = f"{DEBIAN_DIR} not found"
    if allow_download:
        _logger.info("%s; downloading Fashion-MNIST with torchvision into %s", problem, download_dir)
        try:
            return _torchvision_download(download_dir)
        except (OSError, RuntimeError, ValueError, ImportError) as error:
            problem += f", and torchvision's download failed ({type(error).__name__}: {error})"
    else:
        problem += ", and the download is switched off (--no-download)"
    raise DatasetUnavailableError(f"Fashion-MNIST is not available: {problem}. {_ways_to_get_it()}")


def _ways_to_get_it() -> str:
    return (f"Get it in one of four ways: install the Debian package (apt-get install {DEBIAN_PACKAGE}, which "
            f"puts the idx files in {DEBIAN_DIR}); let torchvision download it (needs internet access, and no "
            f"--no-download); pass --fashion-mnist-dir with a folder of the four idx files "
            f"({', '.join(name for pair in IDX_FILES.values() for name in pair)}); or pass --data-dir with a folder "
            f"of ready WebDataset shards in the clip_benchmark layout (train/ and test/ shards, {CLASSNAMES_FILE}, "
            f"{TEMPLATES_FILE})")


def _source_manifest(idx_dir: Path) -> Dict[str, str]:
    return {name: sha256(idx_dir / name) for pair in IDX_FILES.values() for name in pair}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def write_split(images: np.ndarray, labels: np.ndarray, folder: Path, description: str,
                samples_per_shard: int = SAMPLES_PER_SHARD) -> int:
    """Write one split as ``0.tar``, ``1.tar``, ... and ``nshards.txt`` and return the number of shards."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-len(labels) // samples_per_shard))
    with tqdm(total=len(labels), desc=description, unit="img", dynamic_ncols=True) as progress:
        for shard in range(num_shards):
            start = shard * samples_per_shard
            end = min(start + samples_per_shard, len(labels))
            # USTAR: the PAX format of Python's default adds an extended header to every member.
            with tarfile.open(folder / f"{shard}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
                for index in range(start, end):
                    key = f"s{index:07d}"
                    label = int(labels[index])
                    _add_member(archive, f"{key}.png", _png(images[index]))
                    _add_member(archive, f"{key}.cls", str(label).encode("utf-8"))
                    _add_member(archive, f"{key}.txt", CAPTION.format(c=CLASSNAMES[label]).encode("utf-8"))
            progress.update(end - start)
    (folder / "nshards.txt").write_text(f"{num_shards}\n", encoding="utf-8")
    return num_shards


def read_manifest(dataset_dir: Path) -> Optional[Dict]:
    """Return the manifest that ``prepare_dataset`` wrote into ``dataset_dir``, or None when it has none."""
    try:
        return json.loads((dataset_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_dataset(cache_dir: Path, source_dir: Optional[Path] = None, allow_download: bool = True) -> Path:
    """Return the Fashion-MNIST dataset folder under ``cache_dir``, writing its shards first when needed.

    An existing folder is reused when its manifest names the same idx files (by SHA-256), or when the
    idx files are nowhere to be found. The folder is written under a temporary name and renamed when
    complete, so an interrupted run never leaves half a dataset behind.
    """
    dataset_dir = cache_dir / DATASET_NAME
    manifest = read_manifest(dataset_dir)
    try:
        idx_dir = locate_idx_files(source_dir, cache_dir / "torchvision", allow_download)
    except DatasetUnavailableError:
        if manifest is not None:
            _logger.info("reusing the Fashion-MNIST shards in %s; their idx files are no longer found", dataset_dir)
            return dataset_dir
        raise
    sources = _source_manifest(idx_dir)
    if manifest is not None and manifest.get("sha256") == sources:
        _logger.info("reusing the Fashion-MNIST shards in %s, written from %s", dataset_dir, manifest.get("source"))
        return dataset_dir

    _logger.info("writing Fashion-MNIST from %s to WebDataset shards in %s", idx_dir, dataset_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DATASET_NAME}-", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp creates the folder readable by its owner only
    try:
        counts = {}
        for split in SPLITS:
            images, labels = load_split(idx_dir, split)
            write_split(images, labels, staging / split, f"writing {split} shards")
            counts[split] = len(labels)
        write_class_files(staging)
        record = {"source": str(idx_dir), "sha256": sources, "samples": counts,
                  "samples_per_shard": SAMPLES_PER_SHARD}
        (staging / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if dataset_dir.exists():
            shutil.rmtree(dataset_dir)
        os.replace(staging, dataset_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return dataset_dir


def write_class_files(folder: Path, classnames: List[str] = CLASSNAMES, templates: List[str] = TEMPLATES) -> None:
    """Write ``classnames.txt`` and ``zeroshot_classification_templates.txt``, one entry a line."""
    (folder / CLASSNAMES_FILE).write_text("\n".join(classnames) + "\n", encoding="utf-8")
    (folder / TEMPLATES_FILE).write_text("\n".join(templates) + "\n", encoding="utf-8")


def main(argv: Optional[List[str]] = None) -> int:
    """Write the Fashion-MNIST shards from the command line, as the demo's data stage does."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m open_clip_spiking.demo.fashion_mnist",
        description="Write Fashion-MNIST to WebDataset shards in the clip_benchmark layout, in CACHE_DIR/"
                    f"{DATASET_NAME}, unless shards written from the same idx files are there already.",
    )
    parser.add_argument("--cache-dir", type=Path, required=True, help=f"folder that receives {DATASET_NAME}/")
    parser.add_argument("--source-dir", type=Path, default=None,
                        help=f"folder with the four idx files (default: {DEBIAN_DIR}, else torchvision's download)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading with torchvision")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        folder = prepare_dataset(args.cache_dir, args.source_dir, allow_download=not args.no_download)
    except (DatasetUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
