"""L-inf adversarial attacks on [0, 1] images, and the threat model that parametrises them.

The caller owns the model's train/eval mode. (Backdoor attacks, which poison data, are
`aabl_cli.stages.poison.backdoors`; "attack" here always means an adversarial one.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTACKS = ("pgd", "apgd", "autoattack")  # Threat.attack: which attack measures robust accuracy


@dataclass(frozen=True)
class Threat:
    """An L-inf threat model in [0, 1] pixel space and the attack that measures it; eps 0 means no attack.

    `attack`: pgd (`steps` steps of `step_size`), apgd (APGD-CE, `steps` iterations with
    its own step sizes; `step_size` unused) or autoattack (APGD-CE, then APGD-T: see
    `core.apgd`); training attacks with pgd only. `random_start` is PGD's (APGD always starts
    at random, as AutoAttack's does). `restarts`: runs from independent random starts
    (autoattack: per part and target); a sample is robust only if it survives every one.
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    restarts: int = 1
    attack: str = "pgd"


PAPER_RA = Threat()  # RA in the paper: PGD-10, eps 8/255, step 2/255, random start


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on cross-entropy (Madry et al.).

    x: float (N, C, H, W) in [0, 1]; returns x_adv with |x_adv - x|_inf <= eps and
    0 <= x_adv <= 1, detached. The perturbation is kept in float32 whatever the model's
    autocast precision, so small steps are not rounded away.
    """
    x = x.detach().float()
    if eps <= 0 or steps <= 0:
        return x
    if random_start:
        delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        delta = (x + delta).clamp(0, 1) - x
    else:
        delta = torch.zeros_like(x)
    return (x + pgd_steps(model, x, y, delta, eps=eps, step_size=step_size, steps=steps)).detach()


def pgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *, eps: float,
              step_size: float, steps: int) -> torch.Tensor:
    """`steps` signed-gradient steps from the perturbation `delta`, each projected onto the eps
    ball and the [0, 1] box; returns the final perturbation (float32, like `delta`)."""
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        # Sum, not mean: the step direction is the sign and must not depend on batch size.
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return delta


def ifgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
          steps: int) -> torch.Tensor:
    """Iterative FGSM (Kurakin et al.): PGD without the random start."""
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, random_start=False)

