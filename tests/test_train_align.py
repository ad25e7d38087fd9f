"""The align stage end to end on real shards, then clip_benchmark on its checkpoint."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch

from open_clip_spiking.train.__main__ import main


def _align_args(wds_root, teacher, output_dir, *extra):
    name, weights = teacher
    source = wds_root / "cifar10_jpeg"
    return [
        "--stage", "align",
        "--model", "spikeclip-vit-t",
        "--teacher", name,
        "--teacher-pretrained", str(weights),
        "--train-data", str(source / "train" / "{0..1}.tar"),
        "--classnames", str(source / "classnames.txt"),
        "--templates", str(source / "zeroshot_classification_templates.txt"),
        "--output-dir", str(output_dir),
        "--batch-size", "16",
        "--workers", "0",
        "--log-every-n-steps", "2",
        *extra,
    ]


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_align_then_clip_benchmark(wds_root, tiny_teacher, cifar_subset, tmp_path):
    output_dir = tmp_path / "run"
    assert main(_align_args(wds_root, tiny_teacher, output_dir, "--max-steps", "8", "--lr", "0.005")) == 0

    metrics = _metrics(output_dir)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    for record in metrics:
        assert {"epoch", "loss", "loss_image", "loss_text", "lr", "samples_per_s"} <= set(record)
    assert metrics[-1]["loss"] < metrics[0]["loss"]

    checkpoint = output_dir / "latest.safetensors"
    model, _, _ = open_clip.create_model_and_transforms("spikeclip-vit-t", pretrained=str(checkpoint))
    assert isinstance(model.visual.trunk, torch.nn.Module)

    result_path = tmp_path / "result.json"
    command = [
        str(Path(sys.executable).parent / "clip_benchmark"), "eval",
        "--model", "spikeclip-vit-t", "--pretrained", str(checkpoint),
        "--dataset", "wds/cifar10_jpeg", "--dataset_root", str(cifar_subset),
        "--task", "zeroshot_classification", "--output", str(result_path),
        "--batch_size", "32", "--num_workers", "0", "--no_amp",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["model"] == "spikeclip-vit-t"
    assert 0.0 <= result["metrics"]["acc1"] <= 1.0


def test_epochs_write_checkpoints_and_validate(wds_root, tiny_teacher, cifar_subset, tmp_path):
    output_dir = tmp_path / "run"
    args = _align_args(wds_root, tiny_teacher, output_dir, "--epochs", "2", "--train-num-samples", "32",
                       "--val-data", str(cifar_subset / "test" / "0.tar"), "--checkpoint-format", "pt")
    assert main(args) == 0
    names = sorted(p.name for p in output_dir.iterdir())
    for stem in ("epoch_1", "epoch_2", "latest"):
        assert f"{stem}.pt" in names
        assert f"{stem}.state.pt" in names
    validation = [m for m in _metrics(output_dir) if "val_loss_image" in m]
    assert [m["epoch"] for m in validation] == [1, 2]
    assert all(m["val_samples"] == 96 for m in validation)
    model = open_clip.create_model("spikeclip-vit-t", pretrained=str(output_dir / "epoch_2.pt"))
    assert model is not None


def test_resume_latest_continues(wds_root, tiny_teacher, tmp_path):
    output_dir = tmp_path / "run"
    assert main(_align_args(wds_root, tiny_teacher, output_dir, "--max-steps", "2")) == 0
    state = torch.load(output_dir / "latest.state.pt", weights_only=True)
    assert state["step"] == 2
    assert state["batches_done_in_epoch"] == 2
    assert main(_align_args(wds_root, tiny_teacher, output_dir, "--max-steps", "4", "--resume", "latest")) == 0
    assert [m["step"] for m in _metrics(output_dir)] == [2, 4]
    assert torch.load(output_dir / "latest.state.pt", weights_only=True)["step"] == 4


def _log(output_dir):
    return (output_dir / "train.log").read_text()


def test_unknown_teacher_rejected(wds_root, tiny_teacher, tmp_path):
    args = _align_args(wds_root, ("ViT-Q-99", tiny_teacher[1]), tmp_path / "run", "--max-steps", "1")
    assert main(args) == 2
    assert "unknown teacher model 'ViT-Q-99'" in _log(tmp_path / "run")


def test_missing_shard_rejected(wds_root, tiny_teacher, tmp_path):
    args = _align_args(wds_root, tiny_teacher, tmp_path / "run", "--max-steps", "1")
    args[args.index("--train-data") + 1] = str(tmp_path / "missing-{0..1}.tar")
    assert main(args) == 2
    assert "shards not found" in _log(tmp_path / "run")


def test_shard_without_images_aborts(wds_root, tiny_teacher, tmp_path):
    shard = tmp_path / "labels-only.tar"
    with tarfile.open(shard, "w") as archive:
        for index in range(20):
            info = tarfile.TarInfo(f"s{index:07d}.cls")
            info.size = 1
            archive.addfile(info, io.BytesIO(b"1"))
    args = _align_args(wds_root, tiny_teacher, tmp_path / "run", "--max-steps", "1")
    args[args.index("--train-data") + 1] = str(shard)
    assert main(args) == 2
    log = _log(tmp_path / "run")
    assert "16 of 16 samples could not be used" in log
    assert "no image (expected one of jpg, jpeg, png, webp; found cls)" in log


def test_student_teacher_width_mismatch(wds_root, tmp_path):
    source = wds_root / "cifar10_jpeg"
    args = ["--stage", "align", "--model", "spikeclip-vit-t", "--teacher", "RN50",
            "--train-data", str(source / "train" / "0.tar"), "--workers", "0", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    assert "embeds into 64 dimensions but teacher 'RN50' into 1024" in _log(tmp_path / "run")
