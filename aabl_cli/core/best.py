"""The best epoch by validation robust accuracy, and catastrophic overfitting.

Adversarial training can collapse: within an epoch or two the model's robust accuracy falls
to near zero while its accuracy on the training attacks climbs (catastrophic overfitting,
Wong et al. 2020; robust overfitting, Rice et al. 2020). With a validation set the stage
watches `val_ra` after every epoch, keeps the weights of its best epoch (`BestEpoch`) and
says when a collapse happened (`collapse_epoch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

COLLAPSE_FLOOR = 0.10  # below this best val_ra there is no robustness to lose
COLLAPSE_RATIO = 0.5  # a collapse: val_ra below this share of its best so far


def best_epoch(val_ra: Sequence[float | None]) -> int | None:
    """The epoch (1-based) of the highest val_ra, the later one on a tie; None without a number."""
    best, best_value = None, -math.inf
    for epoch, value in enumerate(val_ra, start=1):
        if value is not None and not math.isnan(value) and value >= best_value:
            best, best_value = epoch, value
    return best


def collapse_epoch(val_ra: Sequence[float | None], *, floor: float = COLLAPSE_FLOOR,
                   ratio: float = COLLAPSE_RATIO) -> int | None:
    """The first epoch (1-based) whose val_ra fell below `ratio` x the best val_ra of the epochs
    before it, once that best was at least `floor`; None when it never did. Epochs without a
    number (None, NaN) are skipped."""
    best = -math.inf
    for epoch, value in enumerate(val_ra, start=1):
        if value is None or math.isnan(value):
            continue
        if best >= floor and value < ratio * best:
            return epoch
        best = max(best, value)
    return None


class BestEpoch:
    """The epoch with the best val_ra so far (ties: the later epoch) and, with `weights`, the weights
    `model` had then, kept in memory (on the model's device) and, through `state_dict`, in the resume
    state."""

    def __init__(self, model: nn.Module, *, weights: bool = True) -> None:
        self.model, self.keeps_weights = model, weights
        self.epoch = 0  # none yet
        self.val_ra = -math.inf
        self.weights: dict[str, torch.Tensor] = {}

    def observe(self, history: list[dict[str, Any]]) -> bool:
        """After an epoch (the last row of `history`): keep the model's weights when its val_ra is
        the best so far. Returns whether it was."""
        row = history[-1]
        value = row.get("val_ra")
        if value is None or math.isnan(value) or value < self.val_ra:
            return False
        self.epoch, self.val_ra = int(row["epoch"]), float(value)
        if self.keeps_weights:
            self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept weights (if any), the epoch and its val_ra, for the resume state (empty before any)."""
        if not self.epoch:
            return {}
        return {**self.weights, "epoch": torch.tensor(self.epoch, dtype=torch.int64),
                "val_ra": torch.tensor(self.val_ra, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        weights = dict(state)
        self.epoch, self.val_ra = int(weights.pop("epoch")), float(weights.pop("val_ra"))
        device = next(iter(self.model.state_dict().values())).device
        self.weights = {k: v.to(device) for k, v in weights.items()}
