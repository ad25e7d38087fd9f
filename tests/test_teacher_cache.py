"""--teacher-cache for the align stages, and the --augment crop it refuses to go with."""
import json
import random

import pytest
import torch
from PIL import Image

from open_clip_spiking.train.__main__ import main
from open_clip_spiking.train.data import random_crop_flip, sample_id
from open_clip_spiking.train.teacher_cache import TeacherCache, teacher_identity


def _align_args(tiny_teacher, cifar_subset, output_dir, *extra):
    name, weights = tiny_teacher
    return [
        "--stage", "align", "--model", "spikeclip-vit-t", "--teacher", name, "--teacher-pretrained", str(weights),
        "--train-data", str(cifar_subset / "test" / "0.tar"), "--classnames", str(cifar_subset),
        "--output-dir", str(output_dir), "--batch-size", "16", "--workers", "0", "--log-every-n-steps", "1",
        "--shuffle-buffer", "1", *extra,
    ]


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_cached_epochs_train_like_uncached_ones(tiny_teacher, cifar_subset, tmp_path, single_thread):
    cache = tmp_path / "cache"
    plain = _metrics_of(tiny_teacher, cifar_subset, tmp_path / "plain")
    first = _metrics_of(tiny_teacher, cifar_subset, tmp_path / "first", "--teacher-cache", str(cache))
    again = _metrics_of(tiny_teacher, cifar_subset, tmp_path / "again", "--teacher-cache", str(cache))

    # 96 images in 6 steps an epoch, read in shard order (--shuffle-buffer 1): the first epoch fills the
    # cache, the second reads it.
    assert [m["step"] for m in first] == list(range(1, 13))
    assert first[0]["teacher_cached"] == 0.0
    assert all(m["teacher_cached"] == 1.0 for m in first if m["epoch"] == 1)
    # A later run with the same teacher reads every embedding from its first step on.
    assert all(m["teacher_cached"] == 1.0 for m in again)
    for reference, cached, reused in zip(plain, first, again):
        assert "teacher_cached" not in reference
        assert cached["loss"] == pytest.approx(reference["loss"], rel=1e-4)
        assert reused["loss"] == pytest.approx(reference["loss"], rel=1e-4)

    folder = TeacherCache(str(cache), _identity(tiny_teacher, cifar_subset))
    ids = folder.image_ids()
    assert len(ids) == 96
    assert all(identifier.startswith(str((cifar_subset / "test" / "0.tar").resolve())) for identifier in ids)


def _metrics_of(tiny_teacher, cifar_subset, output_dir, *extra):
    assert main(_align_args(tiny_teacher, cifar_subset, output_dir, "--epochs", "2", *extra)) == 0
    return [m for m in _metrics(output_dir) if "loss" in m]


def _identity(tiny_teacher, cifar_subset):
    import open_clip

    name, weights = tiny_teacher
    _, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    return teacher_identity(name, str(weights), preprocess, "fp32")


def test_cache_of_another_teacher_is_refused(tiny_teacher, cifar_subset, tmp_path):
    identity = _identity(tiny_teacher, cifar_subset)
    TeacherCache(str(tmp_path), identity)
    other = dict(identity, precision="bf16")
    with pytest.raises(ValueError, match=r"another teacher setup \(precision: cached 'fp32', now 'bf16'\)"):
        TeacherCache(str(tmp_path), other)


