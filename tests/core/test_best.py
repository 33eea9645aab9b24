"""core.best: the best epoch by val_ra (ties: the later), collapse detection on synthetic histories, and the
kept weights' round trip through the resume state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aabl_cli.core.best import BestEpoch, best_epoch, collapse_epoch


@pytest.mark.parametrize(("val_ra", "epoch"), [
    ([0.05, 0.20, 0.35, 0.30, 0.10, 0.40], 5),  # 0.10 < 0.35 / 2
    ([0.30, 0.02, 0.01], 2),  # right after the first epoch
    ([0.10, 0.049], 2),  # a best of exactly 0.10 counts
    ([0.20, 0.30, 0.14, 0.50, 0.05], 3),  # the first collapse, not a later one
    ([0.0, None, 0.4, math.nan, 0.1], 5),  # epochs without a number are skipped
])
def test_a_collapse_is_the_first_epoch_below_half_the_best_before_it(val_ra, epoch):
    assert collapse_epoch(val_ra) == epoch


@pytest.mark.parametrize("val_ra", [
    [0.10, 0.20, 0.25, 0.20, 0.15, 0.125],  # down, but never below half of 0.25
    [0.05, 0.09, 0.01, 0.0],  # the best stayed below 0.10: nothing to lose
    [0.09, 0.099, 0.04],
    [],
    [None, None],
])
def test_no_collapse(val_ra):
    assert collapse_epoch(val_ra) is None


def test_collapse_thresholds_are_parameters():
    assert collapse_epoch([0.05, 0.02], floor=0.05) == 2
    assert collapse_epoch([0.4, 0.3], ratio=0.8) == 2 and collapse_epoch([0.4, 0.3]) is None


def test_best_epoch_takes_the_later_of_equal_bests():
    assert best_epoch([0.1, 0.3, 0.3, 0.2]) == 3
    assert best_epoch([0.5, math.nan, None, 0.4]) == 1
    assert best_epoch([None, math.nan]) is None and best_epoch([]) is None


def test_best_epoch_keeps_the_weights_of_its_epoch_and_survives_a_round_trip():
    model = nn.Linear(2, 2)
    best = BestEpoch(model)
    assert best.state_dict() == {}
    kept = None
    history = []
    for epoch, val_ra in enumerate([0.2, 0.4, 0.4, 0.1], start=1):
        with torch.no_grad():
            model.weight.add_(1.0)
        history.append({"epoch": epoch, "val_ra": val_ra})
        if best.observe(history):
            kept = model.weight.detach().clone()
    assert best.epoch == 3 and best.val_ra == 0.4
    assert torch.equal(best.weights["weight"], kept) and not torch.equal(best.weights["weight"], model.weight)
    assert not best.observe([*history, {"epoch": 5}])  # a row without val_ra changes nothing
    other = BestEpoch(nn.Linear(2, 2))
    other.load_state_dict(best.state_dict())
    assert (other.epoch, other.val_ra) == (3, 0.4) and torch.equal(other.weights["weight"], kept)


def test_without_weights_only_the_epoch_is_kept():
    best = BestEpoch(nn.Linear(2, 2), weights=False)
    assert best.observe([{"epoch": 1, "val_ra": 0.3}])
    assert best.epoch == 1 and best.weights == {} and set(best.state_dict()) == {"epoch", "val_ra"}
