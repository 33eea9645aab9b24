"""core.ema: the moving average's arithmetic and warm-up, its buffers, its resume state, and `fit` updating it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aabl_cli.core.ema import EMA
from aabl_cli.core.loop import fit, step_schedule
from aabl_cli.core.models import build_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_warm_up_decay_is_min_of_decay_and_1_plus_t_over_10_plus_t():
    ema = EMA(_net(), decay=0.9)
    decays = []
    for _ in range(100):
        decays.append(ema.current_decay())
        ema.update(ema.module)
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(2 / 11) and decays[10] == pytest.approx(0.55)
    assert decays[79] == pytest.approx(80 / 89) and decays[80] == decays[99] == 0.9  # capped from t = 80 on
    assert decays == [min(0.9, (1 + t) / (10 + t)) for t in range(100)]


def test_update_matches_a_hand_computation():
    model = _net()
    ema = EMA(model, decay=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items() if v.is_floating_point()}
    for t in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25 * (t + 1))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked += 1
        d = min(0.5, (1 + t) / (10 + t))  # 0.1, 2/11, 3/12
        live = model.state_dict()
        expected = {k: d * v + (1 - d) * live[k] for k, v in expected.items()}
        ema.update(model)
    averaged = ema.module.state_dict()
    for k, v in expected.items():
        assert torch.allclose(averaged[k], v, atol=1e-6), k
    assert not torch.allclose(averaged["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy
    assert int(averaged["1.num_batches_tracked"]) == 3  # integer buffers are copied
    assert torch.equal(model[0].bias, start["0.bias"] + 1.5)  # the live model is untouched


def test_the_average_is_a_float32_copy_outside_autograd_and_leaves_fixed_buffers_exact():
    model = build_model("cnn", num_classes=3, image_size=(16, 16), mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1])
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    for _ in range(5):
        ema.update(model)
    assert ema.module is not model
    assert all(v.dtype == torch.float32 for v in ema.module.state_dict().values() if v.is_floating_point())
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert torch.equal(ema.module.normalize.std, model.normalize.std)  # lerp of equal values is exact


def test_state_dict_round_trip_keeps_the_step_count():
    model = _net()
    ema = EMA(model, decay=0.9)
    for _ in range(4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
    state = ema.state_dict()
    assert int(state["steps"]) == 4
    other = EMA(_net(), decay=0.9)
    other.load_state_dict(state)
    assert other.steps == 4 and other.current_decay() == ema.current_decay()
    assert all(torch.equal(a, b) for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()))


def test_fit_updates_the_average_after_every_step():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=3, image_size=(16, 16))
    ema = EMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fit(model, images, labels, optimizer=optimizer, epochs=2, batch_size=8, schedule=step_schedule(0.05), ema=ema,
        device=torch.device("cpu"), quiet=True)
    assert ema.steps == 10  # 2 epochs x 5 batches
    live, averaged = model.state_dict(), ema.module.state_dict()
    assert not torch.equal(live["net.features.0.0.weight"], averaged["net.features.0.0.weight"])
