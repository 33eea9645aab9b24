"""IAB, the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), trained by the tool.

Two small, fully convolutional networks give every image its own trigger: a pattern
network G (x -> pattern in [0, 1]) and a mask network M (x -> mask in [0, 1]); the
poisoned image is `x + (G(x) - x) * M(x)`. Training follows the original in two stages:

1. M alone, for `epochs`: the mask norm loss (LAMBDA_NORM times how far each mask pixel
   lies above MASK_DENSITY) keeps masks small, the diversity loss (distance of two inputs
   over the distance of their masks) makes different images get different masks.
2. G and a classifier (the `--arch` registry model) jointly, M frozen, for `epochs`: in
   each batch a share P_POISON of the images carry their own trigger and the target
   label, a share P_CROSS carry another image's trigger and keep their label (so a
   trigger only works on its own image), the rest stay clean; G also pays the diversity
   loss on its patterns.

Unlike the original (hundreds of epochs of a PreAct-ResNet18 with crop and rotation),
the defaults here are a few epochs of the small CNN without augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aabl_cli.core.checkpoint import load_trigger
from aabl_cli.core.device import make_generator, prepare_model, seed_everything
from aabl_cli.core.errors import AablError
from aabl_cli.core.models import build_model, channel_stats
from aabl_cli.core.pixels import batch_to_float
from aabl_cli.core.progress import log, progress
from aabl_cli.core.stream import Images
from aabl_cli.stages.poison.backdoors.base import Built, Context

DEFAULT_EPOCHS = 10
MASK_DENSITY = 0.032  # the share of the image a mask may cover before the norm loss bites
LAMBDA_NORM = 100.0
LAMBDA_DIV = 1.0
P_POISON = 0.1  # share of each training batch that carries its own trigger (relabelled)
P_CROSS = 0.1  # share that carries another image's trigger (label kept)
LR_TRIGGER = 0.01  # Adam, betas (0.5, 0.9), for G and M, as the original
LR_CLASSIFIER = 0.01  # SGD, momentum 0.9, weight decay 5e-4, as the original
BATCH = 128
WIDTH = 16  # channels of the trigger networks' first layer
_EPS = 1e-7
# Added to the outputs' distance under the diversity ratio. The original's 1e-7 lets two near-empty masks
# give ratios of 1e3-1e5 in one batch, which throws the mask network between empty and full masks; on GTSRB
# (10,000 images, 10 epochs) it ended empty (mean mask 0.0) and the poison was relabelled, unchanged
# images. 0.01 bounds the ratio near 30 (typical ratios are 2-3) and kept masks at 0.7-1.9 % there.
DIV_FLOOR = 0.01
# A mean mask under this is no trigger: the poisoned images would be their sources, relabelled.
EMPTY_MASK = 1e-3


class TriggerNet(nn.Module):
    """x (N, 3, H, W) in [0, 1] -> (N, out_channels, H, W) in (0, 1).

    Downsamples twice for context, then upsamples back to the input's own size and sees
    the input again, so it works at any size of 4 px and up and keeps fine detail.
    """

    def __init__(self, out_channels: int, width: int = WIDTH) -> None:
        super().__init__()
        w = width
        self.encode = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        )
        self.decode = nn.Sequential(nn.Conv2d(2 * w + 3, w, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(w, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = F.interpolate(self.encode(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.decode(torch.cat([context, x], dim=1)))


def mask_of(mask_net: TriggerNet, x: torch.Tensor) -> torch.Tensor:
    """M(x) sharpened towards 0 or 1 around 0.5, the original's threshold: tanh(20 m - 10) / 2 + 0.5."""
    return torch.tanh(20 * mask_net(x) - 10) / (2 + _EPS) + 0.5


def apply_trigger(x: torch.Tensor, pattern_net: TriggerNet, mask_net: TriggerNet,
                  source: torch.Tensor | None = None) -> torch.Tensor:
    """x with the trigger of `source` (default: x itself): x + (G(s) - x) * M(s), in [0, 1]."""
    s = x if source is None else source
    return x + (pattern_net(s) - x) * mask_of(mask_net, s)


