"""fuse: the attack's view of a model folds batch norm away without changing its outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aabl_cli.core.fuse import AttackView
from aabl_cli.core.models import ARCHS, build_model


def _trained_a_little(arch: str, size: int = 16, num_classes: int = 4) -> torch.nn.Module:
    """A model whose batch-norm statistics and affine parameters are far from their initial values."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, image_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        x = torch.rand(8, 3, size, size) * 0.5 + 0.25
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, num_classes, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_view_matches_the_model_in_eval_mode(arch):
    model = _trained_a_little(arch)
    view = AttackView(model)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        got = view(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    if arch != "densenet121":  # densenet normalizes before each convolution: nothing to fold
        assert view.folded > 0


def test_small_cnn_folds_every_batch_norm():
    model = _trained_a_little("cnn")
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert AttackView(model).folded == batch_norms


def test_input_gradients_match():
    model = _trained_a_little("cnn")
    view = AttackView(model)
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    grads = []
    for net in (model, view):
        delta = torch.zeros_like(x, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(net(x + delta), y, reduction="sum")
        grads.append(torch.autograd.grad(loss, delta)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_refresh_follows_the_live_model():
    model = _trained_a_little("cnn")
    view = AttackView(model)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(2.0)
        stale = view(x)
        view.refresh()
        fresh = view(x)
        expected = model(x)
    assert not torch.allclose(stale, expected, atol=1e-3)
    assert torch.allclose(fresh, expected, atol=1e-4, rtol=1e-4)


def test_view_leaves_the_model_untouched():
    model = _trained_a_little("cnn")
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = AttackView(model)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    torch.autograd.grad(view(x).sum(), x)  # as the attacks differentiate: by the input only
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_untraceable_model_runs_unfused():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                return self.bn(self.conv(x))
            return self.conv(x)

    model = Branchy().eval()
    view = AttackView(model)
    assert view.folded == 0
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(view(x), model(x))


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(float)


def test_scores_match_a_straightforward_float32_path(tiny_data, cache_dir):
    """score_samples (folded batch norm, batched uint8 input) against the plain textbook loop,
    with the same fixed weights: same predictions, scores equal up to rounding, ranking intact."""
    from aabl_cli.core.attacks import ifgsm
    from aabl_cli.core.data import load_image_folder
    from aabl_cli.core.losses import sce
    from aabl_cli.stages.scan import score_samples

    data = load_image_folder(tiny_data, cache_dir=cache_dir, quiet=True)
    model = _trained_a_little("cnn", num_classes=len(data.classes))
    fast = score_samples(model, data.images, data.labels, device=torch.device("cpu"), eps=8 / 255,
                         step_size=2 / 255, steps=5, batch_size=7, quiet=True)
    model.eval()
    plain = []
    for i in range(len(data)):
        x = data.images[i:i + 1].float() / 255
        y = data.labels[i:i + 1]
        x_adv = ifgsm(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5)
        with torch.no_grad():
            plain.append(float(sce(model(x_adv), y)[0]))
    plain = np.array(plain)
    assert np.allclose(fast["score"], plain, rtol=1e-3, atol=1e-4)
    rho = np.corrcoef(_ranks(fast["score"]), _ranks(plain))[0, 1]
    assert rho > 0.99
    assert plain.std() > 0.1  # the scores are spread out, so the ranking test means something

