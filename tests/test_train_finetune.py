"""The align-text, teacher-finetune and finetune stages end to end on real shards."""
import json
import sys

import open_clip
import pytest
import torch

from open_clip_spiking.train.__main__ import main
from open_clip_spiking.train.checkpoint import load_weights
from open_clip_spiking.train.config import parse_args


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _log(output_dir):
    return (output_dir / "train.log").read_text()


def _common(teacher, output_dir):
    return ["--teacher", teacher[0], "--teacher-pretrained", str(teacher[1]), "--output-dir", str(output_dir),
            "--batch-size", "16", "--workers", "0", "--log-every-n-steps", "1"]


def _changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.fixture(scope="module")
def aligned_student(wds_root, tiny_teacher, tmp_path_factory):
    """A spikeclip-vit-t student after two align steps on real CIFAR-10 images."""
    output_dir = tmp_path_factory.mktemp("align")
    source = wds_root / "cifar10_jpeg"
    args = ["--stage", "align", "--model", "spikeclip-vit-t", "--train-data", str(source / "train" / "0.tar"),
            "--classnames", str(source), "--max-steps", "2", *_common(tiny_teacher, output_dir)]
    assert main(args) == 0
    return output_dir / "latest.safetensors"


@pytest.fixture(scope="module")
def text_aligned_student(wds_root, tiny_teacher, aligned_student, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("align_text")
    args = ["--stage", "align-text", "--model", "spikeclip-vit-t", "--pretrained", str(aligned_student),
            "--classnames", str(wds_root / "cifar10_jpeg"), "--max-steps", "4", *_common(tiny_teacher, output_dir)]
    assert main(args) == 0
    return output_dir


@pytest.fixture(scope="module")
def task_teacher(wds_root, tiny_teacher, cifar_subset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("teacher_finetune")
    args = ["--stage", "teacher-finetune", "--train-data", str(wds_root / "cifar10_jpeg" / "train" / "0.tar"),
            "--train-num-samples", "32", "--val-data", str(cifar_subset / "test"), "--classnames", str(cifar_subset),
            "--lr", "1e-3", "--logit-scale", "100", *_common(tiny_teacher, output_dir)]
    assert main(args) == 0
    return output_dir


def test_align_text_trains_text_only(aligned_student, text_aligned_student):
    before = load_weights(aligned_student)
    after = load_weights(text_aligned_student / "latest.safetensors")
    assert _changed(before, after, "text.")
    assert not _changed(before, after, "visual.")
    assert torch.equal(before["logit_scale"], after["logit_scale"])
    metrics = _metrics(text_aligned_student)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all("loss_text" in m for m in metrics)
    assert "180 class prompts" in _log(text_aligned_student)  # 10 classes x 18 templates


def test_align_text_reads_captions(wds_root, tiny_teacher, tmp_path):
    flickr = wds_root / "flickr8k_1k" / "test" / "0.tar"
    args = ["--stage", "align-text", "--model", "spikeclip-vit-t", "--train-data", str(flickr),
            "--val-data", str(flickr), "--train-num-samples", "32", *_common(tiny_teacher, tmp_path)]
    assert main(args) == 0
    assert "captions from 1 shards" in _log(tmp_path)
    validation = [m for m in _metrics(tmp_path) if "val_loss_text" in m]
    assert validation and 0.0 <= validation[-1]["val_loss_text"] <= 2.0


def test_align_text_rejects_captionless_shards(wds_root, tiny_teacher, tmp_path):
    args = ["--stage", "align-text", "--model", "spikeclip-vit-t",
            "--train-data", str(wds_root / "cifar10_jpeg" / "test" / "0.tar"), *_common(tiny_teacher, tmp_path)]
    assert main(args) == 2
    assert "carries no 'txt' captions; pass --classnames and --templates" in _log(tmp_path)


def test_teacher_finetune_checkpoint(tiny_teacher, task_teacher):
    metrics = _metrics(task_teacher)
    validation = [m for m in metrics if "val_top1" in m]
    assert [m["epoch"] for m in validation] == [0, 1]  # zero-shot, then after the epoch
    assert all(m["val_samples"] == 96 for m in validation)
    assert [m["step"] for m in metrics if "loss_ce" in m] == [1, 2]

    before, after = load_weights(tiny_teacher[1]), load_weights(task_teacher / "epoch_1.safetensors")
    assert _changed(before, after, "visual.")
    assert not any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))
    model, _, _ = open_clip.create_model_and_transforms(tiny_teacher[0],
                                                        pretrained=str(task_teacher / "epoch_1.safetensors"))
    assert model is not None


def _clip_benchmark(monkeypatch, model, checkpoint, dataset_root, output):
    from clip_benchmark import cli

    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--model", model, "--pretrained", str(checkpoint),
        "--dataset", "wds/cifar10_jpeg", "--dataset_root", str(dataset_root),
        "--task", "zeroshot_classification", "--output", str(output),
        "--batch_size", "32", "--num_workers", "0", "--no_amp",
    ])
    cli.main()
    return json.loads(output.read_text())["metrics"]["acc1"]