def test_cache_survives_a_restart_and_merges_ranks(tmp_path):
    identity = {"format": 1, "teacher": "t", "pretrained": {"tag": None}, "preprocess": "p", "precision": "fp32"}
    rank0 = TeacherCache(str(tmp_path), identity, rank=0)
    rank1 = TeacherCache(str(tmp_path), identity, rank=1)
    rank0.add_images(["a.tar::0", "a.tar::1"], torch.eye(2, 4))
    rank1.add_images(["b.tar::0"], torch.ones(1, 4))
    rank1.add_texts(["a photo of a cat"], torch.full((1, 4), 0.5))
    assert rank0.flush() == 2
    assert rank1.flush() == 2
    assert rank0.refresh() == 2  # rank 1's two chunks

    reopened = TeacherCache(str(tmp_path), identity)
    rows, missing = reopened.image_embeddings(["a.tar::1", "c.tar::9", "b.tar::0"])
    assert missing == [1]
    assert torch.equal(rows[0], torch.eye(2, 4)[1])
    assert torch.equal(rows[2], torch.ones(4))
    rows, missing = reopened.text_embeddings(["a photo of a cat"])
    assert missing == []
    assert torch.equal(rows[0], torch.full((4,), 0.5))
    # Nothing new, nothing written.
    assert reopened.flush() == 0


def test_align_text_reuses_cached_texts(tiny_teacher, cifar_subset, tmp_path, capfd):
    name, weights = tiny_teacher
    args = ["--stage", "align-text", "--model", "spikeclip-vit-t", "--teacher", name, "--teacher-pretrained",
            str(weights), "--classnames", str(cifar_subset), "--max-steps", "1", "--batch-size", "8",
            "--teacher-cache", str(tmp_path / "cache")]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    assert "0 of 180 texts cached" in capfd.readouterr().err
    assert main([*args, "--output-dir", str(tmp_path / "two")]) == 0
    assert "180 of 180 texts cached" in capfd.readouterr().err


@pytest.mark.parametrize("stage", ["finetune", "teacher-finetune"])
def test_cache_only_for_align_stages(tiny_teacher, cifar_subset, tmp_path, capsys, stage):
    with pytest.raises(SystemExit) as exit_info:
        main(_align_args(tiny_teacher, cifar_subset, tmp_path / "run", "--teacher-cache", str(tmp_path / "c"))
             [2:] + ["--stage", stage])
    assert exit_info.value.code == 2
    assert f"--teacher-cache is for the align and align-text stages, not --stage {stage}" in capsys.readouterr().err


def test_cache_with_augmentation_is_refused(tiny_teacher, cifar_subset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_align_args(tiny_teacher, cifar_subset, tmp_path / "run", "--teacher-cache", str(tmp_path / "c"),
                         "--augment"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--teacher-cache cannot be used with --augment" in error
    assert "embeddings stored in the first epoch would be stale" in error
    assert not (tmp_path / "c").exists()


def test_augmented_crop_depends_on_the_generator_only():
    image = Image.new("RGB", (40, 30))
    image.putdata([(x * 6, y * 8, 0) for y in range(30) for x in range(40)])
    first = random_crop_flip(image, random.Random(7))
    assert random_crop_flip(image, random.Random(7)).tobytes() == first.tobytes()
    crops = {random_crop_flip(image, random.Random(seed)).tobytes() for seed in range(20)}
    assert len(crops) == 20
    for seed in range(20):
        crop = random_crop_flip(image, random.Random(seed))
        area = crop.size[0] * crop.size[1]
        assert 0.45 * 1200 <= area <= 1200
        assert 3 / 4 - 0.1 <= crop.size[0] / crop.size[1] <= 4 / 3 + 0.1


def test_augmented_training_runs_and_changes_the_batches(tiny_teacher, cifar_subset, tmp_path):
    plain = tmp_path / "plain"
    augmented = tmp_path / "augmented"
    assert main(_align_args(tiny_teacher, cifar_subset, plain, "--max-steps", "2")) == 0
    assert main(_align_args(tiny_teacher, cifar_subset, augmented, "--max-steps", "2", "--augment")) == 0
    losses = [m["loss"] for m in _metrics(plain)]
    augmented_losses = [m["loss"] for m in _metrics(augmented)]
    assert len(losses) == len(augmented_losses) == 2
    assert losses[0] != pytest.approx(augmented_losses[0], rel=1e-3)


def test_sample_id_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sample_id("shards/0.tar", "000001") == f"{tmp_path / 'shards' / '0.tar'}::000001"
