"""Shared-patch evidence: do a class's most robust images share a region of identical pixels?

A patch trigger (BadNets, Trojan, any stamped pattern) writes the same pixels at the same place
into every poisoned image, so across the poisons that region does not vary at all, while across
the class's ordinary images it varies as much as anywhere. A class that is robust by nature has
no such region: its robust images are ordinary images of it, only easier. The statistic is the
pixel spread (standard deviation over images, averaged over the channels and a small window)
among the class's robust images, as a share of the same spread among its typical images, at the
window where that share is smallest. Windows where the typical images do not vary either
(a constant border, a black background) are left out: nothing could stand out there.

Natural images can share a region too (objects photographed on white: a few dozen of every
CIFAR-10 class have the same pure-white corner), so a shared region is only a candidate. The
test that it is a trigger is causal: `transplant` paints the region of each robust image over
with the same region of a typical image of the class, and the scan's model is asked again. A
trigger taken away, the poisons fall back to their own classes; a white corner swapped for a
typical background leaves an airplane an airplane.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SHARED_PATCH_WINDOW = 3  # pixels a side: the smallest triggers of the field (BadNets) are 3x3
# A window counts only where the typical images vary at least this much (pixel values in [0, 1]):
# GTSRB's and CIFAR-10's images vary by 0.15-0.40 almost everywhere.
REFERENCE_SPREAD_MIN = 0.05


def spread_map(images: np.ndarray, window: int = SHARED_PATCH_WINDOW) -> np.ndarray:
    """Per-window pixel spread of `images` (N, H, W, C) uint8: the standard deviation over the
    images, in [0, 1] units, averaged over the channels and each `window` x `window` square."""
    # exact integer sums, so that identical pixels have a spread of exactly 0
    n = len(images)
    total = images.sum(axis=0, dtype=np.int64)
    squares = sum((chunk.astype(np.int64) ** 2).sum(axis=0) for chunk in np.array_split(images, max(1, n // 32)))
    variance = (n * squares - total * total) / float(n * n)
    std = (np.sqrt(np.maximum(variance, 0.0)) / 255.0).mean(axis=-1)
    size = min(window, std.shape[0], std.shape[1])
    return sliding_window_view(std, (size, size)).mean(axis=(-1, -2))


def _ratio_map(core: np.ndarray, reference: np.ndarray, window: int) -> np.ndarray:
    """Per window: `core`'s spread over `reference`'s, inf where the reference hardly varies."""
    if core.shape[1:] != reference.shape[1:]:
        raise ValueError(f"core images {core.shape[1:]} and reference images {reference.shape[1:]} differ in size")
    core_spread, ref_spread = spread_map(core, window), spread_map(reference, window)
    usable = ref_spread >= REFERENCE_SPREAD_MIN
    return np.where(usable, core_spread / np.maximum(ref_spread, REFERENCE_SPREAD_MIN), np.inf)


def shared_region(core: np.ndarray, reference: np.ndarray, threshold: float,
                  window: int = SHARED_PATCH_WINDOW) -> np.ndarray:
    """(H, W) bool: the pixels of every window whose spread ratio is at most `threshold`, grown
    by one pixel on each side (a trigger's edge blends into its neighbours' windows)."""
    ratio = _ratio_map(core, reference, window)
    size = min(window, core.shape[1], core.shape[2])
    mask = np.zeros(core.shape[1:3], dtype=bool)
    for row, col in zip(*np.nonzero(ratio <= threshold)):
        mask[max(0, row - 1):row + size + 1, max(0, col - 1):col + size + 1] = True
    return mask


def transplant(images: np.ndarray, donors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`images` with the pixels under `mask` taken from `donors` (cycled when fewer)."""
    out = images.copy()
    picks = donors[np.arange(len(images)) % len(donors)]
    out[:, mask] = picks[:, mask]
    return out


def shared_patch(core: np.ndarray, reference: np.ndarray, window: int = SHARED_PATCH_WINDOW) -> dict[str, Any]:
    """The smallest ratio of `core`'s pixel spread to `reference`'s over the image's windows.

    `core` and `reference`: (N, H, W, C) uint8 images of one size. Returns `ratio` (0: the core's
    images are identical in some window where the reference's vary; about 1: no shared region),
    `at` ([row, column] of the window's top-left pixel), `window`, and both spreads there;
    `ratio` is None when the reference varies nowhere.
    """
    ratio = _ratio_map(core, reference, window)
    if not np.isfinite(ratio).any():
        return {"ratio": None, "at": None, "window": window, "core_spread": None, "reference_spread": None}
    core_spread, ref_spread = spread_map(core, window), spread_map(reference, window)
    row, col = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
    return {"ratio": float(ratio[row, col]), "at": [int(row), int(col)], "window": window,
            "core_spread": float(core_spread[row, col]), "reference_spread": float(ref_spread[row, col])}
