"""core.accuracy: predictions and accuracy, clean and under PGD with restarts; the balanced subset."""

from __future__ import annotations

import pytest
import torch
from conftest import Threshold, grey

from aabl_cli.core.accuracy import accuracy, balanced_subset, predict
from aabl_cli.core.attacks import Threat


def test_restarts_count_a_sample_robust_only_if_it_survives_all() -> None:
    """Under the step model the first pixel moves by PGD's random start alone, uniform in +-8/255: a class-0
    image 3.5/255 below T is fooled by a start above 3.5/255, with probability 4.5/16, so it survives
    R restarts with probability (11.5/16)^R."""
    mid, far, wrong = 2000, 500, 500
    images = grey([124] * mid + [100] * far + [100] * wrong)
    labels = torch.tensor([0] * (mid + far) + [1] * wrong)
    model = Threshold(linear=False)
    assert accuracy(model, images, labels, device=torch.device("cpu")) == pytest.approx((mid + far) / 3000)
    for restarts in (1, 3):
        ra = accuracy(model, images, labels, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                      threat=Threat(eps=8 / 255, step_size=2 / 255, steps=10, restarts=restarts))
        assert ra == pytest.approx((mid * (11.5 / 16) ** restarts + far) / 3000, abs=0.02)


def test_predict_keeps_dataset_order_across_batches() -> None:
    images = grey([100, 200, 120, 140, 90])
    pred = predict(Threshold(linear=True), images, device=torch.device("cpu"), batch_size=2)
    assert pred.tolist() == [0, 1, 0, 1, 0]


def test_balanced_subset_is_seeded_sorted_and_balanced() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = balanced_subset(labels, size=30, seed=3)
    assert idx.tolist() == sorted(idx.tolist()) and torch.equal(idx, balanced_subset(labels, size=30, seed=3))
    assert torch.bincount(labels[idx]).tolist() == [10, 10, 10]
    assert not torch.equal(idx, balanced_subset(labels, size=30, seed=4))
