"""attacks: the L-inf budget, the [0, 1] box, the loss going up, seeded random starts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aabl_cli.core.attacks import ifgsm, pgd


def _model(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, classes)).eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    x[:4] = 0.0  # corners of the box: the clamp to [0, 1] must bite
    x[4:8] = 1.0
    y = torch.randint(0, 4, (16,), generator=gen)
    return x, y


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 0.3])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_budget_and_box(batch, eps, random_start):
    x, y = batch
    x_adv = pgd(_model(), x, y, eps=eps, step_size=eps / 2, steps=5, random_start=random_start,
                generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad
    # the attack moved something: a no-op would satisfy the bounds trivially
    assert (x_adv - x).abs().max().item() > eps / 4


@pytest.mark.parametrize("eps", [2 / 255, 0.1])
def test_ifgsm_stays_in_budget_and_box(batch, eps):
    x, y = batch
    x_adv = ifgsm(_model(), x, y, eps=eps, step_size=2 / 255, steps=5)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert 0.0 <= x_adv.min().item() and x_adv.max().item() <= 1.0


def test_ifgsm_raises_cross_entropy(batch):
    x, y = batch
    model = _model()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
    x_adv = ifgsm(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5)
    with torch.no_grad():
        after = F.cross_entropy(model(x_adv), y, reduction="none")
    assert after.mean() > before.mean() + 1e-3
    assert (after >= before - 1e-5).float().mean() >= 0.9


def test_ifgsm_is_deterministic_without_random_start(batch):
    x, y = batch
    model = _model()
    a = ifgsm(model, x, y, eps=4 / 255, step_size=1 / 255, steps=3)
    b = ifgsm(model, x, y, eps=4 / 255, step_size=1 / 255, steps=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("attack", ["pgd", "ifgsm"])
def test_eps_zero_returns_x(batch, attack):
    x, y = batch
    if attack == "pgd":
        x_adv = pgd(_model(), x, y, eps=0.0, step_size=2 / 255, steps=5, random_start=True)
    else:
        x_adv = ifgsm(_model(), x, y, eps=0.0, step_size=2 / 255, steps=5)
    assert torch.equal(x_adv, x)


def test_random_start_reproducible_with_seeded_generator(batch):
    x, y = batch
    model = _model()
    kwargs = dict(eps=8 / 255, step_size=2 / 255, steps=1, random_start=True)
    a = pgd(model, x, y, **kwargs, generator=torch.Generator().manual_seed(7))
    b = pgd(model, x, y, **kwargs, generator=torch.Generator().manual_seed(7))
    c = pgd(model, x, y, **kwargs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pgd_does_not_change_model_mode_or_weights(batch):
    x, y = batch
    model = _model().train()
    before = [p.detach().clone() for p in model.parameters()]
    pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=2, random_start=False)
    assert model.training
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
