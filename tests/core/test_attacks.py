"""attacks: the L-inf budget, the [0, 1] box, the loss going up, seeded random starts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import untrained_cnn

from aabl_cli.core.attacks import ifgsm, pgd


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 0.3])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_budget_and_box(attack_batch, eps, random_start):
    x, y = attack_batch
    x_adv = pgd(untrained_cnn(), x, y, eps=eps, step_size=eps / 2, steps=5, random_start=random_start,
                generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad
    # the attack moved something: a no-op would satisfy the bounds trivially
    assert (x_adv - x).abs().max().item() > eps / 4


@pytest.mark.parametrize("eps", [2 / 255, 0.1])
def test_ifgsm_stays_in_budget_and_box(attack_batch, eps):
    x, y = attack_batch
    x_adv = ifgsm(untrained_cnn(), x, y, eps=eps, step_size=2 / 255, steps=5)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert 0.0 <= x_adv.min().item() and x_adv.max().item() <= 1.0


def test_ifgsm_raises_cross_entropy(attack_batch):
    x, y = attack_batch
    model = untrained_cnn()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
    x_adv = ifgsm(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5)
    with torch.no_grad():
        after = F.cross_entropy(model(x_adv), y, reduction="none")
    assert after.mean() > before.mean() + 1e-3
    assert (after >= before - 1e-5).float().mean() >= 0.9


def test_ifgsm_is_deterministic_without_random_start(attack_batch):
    x, y = attack_batch
    model = untrained_cnn()
    a = ifgsm(model, x, y, eps=4 / 255, step_size=1 / 255, steps=3)
    b = ifgsm(model, x, y, eps=4 / 255, step_size=1 / 255, steps=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("attack", ["pgd", "ifgsm"])
def test_eps_zero_returns_x(attack_batch, attack):
    x, y = attack_batch
    if attack == "pgd":
        x_adv = pgd(untrained_cnn(), x, y, eps=0.0, step_size=2 / 255, steps=5, random_start=True)
    else:
        x_adv = ifgsm(untrained_cnn(), x, y, eps=0.0, step_size=2 / 255, steps=5)
    assert torch.equal(x_adv, x)


def test_random_start_reproducible_with_seeded_generator(attack_batch):
    x, y = attack_batch
    model = untrained_cnn()
    kwargs = dict(eps=8 / 255, step_size=2 / 255, steps=1, random_start=True)
    a = pgd(model, x, y, **kwargs, generator=torch.Generator().manual_seed(7))
    b = pgd(model, x, y, **kwargs, generator=torch.Generator().manual_seed(7))
    c = pgd(model, x, y, **kwargs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pgd_does_not_change_model_mode_or_weights(attack_batch):
    x, y = attack_batch
    model = untrained_cnn().train()
    before = [p.detach().clone() for p in model.parameters()]
    pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=2, random_start=False)
    assert model.training
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
