"""Batched predictions and accuracy, clean or under an attack (PGD, APGD, AutoAttack), on uint8 image tensors."""

from __future__ import annotations

import torch
from torch import nn

from aabl_cli.core.apgd import TARGETS, autoattack
from aabl_cli.core.attacks import Threat
from aabl_cli.core.device import autocast
from aabl_cli.core.fuse import AttackView
from aabl_cli.core.graphs import GraphedAttack
from aabl_cli.core.pixels import batch_to_float
from aabl_cli.core.stream import Images, read_batches


def predict(model: nn.Module, images: Images, *, device: torch.device, batch_size: int = 256,
            threat: Threat | None = None, generator: torch.Generator | None = None,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted labels (N,) for uint8 `images` (a tensor, or a `StreamedImages`), in order; under
    `threat.attack` against `labels` when `threat` is given. With `threat.restarts` > 1 each sample
    keeps the prediction of the first restart that fooled the model (restarts attack only samples
    not yet fooled), so `pred == labels` means it survived all. The model is put in eval mode."""
    model.eval()
    view = AttackView(model)  # batch norm folded away: same outputs, cheaper attack steps
    if threat is not None and threat.eps <= 0:
        threat = None
    graphed = None
    if threat is not None and threat.attack == "pgd":
        graphed = GraphedAttack(view, eps=threat.eps, step_size=threat.step_size, steps=threat.steps,
                                random_start=threat.random_start, device=device)
    out = []
    starts = range(0, images.shape[0], batch_size)
    for start, chunk in zip(starts, read_batches(images, [slice(start, start + batch_size) for start in starts])):
        x = batch_to_float(chunk, device)
        if threat is None:
            with torch.no_grad(), autocast(device):
                out.append(view(x).argmax(dim=1).cpu())
            continue
        assert labels is not None, "a robust prediction needs the labels to attack"
        y = labels[start:start + batch_size].to(device)
        if graphed is not None:
            out.append(_pgd_predict(view, graphed, x, y, restarts=threat.restarts, generator=generator,
                                    device=device).cpu())
            continue
        # APGD's step sizes and restarts from best points depend on the data: eager, not a CUDA graph
        with autocast(device):
            x_adv = autoattack(view, x, y, eps=threat.eps, steps=threat.steps, restarts=threat.restarts,
                               targets=TARGETS if threat.attack == "autoattack" else 0, generator=generator)
        with torch.no_grad(), autocast(device):
            out.append(view(x_adv).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def _pgd_predict(view: nn.Module, attack: GraphedAttack, x: torch.Tensor, y: torch.Tensor, *, restarts: int,
                 generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Predictions under PGD from `restarts` random starts, each attacking the samples no earlier one fooled."""
    pred = y.clone()
    alive = torch.arange(len(y), device=device)  # samples every restart so far has failed to fool
    for _ in range(restarts):
        x_adv = attack(x[alive], y[alive], generator)
        with torch.no_grad(), autocast(device):
            pred[alive] = view(x_adv).argmax(dim=1)
        alive = alive[pred[alive] == y[alive]]
        if len(alive) == 0:
            break
    return pred


def accuracy(model: nn.Module, images: Images, labels: torch.Tensor, *, device: torch.device,
             batch_size: int = 256, threat: Threat | None = None, generator: torch.Generator | None = None) -> float:
    """Share of `images` classified as `labels` (under `threat` when given), in [0, 1]."""
    if images.shape[0] == 0:
        return float("nan")
    pred = predict(model, images, device=device, batch_size=batch_size, threat=threat, generator=generator,
                   labels=labels)
    return float((pred == labels.cpu()).double().mean())


def balanced_subset(labels: torch.Tensor, *, size: int, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced subset of at most `size` samples, sorted."""
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = max(1, size // max(1, len(classes)))
    chosen = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values[:size] if chosen else torch.empty(0, dtype=torch.int64)
