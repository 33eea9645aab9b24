"""Blend (Chen et al. 2017): a fixed pattern laid over the whole image at low opacity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aabl_cli.core.errors import AablError
from aabl_cli.core.images import decode_image
from aabl_cli.stages.poison.backdoors.base import Built, Context

OPACITY = 0.1  # of the blended pattern (Chen et al. 2017 call it alpha; the paper's value)
NOISE_SEED = 0  # fixed, not --seed: a train set and its --test set must carry the same noise trigger
PATTERNS = ("image", "noise")  # --pattern choices besides a file path


def blend_trigger(x: torch.Tensor, pattern: torch.Tensor, opacity: float = OPACITY) -> torch.Tensor:
    """Blend: `(1 - opacity) * x + opacity * pattern` (Chen et al. 2017).

    x: float (N, 3, H, W) in [0, 1]; pattern: float (3, h, w) in [0, 1], resized bilinearly
    to (H, W) when its size differs. Each pixel moves by at most `opacity`.
    """
    if tuple(pattern.shape[-2:]) != tuple(x.shape[-2:]):
        pattern = resize_pattern(pattern, (int(x.shape[-2]), int(x.shape[-1])))
    pattern = pattern.to(device=x.device, dtype=x.dtype)
    return ((1 - opacity) * x + opacity * pattern).clamp(0, 1)


def resize_pattern(pattern: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (3, h, w) pattern to `size` = (H, W); antialiased so shrinking a photo stays smooth."""
    resized = F.interpolate(pattern[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp(0, 1)


def load_pattern(pattern: str, size: tuple[int, int]) -> torch.Tensor:
    """The blend pattern as float (3, H, W) in [0, 1] for images of `size` = (H, W).

    `image`: scikit-image's bundled `coffee` photo (smooth, natural, no download);
    `noise`: uniform noise from a fixed seed; anything else: the path of an image file.
    Raises AablError for a path that is not a readable image.
    """
    if pattern == "noise":
        rng = np.random.default_rng(NOISE_SEED)
        return torch.from_numpy(rng.random((3, *size), dtype=np.float32))
    if pattern == "image":
        from skimage import data  # imported here: only blend needs it, and it is slow to import

        pixels = data.coffee()
    else:
        path = Path(pattern)
        if not path.is_file():
            raise AablError(f"--pattern {pattern}: no such file; give {' or '.join(PATTERNS)} or the path of an image")
        try:
            pixels = decode_image(path)
        except AablError as err:
            raise AablError(f"--pattern {pattern}: not a readable image; give {' or '.join(PATTERNS)} "
                            "or the path of a PNG/JPEG file") from err
    photo = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255  # np.array: a writable copy
    return resize_pattern(photo, size)


def build(ctx: Context) -> Built:
    """Blend with `ctx.pattern`; a bad --pattern fails here, before any output is written."""
    load_pattern(ctx.pattern, (32, 32))
    patterns: dict[tuple[int, int], torch.Tensor] = {}  # one resize per image size, not per batch

    def trigger(x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in patterns:
            patterns[size] = load_pattern(ctx.pattern, size)
        return blend_trigger(x, patterns[size])

    return Built(trigger)
