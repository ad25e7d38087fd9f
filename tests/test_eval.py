"""``python -m open_clip_spiking.eval``: accuracy with renamed and expanded class lists."""
import json

import pytest
import torch

from open_clip_spiking.eval import accuracy, main
from open_clip_spiking.train.checkpoint import save_weights


@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("spikeclip-vit-t")
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    save_weights(path, model.state_dict(), "spikeclip-vit-t", open_clip.get_model_config("spikeclip-vit-t"))
    return path


SYNONYMS = ["aeroplane", "car", "songbird", "kitten", "stag", "puppy", "toad", "stallion", "boat", "lorry"]


def _args(checkpoint, cifar_subset, *extra):
    return ["--model", "spikeclip-vit-t", "--pretrained", str(checkpoint), "--data", str(cifar_subset / "test"),
            "--classnames", str(cifar_subset), "--workers", "0", "--batch-size", "32", *extra]


def test_accuracy_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    classifier = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    result = accuracy(features, torch.tensor([0, 0, 2]), classifier)
    # Cosine logits of the third image: 0.6, 0.8, 0.96. Predictions 0, 1, 2: two of three right.
    assert result["top1"] == pytest.approx(2 / 3)
    assert result["top5"] == pytest.approx(1.0)


def test_synonyms_and_distractors(student_checkpoint, cifar_subset, tmp_path, capsys):
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("\n".join(SYNONYMS) + "\n")
    distractors = tmp_path / "distractors.txt"
    distractors.write_text("tractor\nlobster\nsunflower\n")
    output = tmp_path / "result.json"
    assert main(_args(student_checkpoint, cifar_subset, "--synonyms", str(synonyms), "--distractors",
                      str(distractors), "--output", str(output))) == 0
    report = json.loads(output.read_text())
    assert report["samples"] == 96
    sets = report["label_sets"]
    assert {name: s["num_classes"] for name, s in sets.items()} == {
        "original": 10, "synonyms": 10, "distractors": 13, "synonyms+distractors": 13}
    for result in sets.values():
        assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert "| synonyms+distractors | 13 |" in capsys.readouterr().out


def test_synonym_count_must_match(student_checkpoint, cifar_subset, tmp_path, capsys):
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("\n".join(SYNONYMS[:8]) + "\n")
    assert main(_args(student_checkpoint, cifar_subset, "--synonyms", str(synonyms))) == 2
    assert "lists 8 names but --classnames has 10" in capsys.readouterr().err


def test_distractor_duplicate_rejected(student_checkpoint, cifar_subset, tmp_path, capsys):
    distractors = tmp_path / "distractors.txt"
    distractors.write_text("tractor\ncat\n")
    assert main(_args(student_checkpoint, cifar_subset, "--distractors", str(distractors))) == 2
    assert "repeats class names ['cat']" in capsys.readouterr().err


def test_missing_class_folder_named(student_checkpoint, tmp_path, capsys):
    args = ["--model", "spikeclip-vit-t", "--pretrained", str(student_checkpoint), "--data", str(tmp_path),
            "--classnames", str(tmp_path / "missing")]
    assert main(args) == 2
    assert f"--classnames {tmp_path / 'missing'} not found" in capsys.readouterr().err


def test_missing_checkpoint_named(cifar_subset, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    args = ["--model", "spikeclip-vit-t", "--pretrained", str(missing), "--data", str(cifar_subset / "test"),
            "--classnames", str(cifar_subset)]
    assert main(args) == 2
    assert f"--pretrained {missing} is neither a checkpoint file nor a pretrained tag" in capsys.readouterr().err
