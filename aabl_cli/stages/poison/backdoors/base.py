"""What a backdoor's builder gets (`Context`) and gives back (`Built`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aabl_cli.core.data import ImageDataset, load_image_folder
from aabl_cli.core.errors import AablError
from aabl_cli.core.images import MIN_SIDE
from aabl_cli.core.loop import choose_path, place_on_device
from aabl_cli.core.progress import log
from aabl_cli.core.stream import Images

Trigger = Callable[[torch.Tensor], torch.Tensor]  # float (N, 3, H, W) in [0, 1] -> the same, triggered
NoiseTrigger = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Context:
    """The run a backdoor is built for. `epochs` is None for backdoors that train nothing."""

    root: Path
    classes: list[str]
    target: int
    seed: int
    test: bool
    pattern: str = "image"
    epochs: int | None = None
    arch: str = "cnn"
    device: torch.device = torch.device("cpu")
    trigger_file: Path | None = None
    cache_dir: Path | None = None
    quiet: bool = False

    def dataset(self, *, min_classes: int) -> ImageDataset:
        """The source folder decoded for training (the most common size; unreadable files skipped)."""
        data = load_image_folder(self.root, on_bad_file="skip", cache_dir=self.cache_dir, min_classes=min_classes,
                                 warn_empty=False, quiet=self.quiet)
        h, w = data.image_size
        if min(h, w) < MIN_SIDE:
            raise AablError(f"{self.root}: the images are {w}x{h} px, but the networks this backdoor trains need at "
                            f"least {MIN_SIDE} px; enlarge the images, or use badnets, blend, trojan or wanet")
        return data

    def placed(self, data: ImageDataset) -> tuple[Images, torch.Tensor]:
        """`data` where a backdoor's network trains on it (`place_for_training`)."""
        return place_for_training(data, self.device, quiet=self.quiet)


def place_for_training(data: ImageDataset, device: torch.device, *, quiet: bool) -> tuple[Images, torch.Tensor]:
    """`data` resident where a network trains on it, or streamed from the decode cache when it does not fit
    the automatic memory budget (`core.memory`), which is then logged: poison.json records nothing that
    depends on free memory, so that a seeded run repeats byte for byte."""
    path = choose_path(data, device)
    if path.streamed:
        log(f"poison: streaming the images from the decode cache: {path.reason}", quiet=quiet)
    return place_on_device(data, device, stream=path.streamed)


@dataclass
class Built:
    """A backdoor ready to poison.

    `trigger` poisons; `noise` (WaNet) makes the label-keeping noise images; `report` is
    recorded in poison.json (training settings and what was measured); `weights`, for a
    trained trigger, are written as trigger.safetensors so that `--test` can reuse them.
    """

    trigger: Trigger
    noise: NoiseTrigger | None = None
    report: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None
