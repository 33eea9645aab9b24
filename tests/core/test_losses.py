"""losses: symmetric cross-entropy against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from aabl_cli.core.losses import sce


def _by_hand(logits: list[list[float]], labels: list[int], alpha: float, beta: float) -> list[float]:
    out = []
    for row, y in zip(logits, labels):
        exp = [math.exp(v) for v in row]
        p = [e / sum(exp) for e in exp]
        ce = -math.log(p[y])
        onehot = [1.0 if k == y else 0.0 for k in range(len(row))]
        rce = -sum(pk * math.log(min(max(o, 1e-4), 1.0)) for pk, o in zip(p, onehot))
        out.append(alpha * ce + beta * rce)
    return out


@pytest.mark.parametrize(("alpha", "beta"), [(0.1, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_sce_equals_hand_computation(alpha, beta):
    logits = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0], [10.0, -10.0, 0.0]]
    labels = [0, 2, 0, 0]
    got = sce(torch.tensor(logits), torch.tensor(labels), alpha=alpha, beta=beta)
    assert got.shape == (4,)
    assert got.tolist() == pytest.approx(_by_hand(logits, labels, alpha, beta), rel=1e-5, abs=1e-6)


def test_sce_defaults_are_the_papers():
    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([1, 1])
    expected = _by_hand(logits.tolist(), labels.tolist(), 0.1, 1.0)
    assert sce(logits, labels).tolist() == pytest.approx(expected, rel=1e-5)


def test_sce_orders_samples_by_confidence_in_the_label():
    # A confidently correct sample scores lower (more robust) than a misclassified one.
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    scores = sce(logits, torch.tensor([0, 0]))
    assert scores[0] < scores[1]
    # RCE is bounded by -log(1e-4) ~ 9.21 and CE is unbounded: check the beta part's ceiling
    rce_only = sce(torch.tensor([[-50.0, 50.0]]), torch.tensor([0]), alpha=0.0, beta=1.0)
    assert rce_only.item() == pytest.approx(-math.log(1e-4), rel=1e-5)


def test_sce_accepts_half_precision_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.bfloat16)
    got = sce(logits, torch.tensor([1]))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_by_hand(logits.float().tolist(), [1], 0.1, 1.0)[0], rel=1e-4)