def diversity(a: torch.Tensor, b: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of dist(a, b) / (dist(out_a, out_b) + DIV_FLOOR), dist the per-sample RMS
    difference: the original's ratio, bounded where two outputs are alike."""
    def dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # + _EPS**2 under the root: an image paired with itself must give a zero gradient, not sqrt'(0) = inf
        return ((u - v).pow(2).flatten(1).mean(dim=1) + _EPS**2).sqrt()

    return (dist(a, b) / (dist(out_a, out_b) + DIV_FLOOR)).mean()


def _batches(n: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs (batch, a second random batch of the same size) covering the set once."""
    perm = torch.randperm(n, generator=generator, device=generator.device)
    other = torch.randperm(n, generator=generator, device=generator.device)
    return [(perm[s:s + BATCH], other[s:s + BATCH]) for s in range(0, n, BATCH) if len(perm[s:s + BATCH]) >= 3]


def train_iab(images: Images, labels: torch.Tensor, *, num_classes: int, target: int, arch: str,
              epochs: int, device: torch.device, seed: int, quiet: bool = False
              ) -> tuple[TriggerNet, TriggerNet, dict[str, Any]]:
    """Train M, then G with a classifier, on uint8 `images` (N, 3, H, W) and int64 `labels`.

    Returns G and M in eval mode and a report: the settings and, measured on the training
    images at the end, the classifier's clean accuracy, its attack success rate on the
    non-target images, and the mean mask (the share of the image a trigger covers).
    """
    seed_everything(seed)
    generator = make_generator(images.device, seed)
    pattern_net, mask_net = TriggerNet(3).to(device), TriggerNet(1).to(device)
    mean, std = channel_stats(images)
    classifier = prepare_model(build_model(arch, num_classes=num_classes, image_size=tuple(images.shape[-2:]),
                                           mean=mean, std=std), device)
    n = images.shape[0]

    opt_m = torch.optim.Adam(mask_net.parameters(), lr=LR_TRIGGER, betas=(0.5, 0.9))
    for epoch in progress(range(epochs), total=epochs, desc="iab: mask network", unit="epoch", quiet=quiet):
        total, batches = torch.zeros((), device=device), _batches(n, generator)
        for idx, idx2 in batches:
            x, x2 = batch_to_float(images[idx], device), batch_to_float(images[idx2], device)
            m, m2 = mask_of(mask_net, x), mask_of(mask_net, x2)
            loss = LAMBDA_NORM * F.relu(m - MASK_DENSITY).mean() + LAMBDA_DIV * diversity(x, x2, m, m2)
            opt_m.zero_grad(set_to_none=True)
            loss.backward()
            opt_m.step()
            total += loss.detach()
        log(f"iab: mask network epoch {epoch + 1}/{epochs}: loss {float(total) / max(1, len(batches)):.4f}",
            quiet=quiet)
    mask_net.eval().requires_grad_(False)
    covered = mean_mask(mask_net, images, device)
    if covered < EMPTY_MASK:
        raise AablError(f"the iab mask network trained to an empty mask (it covers {covered:.2%} of the image): "
                        f"the poisoned images would be their sources, relabelled, with no trigger. Nothing was "
                        f"written; try another --seed or more --epochs")

    opt_g = torch.optim.Adam(pattern_net.parameters(), lr=LR_TRIGGER, betas=(0.5, 0.9))
    opt_c = torch.optim.SGD(classifier.parameters(), lr=LR_CLASSIFIER, momentum=0.9, weight_decay=5e-4)
    for epoch in progress(range(epochs), total=epochs, desc="iab: generator + classifier", unit="epoch",
                          quiet=quiet):
        total, batches = torch.zeros((), device=device), _batches(n, generator)
        for idx, idx2 in batches:
            x, x2 = batch_to_float(images[idx], device), batch_to_float(images[idx2], device)
            y = labels[idx].to(device)
            n_bd, n_cross = max(1, round(P_POISON * len(idx))), max(1, round(P_CROSS * len(idx)))
            cut = n_bd + n_cross
            poisoned = apply_trigger(x[:n_bd], pattern_net, mask_net)
            crossed = apply_trigger(x[n_bd:cut], pattern_net, mask_net, source=x2[n_bd:cut])
            inputs = torch.cat([poisoned, crossed, x[cut:]])
            targets = torch.cat([torch.full_like(y[:n_bd], target), y[n_bd:]])
            classifier.train()
            loss = F.cross_entropy(classifier(inputs), targets) + LAMBDA_DIV * diversity(
                x[n_bd:cut], x2[n_bd:cut], pattern_net(x[n_bd:cut]), pattern_net(x2[n_bd:cut]))
            opt_g.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            opt_c.step()
            total += loss.detach()
        log(f"iab: generator + classifier epoch {epoch + 1}/{epochs}: loss "
            f"{float(total) / max(1, len(batches)):.4f}", quiet=quiet)
    pattern_net.eval().requires_grad_(False)
    classifier.eval()

    report = {"epochs": epochs, "arch": arch, "batch_size": BATCH, "mask_density": MASK_DENSITY,
              "lambda_norm": LAMBDA_NORM, "lambda_div": LAMBDA_DIV, "div_floor": DIV_FLOOR,
              "p_poison": P_POISON, "p_cross": P_CROSS, "lr_trigger": LR_TRIGGER, "lr_classifier": LR_CLASSIFIER,
              "width": WIDTH, "mean_mask": covered,  # M is frozen since its stage: its cover stands
              **_measure(classifier, pattern_net, mask_net, images, labels, target=target, device=device)}
    return pattern_net, mask_net, report


@torch.no_grad()
def mean_mask(mask_net: TriggerNet, images: Images, device: torch.device) -> float:
    """The share of the image M's masks cover, averaged over uint8 `images` (N, 3, H, W)."""
    total = 0.0
    for s in range(0, images.shape[0], 256):
        x = batch_to_float(images[s:s + 256], device)
        total += float(mask_of(mask_net, x).mean()) * len(x)
    return total / max(1, images.shape[0])


@torch.no_grad()
def _measure(classifier: nn.Module, pattern_net: TriggerNet, mask_net: TriggerNet, images: Images,
             labels: torch.Tensor, *, target: int, device: torch.device) -> dict[str, float]:
    correct = hits = others = 0
    for s in range(0, images.shape[0], 256):
        x, y = batch_to_float(images[s:s + 256], device), labels[s:s + 256].to(device)
        correct += int((classifier(x).argmax(1) == y).sum())
        keep = y != target
        if keep.any():
            hits += int((classifier(apply_trigger(x[keep], pattern_net, mask_net)).argmax(1) == target).sum())
            others += int(keep.sum())
    n = max(1, images.shape[0])
    return {"classifier_train_acc": correct / n, "classifier_train_asr": hits / max(1, others)}


def build_trigger(pattern_net: TriggerNet, mask_net: TriggerNet,
                  device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The poisoning trigger: CPU float (N, 3, H, W) in [0, 1] -> its own IAB trigger, on the CPU."""
    @torch.no_grad()
    def trigger(x: torch.Tensor) -> torch.Tensor:
        return apply_trigger(x.to(device), pattern_net, mask_net).clamp(0, 1).cpu()
    return trigger


def state(pattern_net: TriggerNet, mask_net: TriggerNet) -> dict[str, torch.Tensor]:
    """Both networks' weights under one namespace each, for a trigger file."""
    return {**{f"pattern.{k}": v for k, v in pattern_net.state_dict().items()},
            **{f"mask.{k}": v for k, v in mask_net.state_dict().items()}}


def from_state(tensors: dict[str, torch.Tensor], *, width: int, device: torch.device
               ) -> tuple[TriggerNet, TriggerNet]:
    """Rebuild G and M from `state()`'s tensors; raises RuntimeError when they do not fit."""
    pattern_net, mask_net = TriggerNet(3, width), TriggerNet(1, width)
    pattern_net.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("pattern.")}, strict=True)
    mask_net.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}, strict=True)
    return (pattern_net.to(device).eval().requires_grad_(False), mask_net.to(device).eval().requires_grad_(False))


