"""Losses. Symmetric cross-entropy (SCE) is the A-ABL sample score."""

from __future__ import annotations

import torch
import torch.nn.functional as F

RCE_CLAMP = 1e-4  # log(clamp(onehot, 1e-4, 1)): Wang et al. 2019, as in their code


def sce(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    """Per-sample symmetric cross-entropy `alpha * CE + beta * RCE`, shape (N,).

    RCE = -sum_k p_k * log(clamp(onehot_k, 1e-4, 1)), which is -log(1e-4) * (1 - p_y):
    it grows with the probability mass away from the label, so misclassified samples
    stand far from confidently correct ones.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).to(prob.dtype).clamp(min=RCE_CLAMP, max=1.0)
    rce = -(prob * onehot.log()).sum(dim=1)
    return alpha * ce + beta * rce
