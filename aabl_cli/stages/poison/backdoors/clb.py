"""CLB, the clean-label backdoor (Turner et al. 2019): target-class images only, labels kept.

The tool first trains a victim model on the clean folder (the `--arch` registry model,
Adam, crop+flip, as `scan` trains). Each chosen target-class image is then pushed away
from its own (target) label by PGD (eps 16/255, step 2/255, 30 steps, random start), so
its content is hard to learn and the model leans on the trigger instead; then the trigger,
a 3x3 (at 32 px) black-and-white checkerboard in all four corners, is stamped on top. The
ASR set (`--test`) gets the checkerboards only. Turner et al. attack an adversarially
trained model; ours is trained plainly (see docs/departures.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from aabl_cli.core.attacks import pgd
from aabl_cli.core.data import ImageDataset
from aabl_cli.core.device import make_generator, prepare_model, seed_everything
from aabl_cli.core.fuse import AttackView
from aabl_cli.core.loop import fit, host_images, step_schedule
from aabl_cli.core.models import build_model, channel_stats
from aabl_cli.stages.poison.backdoors.base import Built, Context, place_for_training
from aabl_cli.stages.poison.backdoors.patches import corner_trigger

DEFAULT_EPOCHS = 5
EPS = 16 / 255
STEP_SIZE = 2 / 255
STEPS = 30
LR = 1e-3  # Adam, as scan's naive model
BATCH = 128


def train_victim(dataset: ImageDataset, *, arch: str, epochs: int, device: torch.device, seed: int,
                 quiet: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train the model PGD attacks, plainly, on the clean folder; returns it in eval mode and a report."""
    seed_everything(seed)
    images, labels = place_for_training(dataset, device, quiet=quiet)
    mean, std = channel_stats(host_images(dataset, stream=not isinstance(images, torch.Tensor)))
    model = prepare_model(build_model(arch, num_classes=len(dataset.classes), image_size=dataset.image_size,
                                      mean=mean, std=std), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    history = fit(model, images, labels, optimizer=optimizer, epochs=epochs, batch_size=BATCH,
                  schedule=step_schedule(LR), device=device, seed=seed, desc="clb: victim model", quiet=quiet)
    report = {"arch": arch, "epochs": epochs, "optimizer": "adam", "lr": LR, "batch_size": BATCH,
              "victim_train_acc": history[-1]["train_acc"] if history else None}
    return model.eval(), report


def build_trigger(model: nn.Module, *, target: int, device: torch.device,
                  seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training-set trigger: CPU float (N, 3, H, W) target-class images in [0, 1] -> PGD away
    from the target label (|delta| <= EPS), then the corner checkerboards; on the CPU."""
    view = AttackView(model.eval())
    generator = make_generator(device, seed)

    def trigger(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        y = torch.full((x.shape[0],), target, dtype=torch.int64, device=device)
        x_adv = pgd(view, x, y, eps=EPS, step_size=STEP_SIZE, steps=STEPS, random_start=True, generator=generator)
        return corner_trigger(x_adv).cpu()
    return trigger


def build(ctx: Context) -> Built:
    """Train the victim and PGD + checkerboard the training set; the ASR set (`ctx.test`) gets the checkerboards."""
    if ctx.test:
        return Built(corner_trigger)
    data = ctx.dataset(min_classes=2)
    model, report = train_victim(data, arch=ctx.arch, epochs=ctx.epochs or DEFAULT_EPOCHS, device=ctx.device,
                                 seed=ctx.seed, quiet=ctx.quiet)
    report.update({"eps": EPS, "step_size": STEP_SIZE, "steps": STEPS, "random_start": True})
    return Built(build_trigger(model, target=ctx.target, device=ctx.device, seed=ctx.seed), report=report)
