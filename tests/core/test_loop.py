"""core.loop: batched augmentation, the step and one-cycle schedules, and `fit`, which trains without
touching a file and sets the learning rate every batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aabl_cli.core.attacks import Threat
from aabl_cli.core.loop import batch_augment, fit, lr_at, make_schedule, onecycle_at, onecycle_schedule, step_schedule
from aabl_cli.core.models import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize(("size", "pad"), [(16, 2), (32, 4)])
def test_batch_augment_only_crops_and_flips(size, pad):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (48, 3, size, size), dtype=torch.uint8, generator=gen)
    out = batch_augment(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    seen = set()
    for i in range(len(images)):
        padded = F.pad(images[i], (pad, pad, pad, pad))
        match = None
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[:, dy:dy + size, dx:dx + size]
                for flip in (False, True):
                    if torch.equal(out[i], crop.flip(-1) if flip else crop):
                        match = (dy, dx, flip)
        assert match is not None, f"row {i} is not a shifted/flipped copy of its input"
        seen.add(match)
    # it does augment: both flips and several shifts occur in 48 rows
    assert {m[2] for m in seen} == {False, True}
    assert len({m[:2] for m in seen}) > 5


def test_batch_augment_is_seeded():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = batch_augment(images, torch.Generator().manual_seed(4))
    b = batch_augment(images, torch.Generator().manual_seed(4))
    c = batch_augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lr_at_drops_tenfold_at_each_milestone():
    ms = [50, 75, 90]
    assert lr_at(0, lr=0.1, milestones=ms) == pytest.approx(0.1)
    assert lr_at(49, lr=0.1, milestones=ms) == pytest.approx(0.1)
    assert lr_at(50, lr=0.1, milestones=ms) == pytest.approx(0.01)
    assert lr_at(74, lr=0.1, milestones=ms) == pytest.approx(0.01)
    assert lr_at(75, lr=0.1, milestones=ms) == pytest.approx(0.001)
    assert lr_at(90, lr=0.1, milestones=ms) == pytest.approx(0.0001)
    assert lr_at(99, lr=0.1, milestones=ms) == pytest.approx(0.0001)
    assert lr_at(3, lr=0.1, milestones=[]) == pytest.approx(0.1)


def test_step_schedule_is_lr_at_and_constant_without_milestones():
    schedule = step_schedule(0.1, [2, 4])
    assert [schedule(e) for e in range(6)] == [lr_at(e, lr=0.1, milestones=[2, 4]) for e in range(6)]
    assert {step_schedule(1e-3)(e) for e in range(10)} == {1e-3}


def test_step_schedule_keeps_each_epochs_rate_for_all_its_batches():
    """Fractional epochs (epoch + batch / batches) take their epoch's rate exactly: default runs stay bit-identical."""
    schedule = step_schedule(0.1, [50, 75, 90])
    for epoch in (0, 49, 50, 74, 75, 89, 90, 99):
        for batches in (1, 7, 391):
            assert {schedule(epoch + b / batches) for b in range(batches)} == {lr_at(epoch, lr=0.1,
                                                                                    milestones=[50, 75, 90])}
    assert make_schedule("step", lr=0.1, epochs=100, milestones=[50])(50.5) == schedule(50)


def test_onecycle_rises_to_the_peak_at_40_percent_and_falls_to_zero():
    lr, epochs, batches = 0.2, 10, 50
    schedule = onecycle_schedule(lr, epochs)
    times = [e + b / batches for e in range(epochs) for b in range(batches)]
    rates = [schedule(t) for t in times]
    assert rates[0] == 0.0
    assert schedule(4.0) == pytest.approx(lr)  # the peak: 40 % of 10 epochs
    assert max(rates) == pytest.approx(lr)
    assert schedule(2.0) == pytest.approx(lr / 2) and schedule(7.0) == pytest.approx(lr / 2)  # linear both ways
    assert schedule(1.3) == pytest.approx(lr * 1.3 / 4) and schedule(8.5) == pytest.approx(lr * 1.5 / 6)
    peak = times.index(4.0)
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1]))  # changes every batch, up
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))  # then down
    assert rates[-1] == pytest.approx(lr / batches / 6) and rates[-1] < lr / 100  # ~0 at the last batch
    assert onecycle_at(float(epochs), lr=lr, epochs=epochs) == 0.0
    assert make_schedule("onecycle", lr=lr, epochs=epochs)(3.3) == schedule(3.3)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the learning rate of every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates: list[float] = []

    def step(self, closure=None):
        self.rates.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_fit_sets_the_rate_of_every_batch_and_records_each_epochs_first():
    x, y = _toy()  # 40 images, batch 8: 5 batches an epoch
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=3, image_size=(16, 16))
    optimizer = RecordingSGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = onecycle_schedule(0.05, 3)
    history = fit(model, x, y, optimizer=optimizer, epochs=3, batch_size=8, schedule=schedule, device=CPU,
                  quiet=True)
    assert optimizer.rates == [schedule(e + b / 5) for e in range(3) for b in range(5)]
    assert len(set(optimizer.rates[:5])) == 5  # five rates within the first epoch
    assert [r["lr"] for r in history] == [schedule(0), schedule(1), schedule(2)]


def _toy(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    return images, torch.randint(0, 3, (40,), generator=gen)


def _fit(x, y, **options):
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=3, image_size=(16, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fit(model, x, y, optimizer=optimizer, batch_size=8, schedule=step_schedule(0.05, [2]), device=CPU,
                  quiet=True, **options)
    return model, history


def test_fit_returns_one_row_per_epoch_and_calls_on_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = _toy()
    seen = []
    _, history = _fit(x, y, epochs=3, seed=1, on_epoch=lambda done, rows: seen.append((done, len(rows))))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.05, 0.005])
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert all(0 <= r["train_acc"] <= 1 and r["train_loss"] > 0 for r in history)
    assert list(tmp_path.iterdir()) == []  # the loop writes nothing


def test_fit_is_seeded_and_adversarial_training_differs_from_plain():
    x, y = _toy()
    a, _ = _fit(x, y, epochs=1, seed=1)
    b, _ = _fit(x, y, epochs=1, seed=1)
    c, _ = _fit(x, y, epochs=1, seed=2)
    d, _ = _fit(x, y, epochs=1, seed=1, threat=Threat(eps=8 / 255, step_size=4 / 255, steps=1))
    same = [torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values())]
    assert all(same)
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), d.state_dict().values()))


def test_compiled_training_matches_eager():
    """--compile: the same losses as eager training (64 images, batch 32: no partial batch to drop)."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 3, (64,))
    histories = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("cnn", num_classes=3, image_size=(32, 32))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        threat = Threat(eps=8 / 255, step_size=2 / 255, steps=1, random_start=True)
        histories.append(fit(model, x, y, optimizer=optimizer, epochs=2, batch_size=32, schedule=step_schedule(0.01),
                             threat=threat, device=torch.device("cpu"), seed=0, compile=compiled, quiet=True))
    eager, compiled = histories
    assert [r["train_loss"] for r in compiled] == pytest.approx([r["train_loss"] for r in eager], rel=1e-3)
    assert eager[0]["train_loss"] != eager[1]["train_loss"]
