"""apgd: the checkpoint schedule, the targeted DLR loss, the budget and box, seeding, the examples kept,
and APGD-CE / AutoAttack against PGD-10 on a small trained model."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import untrained_cnn
from torch import nn

from aabl_cli.core.accuracy import predict
from aabl_cli.core.apgd import apgd, autoattack, checkpoints, dlr_targeted_loss, target_count
from aabl_cli.core.attacks import Threat
from aabl_cli.core.models import Classifier, SmallCNN
from aabl_cli.core.synthetic import make_shapes

CPU = torch.device("cpu")


def _paper_checkpoints(steps: int) -> list[int]:
    """The paper's w_j = ceil(p_j * N), computed independently in floats (rounded before the ceiling)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1 + 1e-12:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 9)) for q in p[1:]} - {0})


def test_checkpoints_of_100_iterations_are_the_papers() -> None:
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99: the gaps shrink by 0.03 down to 0.06
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("steps", [1, 5, 10, 20, 37, 50, 250, 1000])
def test_checkpoints_follow_the_formula_for_any_iteration_count(steps: int) -> None:
    marks = checkpoints(steps)
    assert marks == _paper_checkpoints(steps)
    assert marks == sorted(set(marks)) and 1 <= marks[0] and marks[-1] <= steps


def test_targeted_dlr_loss_on_hand_made_logits() -> None:
    logits = torch.tensor([[5.0, 3.0, 1.0, 0.0, -1.0],    # true 0 leads target 1: z1 = 5, z3 = 1, z4 = 0
                           [1.0, 4.0, 2.0, 0.0, 0.0]])    # target 1 already leads: the loss is positive
    y, target = torch.tensor([0, 0]), torch.tensor([1, 1])
    loss = dlr_targeted_loss(logits, y, target)
    assert loss.tolist() == pytest.approx([-(5 - 3) / (5 - (1 + 0) / 2), (4 - 1) / (4 - (1 + 0) / 2)])
    # shifting and scaling the logits changes nothing
    assert dlr_targeted_loss(3 * logits + 7, y, target).tolist() == pytest.approx(loss.tolist())
    # three classes: z3 and z4 are both the lowest logit
    three = dlr_targeted_loss(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0]), torch.tensor([1]))
    assert three.item() == pytest.approx(-(3 - 1) / (3 - 0))


@pytest.mark.parametrize(("classes", "count"), [(10, 9), (100, 9), (5, 4), (3, 2), (2, 0)])
def test_target_count(classes: int, count: int) -> None:
    assert target_count(classes) == count




@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 0.3])
@pytest.mark.parametrize("targeted", [False, True])
def test_apgd_stays_in_budget_and_box(attack_batch, eps: float, targeted: bool) -> None:
    x, y = attack_batch
    target = (y + 1) % 4 if targeted else None
    x_adv = apgd(untrained_cnn(), x, y, eps=eps, steps=12, target=target, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32 and not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv - x).abs().max().item() > eps / 2  # it moved: a no-op would pass the bounds trivially


