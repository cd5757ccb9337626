"""Metrics and task decoding against known answers."""

from __future__ import annotations

import pytest
import torch

from fedbone_med.config import TaskConfig
from fedbone_med.models.losses import decode, ordinal_probs, ordinal_targets
from fedbone_med.site.metrics import (
    binary_auc,
    classification_metrics,
    quadratic_kappa,
    segmentation_counts,
    segmentation_metrics,
)


def test_auc_known_answers_and_ties():
    y = torch.tensor([0, 0, 1, 1]).bool()
    assert binary_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert binary_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert binary_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == 0.5  # ties count half
    # 3 of 4 positive/negative pairs ordered correctly
    assert binary_auc(torch.tensor([0.1, 0.6, 0.5, 0.9]), y) == 0.75
    assert binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])) != binary_auc(
        torch.tensor([0.1, 0.2]), torch.tensor([True, True])
    )  # undefined (NaN) without negatives


def test_quadratic_kappa_known_answers():
    y = torch.tensor([0, 1, 2, 3, 4])
    assert quadratic_kappa(y, y, 5) == pytest.approx(1.0)
    assert quadratic_kappa(torch.full((5,), 2), y, 5) == pytest.approx(0.0)
    # off by one everywhere is much better than reversed
    assert quadratic_kappa((y + 1).clamp(max=4), y, 5) > 0.5 > quadratic_kappa(4 - y, y, 5)


def test_ordinal_probabilities_are_a_distribution_and_decode_matches_targets():
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3
    p = ordinal_probs(logits)
    assert bool((p >= 0).all())
    torch.testing.assert_close(p.sum(1), torch.ones(64))
    y = torch.tensor([0, 1, 2, 3, 4])
    t = ordinal_targets(y, 5)
    assert t.tolist()[2] == [1.0, 1.0, 0.0, 0.0]
    perfect = (t * 20 - 10)  # confident cumulative logits for the true grades
    task = TaskConfig(type="classification", num_classes=5, ordinal=True)
    assert decode(task, perfect).tolist() == y.tolist()


def test_classification_chance_is_the_majority_class():
    task = TaskConfig(type="classification", num_classes=3)
    target = torch.tensor([0, 0, 0, 1, 2])
    probs = torch.tensor([[1.0, 0, 0]] * 5)
    m = classification_metrics(task, probs, torch.zeros(5, dtype=torch.long), target)
    assert m["accuracy"] == pytest.approx(0.6) and m["chance"] == pytest.approx(0.6)


def test_dice_and_iou_pooled_over_images():
    task = TaskConfig(type="segmentation", num_classes=1, mode="binary")
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1  # 8 positives in image 0, none in image 1
    pred = target.clone()
    pred[0, 0, 0, :2] = 0  # 2 false negatives
    pred[1, 0, 3, 3] = 1  # 1 false positive
    m = segmentation_metrics(segmentation_counts(task, pred, target), total_pixels=32)
    assert m["dice"] == pytest.approx(2 * 6 / (2 * 6 + 1 + 2))
    assert m["iou"] == pytest.approx(6 / 9)
    assert m["chance"] == pytest.approx(2 * 0.25 / 1.25)


def test_multiclass_dice_averages_foreground_classes_present():
    task = TaskConfig(type="segmentation", num_classes=3, mode="multiclass")
    target = torch.tensor([[[0, 1], [1, 1]]])  # class 2 absent from the labels
    pred = torch.tensor([[[1, 1], [1, 1]]])
    m = segmentation_metrics(segmentation_counts(task, pred, target), total_pixels=4)
    assert m["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1))
