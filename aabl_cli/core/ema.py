"""An exponential moving average (EMA) of a model's weights and batch-norm statistics.

The average of the weights along the last few hundred steps generalises and resists attacks
better than the last step's weights, and it smooths the step-to-step swings of adversarial
training (Polyak averaging; used with adversarial training by Gowal et al. 2020 and
Rebuffi et al. 2021). `fit(..., ema=EMA(model, decay=0.995))` updates it after every
optimizer step; validation and the saved checkpoint then use `ema.module`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`module`: a float32 copy of `model` (on its device) whose floating-point parameters and
    buffers follow `avg <- d * avg + (1 - d) * live` at each `update`, with the warm-up
    `d = min(decay, (1 + t) / (10 + t))`, t = the updates done before this one (the first
    update keeps 10 % of the starting weights). Integer buffers (batch norm's
    `num_batches_tracked`) are copied. `decay` in (0, 1)."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.steps = 0
        self._averaged = [k for k, v in self.module.state_dict().items() if v.is_floating_point()]
        self._copied = [k for k, v in self.module.state_dict().items() if not v.is_floating_point()]

    def current_decay(self) -> float:
        """The decay the next `update` applies."""
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights and buffers (same architecture)."""
        d = self.current_decay()
        live, avg = model.state_dict(), self.module.state_dict()
        # lerp: avg + (1 - d) * (live - avg), exact where the two agree (e.g. fixed normalisation buffers)
        torch._foreach_lerp_([avg[k] for k in self._averaged], [live[k].float() for k in self._averaged], 1 - d)
        for k in self._copied:
            avg[k].copy_(live[k])
        self.steps += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors and the update count (`steps`), for the resume state."""
        return {**self.module.state_dict(), "steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = dict(state)
        self.steps = int(weights.pop("steps"))
        self.module.load_state_dict(weights, strict=True)
