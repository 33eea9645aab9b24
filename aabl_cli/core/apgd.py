"""APGD and the white-box part of AutoAttack (Croce & Hein 2020), L-inf on [0, 1] images.

"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks" (ICML 2020). APGD is PGD without a step size to tune: it starts with steps of
2 x eps, adds momentum, and at checkpoints halves the step of each sample whose loss has
stopped rising, restarting that sample from its best point so far. AutoAttack's standard
version runs APGD on cross-entropy (APGD-CE), then APGD on the targeted DLR loss towards
each of the 9 most likely other classes (APGD-T), then FAB-T and Square; `autoattack`
here runs the first two.

Everything is batched: step sizes, best points and counters are per-sample tensors, and
the host waits on the device only at checkpoints. As with `attacks.pgd`, the caller owns
the model's mode and its autocast; perturbed images are kept in float32.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

INITIAL_STEP = 2.0  # the first step size, in units of eps
MOMENTUM = 0.75  # alpha: weight of the new step against the previous move
RHO = 0.75  # a checkpoint halves the step where fewer than this share of the steps since the last one raised the loss
TARGETS = 9  # APGD-T's target classes in AutoAttack's standard version
# The checkpoints' fractions of the iterations: p_1, and the least and the shrink of the gap between two.
FIRST, MIN_GAP, SHRINK = Fraction(22, 100), Fraction(6, 100), Fraction(3, 100)


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j * steps) after which APGD checks its step sizes, where
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) while p_j <= 1
    (exact fractions, no float rounding); ascending, without 0 or repeats. 100 steps:
    [22, 41, 57, 70, 80, 87, 93, 99]."""
    p = [Fraction(0), FIRST]
    while (nxt := p[-1] + max(p[-1] - p[-2] - SHRINK, MIN_GAP)) <= 1:
        p.append(nxt)
    return sorted({math.ceil(q * steps) for q in p[1:]} - {0})


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The targeted DLR loss per sample, (N,): -(z_y - z_t) / (z_1 - (z_3 + z_4) / 2 + 1e-12),
    with z_1 >= z_2 >= ... the sorted logits. It rises as the target's logit overtakes the
    true class's, and does not change when the logits are shifted or scaled, which keeps
    its gradient useful on overconfident models. With fewer than 4 classes z_3 and z_4
    are the lowest logit."""
    z = logits.float()
    top = z.sort(dim=1, descending=True).values
    last = z.shape[1] - 1
    scale = top[:, 0] - (top[:, min(2, last)] + top[:, min(3, last)]) / 2 + 1e-12
    margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, target[:, None]).squeeze(1)
    return -margin / scale


def target_count(classes: int, targets: int = TARGETS) -> int:
    """How many target classes APGD-T attacks with `classes` classes: `targets`, at most all the other
    classes; none with two, where the one target is what APGD-CE already attacks and the DLR
    ratio is a constant +-1 without a gradient."""
    return min(targets, classes - 1) if classes > 2 else 0


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
         target: torch.Tensor | None = None, random_start: bool = True,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One run of APGD: on cross-entropy (APGD-CE), or with `target` (N,) classes on the targeted
    DLR loss (APGD-T). Both count a sample fooled when the model misclassifies it.

    x: float (N, C, H, W) in [0, 1]; returns x_adv with |x_adv - x|_inf <= eps and
    0 <= x_adv <= 1, detached: for each sample an iterate the model misclassified if there
    was one (the start included), otherwise the iterate of highest loss. `steps` + 1
    forward-backward passes (the start, then one per iteration).
    """
    return _run(model, x, y, eps=eps, steps=steps, target=target, random_start=random_start, generator=generator)[0]


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
               restarts: int = 1, targets: int = TARGETS, generator: torch.Generator | None = None) -> torch.Tensor:
    """AutoAttack's white-box part: APGD-CE from `restarts` random starts, then APGD-T towards each
    of the `target_count` classes the model finds most likely on the clean image after the true
    one, `restarts` runs each; `targets=0` is APGD-CE alone. A run attacks only the samples no
    earlier run fooled, and samples misclassified unattacked are not attacked (as AutoAttack).

    Returns x_adv like `apgd`: the example that fooled the model where one did, x where the clean
    image is misclassified, the last run's highest-loss point elsewhere. Costs `steps` + 1
    passes per run on the samples it attacks.
    """
    x = x.detach().float()
    with torch.no_grad():
        logits = model(x).float()
    fooled = logits.argmax(dim=1) != y
    ranked = logits.argsort(dim=1, descending=True)  # the clean prediction first, then the likeliest others
    x_adv = x.clone()
    runs: list[torch.Tensor | None] = [None] * restarts
    runs += [ranked[:, k] for k in range(1, target_count(logits.shape[1], targets) + 1) for _ in range(restarts)]
    for target in runs:
        alive = (~fooled).nonzero().squeeze(1)
        if len(alive) == 0:
            break
        adv, wrong = _run(model, x[alive], y[alive], eps=eps, steps=steps,
                          target=None if target is None else target[alive], random_start=True, generator=generator)
        x_adv[alive] = adv
        fooled[alive] = wrong
    return x_adv


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, target: torch.Tensor | None,
         random_start: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`apgd`'s x_adv, and whether each sample was misclassified at some iterate (N,) bool."""
    x = x.detach().float()
    if eps <= 0 or steps <= 0 or x.shape[0] == 0:
        return x, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    low, high = (x - eps).clamp(min=0), (x + eps).clamp(max=1)  # the eps ball within the [0, 1] box

    def project(z: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(z, high), low)

    def each(mask: torch.Tensor) -> torch.Tensor:  # a per-sample flag broadcast over the pixels
        return mask.view(-1, *([1] * (x.dim() - 1)))

    x_k = project(x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)) if random_start else x.clone()
    loss, grad, fooled = _loss_and_grad(model, x_k, y, target)
    x_fooled, x_best, loss_best, grad_best = x_k, x_k, loss, grad
    step = torch.full((x.shape[0], *([1] * (x.dim() - 1))), INITIAL_STEP * eps, device=x.device)
    x_prev, loss_prev = x_k, loss
    rises = torch.zeros_like(loss)  # iterations since the last checkpoint that raised the loss
    best_at_mark = loss_best
    halved_at_mark = torch.zeros_like(fooled)
    marks, last_mark = set(checkpoints(steps)), 0
    for i in range(1, steps + 1):
        with torch.no_grad():
            z = project(x_k + step * grad.sign())
            if i > 1:  # momentum from the second step on
                z = project(x_k + MOMENTUM * (z - x_k) + (1 - MOMENTUM) * (x_k - x_prev))
            x_prev, x_k = x_k, z
        loss, grad, wrong = _loss_and_grad(model, x_k, y, target)
        with torch.no_grad():
            x_fooled = torch.where(each(wrong), x_k, x_fooled)
            fooled = fooled | wrong
            rises += loss > loss_prev
            better = loss > loss_best
            x_best = torch.where(each(better), x_k, x_best)
            grad_best = torch.where(each(better), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)
            loss_prev = loss
            if i not in marks:
                continue
            # halve where too few steps raised the loss, or where neither the step nor the best loss
            # changed since the last checkpoint; those samples go on from their best point
            halve = (rises < RHO * (i - last_mark)) | (~halved_at_mark & (loss_best <= best_at_mark))
            step = torch.where(each(halve), step / 2, step)
            x_k = torch.where(each(halve), x_best, x_k)
            grad = torch.where(each(halve), grad_best, grad)
            loss_prev = torch.where(halve, loss_best, loss_prev)
            halved_at_mark, best_at_mark, last_mark = halve, loss_best, i
            rises = torch.zeros_like(rises)
            if bool(fooled.all()):  # one wait on the device per checkpoint
                break
    return torch.where(each(fooled), x_fooled, x_best).detach(), fooled


def _loss_and_grad(model: nn.Module, x_k: torch.Tensor, y: torch.Tensor,
                   target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss (N,), its gradient at `x_k` (float32, like `x_k`) and whether the model misclassifies."""
    with torch.enable_grad():
        x_k = x_k.detach().requires_grad_(True)
        logits = model(x_k)
        if target is None:
            loss = F.cross_entropy(logits.float(), y, reduction="none")
        else:
            loss = dlr_targeted_loss(logits, y, target)
        # Sum: each sample's gradient is its own loss's; only its sign is used.
        (grad,) = torch.autograd.grad(loss.sum(), x_k)
    return loss.detach(), grad, logits.detach().argmax(dim=1) != y
