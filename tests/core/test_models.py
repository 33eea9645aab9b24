"""Model registry: every --arch builds, takes [0, 1] inputs of 16 to 224 px, normalizes inside."""

import pytest
import torch
from torch import nn

from aabl_cli.core.models import ARCHS, Normalize, build_model, channel_stats
from aabl_cli.options import ARCH_CHOICES


def test_cli_choices_are_the_registry():
    assert set(ARCH_CHOICES) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("size", [16, 32])
def test_every_arch_classifies_small_inputs(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_large_inputs_use_the_imagenet_stem(arch):
    model = build_model(arch, num_classes=3, image_size=224).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 3)
    if arch == "resnet18":
        assert model.net.conv1.stride == (2, 2)
        assert isinstance(model.net.maxpool, nn.MaxPool2d)
        small = build_model(arch, num_classes=3, image_size=32)
        assert small.net.conv1.stride == (1, 1) and isinstance(small.net.maxpool, nn.Identity)


def test_normalization_is_the_first_layer_and_in_the_state_dict():
    model = build_model("cnn", num_classes=2, image_size=16, mean=[0.2, 0.4, 0.6], std=[0.5, 0.25, 0.125])
    assert isinstance(model.normalize, Normalize)
    state = model.state_dict()
    assert torch.allclose(state["normalize.mean"].flatten(), torch.tensor([0.2, 0.4, 0.6]))
    x = torch.full((1, 3, 2, 2), 0.6)
    assert torch.allclose(model.normalize(x)[0, :, 0, 0], torch.tensor([0.8, 0.8, 0.0]))


def test_channel_stats_match_a_direct_computation():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=7)
    x = images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)), atol=1e-9)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_channel_stats_of_a_dataset_on_the_gpu():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    (mean_gpu, std_gpu), (mean, std) = channel_stats(images.cuda()), channel_stats(images)
    assert mean_gpu + std_gpu == pytest.approx(mean + std)