def test_apgd_raises_the_loss_above_its_random_start(attack_batch) -> None:
    x, y = attack_batch
    model = untrained_cnn()
    start = (x + torch.empty_like(x).uniform_(-8 / 255, 8 / 255, generator=torch.Generator().manual_seed(0)))
    x_adv = apgd(model, x, y, eps=8 / 255, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = F.cross_entropy(model(start.clamp(0, 1)), y, reduction="none")
        after = F.cross_entropy(model(x_adv), y, reduction="none")
    fooled = model(x_adv).argmax(dim=1) != y
    assert bool(((after > before + 1e-3) | fooled).all())


def test_apgd_is_seeded(attack_batch) -> None:
    x, y = attack_batch
    model = untrained_cnn()
    runs = [apgd(model, x, y, eps=8 / 255, steps=10, generator=torch.Generator().manual_seed(seed))
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


class _FooledOnce(nn.Module):
    """Three classes, true class 0. Its second call (APGD's first iterate) says class 1 with cross-entropy
    0.74; every other call says class 0 with cross-entropy about 1.05, higher: the highest-loss point
    is never adversarial, so only an attack that keeps its fooling iterate returns an adversarial example."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        s = 1e-3 * x.flatten(1).sum(dim=1)  # a gradient for the attack to follow
        if len(self.seen) == 2:
            return torch.stack([0 * s, 0.1 - s, -20 + 0 * s], dim=1)  # the gradient turns the next step around
        return torch.stack([0 * s, -0.1 + s, -0.1 + s], dim=1)


def test_apgd_keeps_the_iterate_that_fooled_the_model_not_the_highest_loss() -> None:
    x, y = torch.full((1, 3, 4, 4), 0.5), torch.tensor([0])
    model = _FooledOnce()
    x_adv = apgd(model, x, y, eps=8 / 255, steps=6, generator=torch.Generator().manual_seed(0))
    assert len(model.seen) >= 3  # the start and iterates up to the first checkpoint, where all are fooled
    assert torch.equal(x_adv, model.seen[1])
    assert not torch.equal(x_adv, model.seen[0]) and not torch.equal(x_adv, model.seen[2])


# ---------------------------------------------------------------- on a small trained model


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN trained for ~2 s on the 10 shape classes, and 200 test images (20 per class) it
    classifies about 99 % right; at 6/255 PGD-10 leaves it robust on about half to two thirds of them.
    200 rather than fewer: one image is half a point, so the comparisons below hold on any CPU's floats
    (over six training seeds APGD-100 beat PGD-10 by 5.5 to 9 points)."""
    torch.manual_seed(0)
    images, labels = make_shapes(40, size=16, seed=0)
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    model = Classifier(SmallCNN(10, width=8), [0.5] * 3, [0.25] * 3)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(15):
        for idx in torch.randperm(len(x)).split(50):
            loss = F.cross_entropy(model(x[idx].float() / 255), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_images, test_labels = make_shapes(20, size=16, seed=1)
    return model.eval(), torch.from_numpy(test_images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(test_labels)


def _robust(trained, **threat: Any) -> torch.Tensor:
    model, images, labels = trained
    pred = predict(model, images, device=CPU, threat=Threat(eps=6 / 255, **threat), labels=labels,
                   generator=torch.Generator().manual_seed(0))
    return pred == labels


def test_apgd_at_100_iterations_is_stronger_than_pgd_10(trained) -> None:
    model, images, labels = trained
    clean = predict(model, images, device=CPU) == labels
    pgd = _robust(trained)
    ce = _robust(trained, attack="apgd", steps=100)
    assert clean.float().mean() >= 0.9
    assert 0 < pgd.float().mean() < clean.float().mean()  # the model is neither hopeless nor untouchable here
    assert ce.float().mean() <= pgd.float().mean()
    assert ce.float().mean() < pgd.float().mean() - 0.03  # ~48 % against ~55 % on this model


def test_autoattack_robust_only_where_apgd_ce_is(trained) -> None:
    """AutoAttack runs the same seeded APGD-CE first and then only attacks further, so every image
    robust to it is robust to APGD-CE alone."""
    ce = _robust(trained, attack="apgd", steps=20)
    auto = _robust(trained, attack="autoattack", steps=20)
    assert auto.float().mean() <= ce.float().mean()
    assert not bool((auto & ~ce).any())
    assert bool(auto.any())  # something survives, so the comparison above is not vacuous


def test_autoattack_repeats_with_the_same_seed_and_stays_in_budget(trained) -> None:
    model, images, labels = trained
    x, y = images[:12].float() / 255, labels[:12]
    runs = [autoattack(model, x, y, eps=6 / 255, steps=5, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - x).abs().max().item() <= 6 / 255 + 1e-6
    assert runs[0].min().item() >= 0.0 and runs[0].max().item() <= 1.0
