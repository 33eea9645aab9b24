"""WaNet (Nguyen & Tran, ICLR 2021): a small, smooth warp of the whole image is the trigger.

A k x k field of random offsets, normalised to a mean magnitude of 1, is upsampled
(bicubic) to the image size and added, scaled by `strength / size`, to the identity
sampling grid; `grid_sample` then resamples the image through it. In pixels each point
moves by at most `strength / 2 * max|field|` (about 0.5-1 px at k=4, s=0.5).

Noise mode: for every poisoned image, CROSS_RATIO others get the same warp plus a random
per-pixel offset of up to half a pixel and keep their label, so the network must learn
the exact warp rather than any warp. The field comes from a fixed seed (not --seed), so a
training set and its `--test` set carry the same trigger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aabl_cli.stages.poison.backdoors.base import Built, Context

K = 4  # control points per side of the warp field
STRENGTH = 0.5  # s: how far the field moves pixels
GRID_RESCALE = 1.0  # the original's grid_rescale (1: the field is used as drawn)
CROSS_RATIO = 2  # noise-mode images per poisoned image
FIELD_SEED = 0


def control_field(k: int = K, seed: int = FIELD_SEED) -> torch.Tensor:
    """The warp's control points: float (1, 2, k, k), uniform in [-1, 1], scaled to mean |value| 1."""
    field = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return field / field.abs().mean()


def _identity(size: tuple[int, int]) -> torch.Tensor:
    ys, xs = torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1])
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), dim=-1)[None]  # grid_sample reads (x, y)


def warp_grid(size: tuple[int, int], *, field: torch.Tensor, strength: float = STRENGTH,
              grid_rescale: float = GRID_RESCALE) -> torch.Tensor:
    """The sampling grid (1, H, W, 2) in grid_sample's [-1, 1] coordinates for images of `size` = (H, W)."""
    offsets = F.interpolate(field, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    scale = torch.tensor([size[1], size[0]], dtype=offsets.dtype)  # the original divides by the side
    return ((_identity(size) + strength * offsets / scale) * grid_rescale).clamp(-1, 1)


def max_shift_px(grid: torch.Tensor) -> float:
    """The largest distance in pixels that `grid` (1, H, W, 2) moves any pixel from where it was."""
    h, w = grid.shape[1:3]
    half = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=grid.dtype)
    return float(((grid - _identity((h, w))) * half).norm(dim=-1).max())


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample x (N, 3, H, W) in [0, 1] through `grid` (1 or N, H, W, 2); bilinear, so a linear
    ramp moves by exactly its slope times the displacement."""
    grid = grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)


def noise_grid(grid: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` noise-mode grids: `grid` plus uniform offsets of up to one grid step (half a pixel)."""
    h, w = grid.shape[1:3]
    jitter = torch.rand(count, h, w, 2, generator=generator) * 2 - 1
    return (grid + jitter / torch.tensor([w, h], dtype=grid.dtype)).clamp(-1, 1)


class WarpTrigger:
    """The fixed warp for any image size (one grid per size, built once) and its noise mode."""

    def __init__(self, *, k: int = K, strength: float = STRENGTH, grid_rescale: float = GRID_RESCALE,
                 seed: int = FIELD_SEED) -> None:
        self.field = control_field(k, seed)
        self.strength, self.grid_rescale = strength, grid_rescale
        self._grids: dict[tuple[int, int], torch.Tensor] = {}
        self.shifts: dict[str, float] = {}  # "HxW" -> the largest pixel shift of the warp at that size

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        if size not in self._grids:
            self._grids[size] = warp_grid(size, field=self.field, strength=self.strength,
                                          grid_rescale=self.grid_rescale)
            self.shifts[f"{size[0]}x{size[1]}"] = max_shift_px(self._grids[size])
        return self._grids[size]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self.grid((int(x.shape[-2]), int(x.shape[-1]))))

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: each image through its own randomly jittered copy of the warp."""
        grid = self.grid((int(x.shape[-2]), int(x.shape[-1])))
        return warp(x, noise_grid(grid, x.shape[0], generator))


def build(ctx: Context) -> Built:
    """The fixed warp and its noise mode; the report's `max_shift_px` fills in per image size as images are
    warped (it is the trigger's own dict, so poison.json gets every size that occurred)."""
    trigger = WarpTrigger()
    return Built(trigger, noise=trigger.noise,
                 report={"field": trigger.field.flatten().tolist(), "max_shift_px": trigger.shifts})
