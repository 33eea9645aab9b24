"""Model registry: `--arch` name -> a network that takes [0, 1] pixels.

Normalization (the training set's per-channel mean and std) is the model's first layer,
so attacks and their budgets live in plain pixel space. Up to 64 px the torchvision
networks get the CIFAR-style stem the paper uses (3x3 convolution, stride 1, no
max-pool); above that they keep the ImageNet stem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import nn

SMALL_INPUT = 64  # px: at or below this, use the CIFAR-style stem
STATS_BYTES = 1 << 18  # uint8 read at a time by channel_stats: small, so a streamed set stays bounded


class Normalize(nn.Module):
    """(x - mean) / std per channel; stored in the state dict so checkpoints carry it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Normalization followed by a network; input (N, 3, H, W) in [0, 1], output logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class MeanMaxPool(nn.Module):
    """Global average and global max pooling side by side: (N, C, H, W) -> (N, 2C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small residual CNN for CPUs, tests and the demo.

    Batch norm and residual connections matter here: a plain max-pool CNN stays at chance
    under PGD adversarial training at CPU scale, this one learns. Downsampling is by max
    pooling: against strided convolutions it learned a 3x3 BadNets patch five times
    faster on CIFAR-10 (ASR 51 % against 10 % after 5 epochs), since a small bright patch
    survives a max but is averaged away by a stride. The head pools globally (so any size
    from 16 px works) by mean *and* max: a small trigger lights up one corner of the last
    feature map, which a mean alone dilutes 16-fold at 32 px. Against the mean alone, on
    4,000 BadNets-poisoned CIFAR-10 images after 20 epochs, it raised ASR from 88 % to 94 %
    and test accuracy from 57 % to 63 %, and the split's recall of the poison from 68 % to 84 %.
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w), _conv_bn(w, 2 * w), nn.MaxPool2d(2),
            _ResidualBlock(2 * w), _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _ResidualBlock(4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w),
        )
        self.head = nn.Sequential(MeanMaxPool(), nn.Linear(16 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _resnet(builder: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    def make(num_classes: int, image_size: int) -> nn.Module:
        net = builder(weights=None, num_classes=num_classes)
        if image_size <= SMALL_INPUT:
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net
    return make


def _vgg16(num_classes: int, image_size: int) -> nn.Module:
    net = torchvision.models.vgg16_bn(weights=None, num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        # The CIFAR VGG: conv features, global pooling, one linear layer.
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Linear(512, num_classes)
        # Five max-pools halve 32 px to 1; below 32 px drop the last ones instead of reaching 0.
        pools = [i for i, layer in enumerate(net.features) if isinstance(layer, nn.MaxPool2d)]
        keep = max(1, min(len(pools), image_size.bit_length() - 1))
        for i in pools[keep:]:
            net.features[i] = nn.Identity()
    return net


def _mobilenetv2(num_classes: int, image_size: int) -> nn.Module:
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        # Stride 1 in the stem and the second stage, as in the CIFAR MobileNetV2.
        net.features[0][0].stride = (1, 1)
        net.features[2].conv[1][0].stride = (1, 1)
    return net


def _densenet121(num_classes: int, image_size: int) -> nn.Module:
    net = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        net.features.conv0 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.features.pool0 = nn.Identity()
    return net


ARCHS: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn": lambda num_classes, image_size: SmallCNN(num_classes),
    "resnet18": _resnet(torchvision.models.resnet18),
    "resnet34": _resnet(torchvision.models.resnet34),
    "vgg16": _vgg16,
    "mobilenetv2": _mobilenetv2,
    "densenet121": _densenet121,
}


def build_model(arch: str, *, num_classes: int, image_size: int | Sequence[int],
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> Classifier:
    """A fresh, randomly initialised model for `arch` taking [0, 1] inputs of `image_size` px."""
    side = image_size if isinstance(image_size, int) else max(image_size)
    return Classifier(ARCHS[arch](num_classes, side), mean, std)


def channel_stats(images: Any, *, chunk: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of uint8 (N, 3, H, W) images (a tensor, or anything sliced
    like one: `core.stream.StreamedImages`), `chunk` images at a time (default: STATS_BYTES of them).
    Sums come from each chunk's histogram of the 256 levels, exact whatever the chunk and the device,
    so a resident and a streamed set give the same numbers, and no wider copy of a chunk is made."""
    n, c, h, w = images.shape
    chunk = chunk or max(1, STATS_BYTES // (c * h * w))
    counts = torch.zeros(c, 256, dtype=torch.int64)
    for start in range(0, n, chunk):
        part = images[start:start + chunk]
        for ch in range(c):
            counts[ch] += torch.bincount(part[:, ch].reshape(-1), minlength=256).cpu()
    levels = torch.arange(256, dtype=torch.int64)
    count = max(1, n * h * w)
    mean = (counts * levels).sum(dim=1).double() / (255.0 * count)
    mean_sq = (counts * levels.square()).sum(dim=1).double() / (255.0**2 * count)
    std = (mean_sq - mean.square()).clamp_min(1e-6).sqrt()
    return mean.tolist(), std.tolist()