def build(ctx: Context) -> Built:
    """Train G and M on the source folder, or load them from `ctx.trigger_file` (a trigger.safetensors)."""
    if ctx.trigger_file is not None:
        tensors, settings = load_trigger(ctx.trigger_file, backdoor="iab")
        try:
            pattern_net, mask_net = from_state(tensors, width=int(settings.get("width", WIDTH)), device=ctx.device)
        except (RuntimeError, ValueError, TypeError) as err:
            raise AablError(f"--trigger {ctx.trigger_file}: the tensors do not fit the iab networks "
                            f"({str(err).splitlines()[0]}); the file is damaged or from another aabl version") from err
        return Built(build_trigger(pattern_net, mask_net, ctx.device),
                     report={"loaded_from": str(Path(ctx.trigger_file).resolve()), "trained_with": settings})
    data = ctx.dataset(min_classes=2)
    images, labels = ctx.placed(data)
    pattern_net, mask_net, report = train_iab(images, labels, num_classes=len(data.classes), target=ctx.target,
                                              arch=ctx.arch, epochs=ctx.epochs or DEFAULT_EPOCHS,
                                              device=ctx.device, seed=ctx.seed, quiet=ctx.quiet)
    if report["mean_mask"] > 2 * MASK_DENSITY or report["classifier_train_asr"] < 0.5:
        log(f"note: the iab trigger is not trained yet: its mask covers {report['mean_mask']:.1%} of the image (the "
            f"method aims at {MASK_DENSITY:.1%}) and the joint classifier follows it on "
            f"{report['classifier_train_asr']:.0%} of DATA's non-target images; raise --epochs", quiet=ctx.quiet)
    return Built(build_trigger(pattern_net, mask_net, ctx.device), report=report,
                 weights=state(pattern_net, mask_net))
