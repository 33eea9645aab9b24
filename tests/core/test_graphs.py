"""The CUDA-graph attack: the same adversarial examples as the eager PGD loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aabl_cli.core.attacks import pgd
from aabl_cli.core.device import autocast
from aabl_cli.core.fuse import AttackView
from aabl_cli.core.graphs import GraphedAttack
from aabl_cli.core.models import build_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _setup(device: torch.device, n: int = 32):
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=4, image_size=(32, 32)).to(device).eval()
    x = torch.rand(n, 3, 32, 32, device=device)
    y = torch.randint(0, 4, (n,), device=device)
    return model, x, y


def test_cpu_runs_the_eager_loop_exactly():
    device = torch.device("cpu")
    model, x, y = _setup(device)
    attack = GraphedAttack(model, eps=8 / 255, step_size=2 / 255, steps=3, random_start=True, device=device)
    assert not attack.enabled
    for _ in range(2):
        got = attack(x, y, torch.Generator().manual_seed(5))
        want = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, random_start=True,
                   generator=torch.Generator().manual_seed(5))
        assert torch.equal(got, want)


def test_a_failed_recording_warns_and_falls_back_to_the_eager_steps(monkeypatch):
    device = torch.device("cpu")
    model, x, y = _setup(device)
    attack = GraphedAttack(model, eps=8 / 255, step_size=2 / 255, steps=3, random_start=False, device=device)
    attack.enabled = True  # as on a GPU, where the second call of a shape records

    def cannot_record(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(attack, "_record", cannot_record)
    want = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, random_start=False)
    assert torch.equal(attack(x, y), want)  # first sight of the shape: eager
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        assert torch.equal(attack(x, y), want)
    assert torch.equal(attack(x, y), want) and not attack._graphs


@pytest.fixture
def exact_cuda():
    """float32 convolutions without TF32 and with fixed algorithms, so eager and replay agree to rounding."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = (
        False, True, False)
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@cuda
@pytest.mark.parametrize("random_start", [True, False])
def test_graph_replay_matches_eager_pgd(exact_cuda, random_start):
    device = exact_cuda
    model, x, y = _setup(device)
    view = AttackView(model)
    attack = GraphedAttack(view, eps=8 / 255, step_size=2 / 255, steps=5, random_start=random_start, device=device,
                           amp=False)
    for seed in range(3):  # the first call runs eagerly, the second records, the third replays
        got = attack(x, y, torch.Generator(device).manual_seed(seed))
        want = pgd(view, x, y, eps=8 / 255, step_size=2 / 255, steps=5, random_start=random_start,
                   generator=torch.Generator(device).manual_seed(seed))
        assert (got - x).abs().max() <= 8 / 255 + 1e-6 and got.min() >= 0 and got.max() <= 1
        assert (got - want).abs().le(1e-6).float().mean() > 0.999, seed
    assert len(attack._graphs) == 1


@cuda
def test_replay_sees_weights_changed_in_place(exact_cuda):
    device = exact_cuda
    model, x, y = _setup(device)
    view = AttackView(model)
    attack = GraphedAttack(view, eps=8 / 255, step_size=2 / 255, steps=3, random_start=False, device=device,
                           amp=False)
    attack(x, y)
    before = attack(x, y)  # recorded
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    view.refresh()
    got = attack(x, y)
    want = pgd(view, x, y, eps=8 / 255, step_size=2 / 255, steps=3, random_start=False)
    assert (got - want).abs().le(1e-6).float().mean() > 0.999
    assert (got - before).abs().gt(1e-3).float().mean() > 0.2  # the new weights gave other examples


@cuda
def test_bf16_replay_reaches_the_eager_loss():
    """In bf16 a rare gradient sign differs between kernels; the attack must still be as strong."""
    device = torch.device("cuda")
    model, x, y = _setup(device, n=256)
    view = AttackView(model)
    attack = GraphedAttack(view, eps=8 / 255, step_size=2 / 255, steps=5, random_start=False, device=device)
    for _ in range(3):
        got = attack(x, y)
    with autocast(device):
        want = pgd(view, x, y, eps=8 / 255, step_size=2 / 255, steps=5, random_start=False)
    with torch.no_grad():
        clean, loss_got, loss_want = (F.cross_entropy(view(v), y).item() for v in (x, got, want))
    assert loss_want > clean
    assert loss_got == pytest.approx(loss_want, rel=0.02)


@cuda
def test_host_batches_reach_the_gpu_through_pinned_memory():
    from aabl_cli.core.pixels import batch_to_float

    batch = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    on_gpu = batch_to_float(batch, torch.device("cuda"))
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), batch_to_float(batch, torch.device("cpu")))
