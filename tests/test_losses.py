"""Loss terms of the training stages against values computed by hand."""
import math

import pytest
import torch

from open_clip_spiking.train.config import parse_args
from open_clip_spiking.train.finetune import dual_loss
from open_clip_spiking.train.losses import cosine_alignment_loss, cosine_logits, distillation_kl, gradient_angle


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _config(folder, *extra):
    classnames = folder / "names.txt"
    classnames.write_text("cat\ndog\nbird\n")
    return parse_args(["--stage", "finetune", "--teacher", "t", "--train-data", "x.tar", "--output-dir", "out",
                       "--classnames", str(classnames), "--templates", "templates.txt", *extra])


STUDENT = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
TEACHER = [[1.0, 1.0, 0.0], [0.0, -2.0, 1.0]]
LABELS = [0, 1]


def _kl_by_hand(student, teacher, temperature=1.0):
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p = _softmax([v / temperature for v in t_row])
        q = _softmax([v / temperature for v in s_row])
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total * temperature ** 2


def _ce_by_hand(student, labels):
    return sum(-math.log(_softmax(row)[label]) for row, label in zip(student, labels)) / len(labels)


def test_distillation_kl_sum_and_batchmean():
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    expected = _kl_by_hand(STUDENT, TEACHER)
    assert distillation_kl(student, teacher, reduction="sum").item() == pytest.approx(expected, rel=1e-5)
    assert distillation_kl(student, teacher, reduction="batchmean").item() == pytest.approx(expected / 2, rel=1e-5)


def test_distillation_kl_temperature():
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    expected = _kl_by_hand(STUDENT, TEACHER, temperature=4.0)
    assert distillation_kl(student, teacher, temperature=4.0).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_kl_is_zero_for_equal_logits():
    logits = torch.tensor(STUDENT)
    assert distillation_kl(logits, logits + 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dual_loss_weights(tmp_path):
    cfg = _config(tmp_path, "--ce-weight", "0.5", "--kd-weight", "2", "--kd-reduction", "batchmean")
    losses = dual_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), cfg)
    ce, kl = _ce_by_hand(STUDENT, LABELS), _kl_by_hand(STUDENT, TEACHER) / 2
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_kd"].item() == pytest.approx(kl, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(0.5 * ce + 2 * kl, rel=1e-5)


def test_dual_loss_defaults_are_spikeclips(tmp_path):
    cfg = _config(tmp_path)
    assert (cfg.ce_weight, cfg.kd_weight, cfg.kd_temperature, cfg.kd_reduction, cfg.logit_scale) == (
        1.0, 1.0, 1.0, "sum", 1.0)
    losses = dual_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), cfg)
    assert losses["loss"].item() == pytest.approx(_ce_by_hand(STUDENT, LABELS) + _kl_by_hand(STUDENT, TEACHER),
                                                  rel=1e-5)


def test_dual_loss_without_teacher_is_cross_entropy(tmp_path):
    cfg = _config(tmp_path, "--kd-weight", "0")
    losses = dual_loss(torch.tensor(STUDENT), None, torch.tensor(LABELS), cfg)
    assert set(losses) == {"loss", "loss_ce"}
    assert losses["loss"].item() == pytest.approx(_ce_by_hand(STUDENT, LABELS), rel=1e-5)


def test_cosine_logits_scale():
    features = torch.tensor([[3.0, 4.0]])
    classifier = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert cosine_logits(features, classifier, 10.0)[0].tolist() == pytest.approx([6.0, 8.0])


def test_cosine_alignment_loss_by_hand():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert cosine_alignment_loss(student, teacher).item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)


@pytest.mark.parametrize("second, degrees", [
    ([torch.tensor([2.0, 0.0]), torch.tensor([0.0])], 0.0),
    ([torch.tensor([0.0, 1.0]), torch.tensor([0.0])], 90.0),
    ([torch.tensor([-1.0, 0.0]), torch.tensor([0.0])], 180.0),
    ([torch.tensor([1.0, 0.0]), torch.tensor([1.0])], 45.0),
])
def test_gradient_angle(second, degrees):
    first = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    assert gradient_angle(first, second) == pytest.approx(degrees, abs=1e-6)


def test_gradient_angle_counts_missing_gradients_as_zero():
    assert gradient_angle([torch.tensor([1.0]), None], [torch.tensor([1.0]), torch.tensor([1.0])]) == \
        pytest.approx(45.0, abs=1e-6)