def test_finetune_then_clip_benchmark(tiny_teacher, text_aligned_student, task_teacher, wds_root, cifar_subset,
                                      tmp_path, monkeypatch):
    output_dir = tmp_path / "finetune"
    student = text_aligned_student / "latest.safetensors"
    args = ["--stage", "finetune", "--model", "spikeclip-vit-t", "--pretrained", str(student),
            "--train-data", str(wds_root / "cifar10_jpeg" / "train" / "0.tar"), "--train-num-samples", "32",
            "--val-data", str(cifar_subset / "test"), "--classnames", str(cifar_subset),
            *_common(tiny_teacher, output_dir)]
    args[args.index("--teacher-pretrained") + 1] = str(task_teacher / "epoch_1.safetensors")
    assert main(args) == 0

    metrics = _metrics(output_dir)
    steps = [m for m in metrics if "loss_ce" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all({"loss_kd", "loss"} <= set(m) for m in steps)
    validation = [m for m in metrics if "val_top1" in m]
    assert [m["epoch"] for m in validation] == [0, 1]

    before, after = load_weights(student), load_weights(output_dir / "epoch_1.safetensors")
    assert _changed(before, after, "visual.")
    assert not _changed(before, after, "text.")

    # The text tower is frozen, so clip_benchmark's zero-shot head is the classifier that was trained.
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    from open_clip_spiking.train.data import load_classnames, load_templates
    from open_clip_spiking.train.models import class_embeddings

    model = open_clip.create_model("spikeclip-vit-t", pretrained=str(output_dir / "epoch_1.safetensors")).eval()
    tokenizer = open_clip.get_tokenizer("spikeclip-vit-t")
    names = load_classnames(str(cifar_subset / "classnames.txt"))
    templates = load_templates(str(cifar_subset / "zeroshot_classification_templates.txt"))
    ours = class_embeddings(model, tokenizer, names, templates, torch.device("cpu"))
    theirs = zero_shot_classifier(model, tokenizer, names, templates, "cpu", amp=False)
    assert torch.allclose(ours, theirs.T, atol=1e-6)

    for name, checkpoint in (("spikeclip-vit-t", output_dir / "epoch_1.safetensors"),
                             (tiny_teacher[0], task_teacher / "epoch_1.safetensors")):
        acc1 = _clip_benchmark(monkeypatch, name, checkpoint, cifar_subset, tmp_path / f"{name}.json")
        assert 0.0 <= acc1 <= 1.0


def test_finetune_gradient_angle_rule(tiny_teacher, text_aligned_student, wds_root, cifar_subset, tmp_path):
    args = ["--stage", "finetune", "--model", "spikeclip-vit-t",
            "--pretrained", str(text_aligned_student / "latest.safetensors"),
            "--train-data", str(wds_root / "cifar10_jpeg" / "train" / "0.tar"), "--max-steps", "2",
            "--classnames", str(cifar_subset), "--grad-angle-bound", "90", "--kd-reduction", "batchmean",
            *_common(tiny_teacher, tmp_path)]
    assert main(args) == 0
    steps = [m for m in _metrics(tmp_path) if "loss_ce" in m]
    assert len(steps) == 2
    for record in steps:
        assert 0.0 <= record["grad_angle"] <= 180.0
        assert record["kd_applied"] == float(record["grad_angle"] <= 90.0)


def _finetune_with_classnames(wds_root, tiny_teacher, tmp_path, names):
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("\n".join(names) + "\n")
    templates = wds_root / "cifar10_jpeg" / "zeroshot_classification_templates.txt"
    args = ["--stage", "finetune", "--model", "spikeclip-vit-t",
            "--train-data", str(wds_root / "cifar10_jpeg" / "train" / "0.tar"), "--max-steps", "1",
            "--classnames", str(classnames), "--templates", str(templates), *_common(tiny_teacher, tmp_path / "run")]
    args[args.index("--batch-size") + 1] = "64"
    return main(args), tmp_path / "run"


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_class_list_blank_line_rejected(wds_root, tiny_teacher, tmp_path):
    code, run = _finetune_with_classnames(wds_root, tiny_teacher, tmp_path, CIFAR10[:3] + [""] + CIFAR10[3:])
    assert code == 2
    assert "has no name on line 4 (label 3)" in _log(run)


def test_class_list_duplicate_rejected(wds_root, tiny_teacher, tmp_path):
    code, run = _finetune_with_classnames(wds_root, tiny_teacher, tmp_path, CIFAR10[:9] + ["cat"])
    assert code == 2
    assert "lists ['cat'] more than once" in _log(run)


def test_class_list_missing_class_rejected(wds_root, tiny_teacher, tmp_path):
    code, run = _finetune_with_classnames(wds_root, tiny_teacher, tmp_path, CIFAR10[:9])
    assert code == 2
    assert "label 9 is outside the 9 class names; the class names file misses names" in _log(run)


def test_finetune_needs_a_class_list(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--stage", "finetune", "--teacher", "t", "--train-data", "x.tar", "--output-dir", "out"])
    assert "--stage finetune needs the class list" in capsys.readouterr().err


def test_stage_learning_rates(tmp_path):
    (tmp_path / "n.txt").write_text("cat\ndog\n")
    base = ["--teacher", "t", "--output-dir", "out", "--classnames", str(tmp_path / "n.txt"), "--templates", "t.txt"]
    assert parse_args(["--stage", "align", "--train-data", "x.tar", *base]).lr == 5e-3
    finetune = parse_args(["--stage", "finetune", "--train-data", "x.tar", *base])
    assert (finetune.lr, finetune.lr_min) == (1e-3, 1e-4)
    assert parse_args(["--stage", "teacher-finetune", "--train-data", "x.tar", *base]).lr == 5e-5
    assert parse_args(["--stage", "align-text", *base]).train_data is None


def test_missing_class_list_path_named(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    with pytest.raises(SystemExit):
        parse_args(["--stage", "finetune", "--teacher", "t", "--train-data", "x.tar", "--output-dir", "out",
                    "--classnames", str(missing), "--templates", "t.txt"])
    assert f"--classnames {missing} not found" in capsys.readouterr().err
