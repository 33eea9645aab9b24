"""Fixed patch triggers: BadNets' white square, Trojan's watermark and CLB's corner checkerboards.

Patches are defined at their 32-px size and resized (nearest neighbour) to the same share of
any image, as BadNets' square is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Trojan (Liu et al. 2018) stamps a watermark-like logo. Ours is drawn here, not downloaded:
# 5 rows x 7 columns at 32 px, a black-and-white frame around a coloured mark, opaque.
TROJAN_GLYPH = (
    "KWKWKWK",
    "WRYGYRW",
    "KGBWBGK",
    "WRYGYRW",
    "KWKWKWK",
)
_COLOURS = {"K": (0, 0, 0), "W": (255, 255, 255), "R": (230, 30, 40), "G": (30, 200, 70), "B": (40, 60, 235),
            "Y": (250, 220, 30)}
CHECKER_AT_32PX = 3  # CLB: a 3x3 black-and-white checkerboard in each corner (Turner et al. 2019)


def scaled(pixels_at_32: int, side: int) -> int:
    """`pixels_at_32` scaled to an image side of `side` px, at least 1.

    Rounds half up (not Python's banker's rounding) so 48 px gets a 5-px patch, not 4.
    """
    return max(1, int(pixels_at_32 * side / 32 + 0.5))


def glyph_pattern(glyph: tuple[str, ...]) -> torch.Tensor:
    """A glyph of colour letters as float (3, rows, cols) in [0, 1]."""
    rgb = [[_COLOURS[c] for c in row] for row in glyph]
    return torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1) / 255


def checkerboard(size: int = CHECKER_AT_32PX) -> torch.Tensor:
    """A (3, size, size) checkerboard with white corners: the same under any flip, so all four corners match."""
    idx = torch.arange(size)
    white = ((idx[:, None] + idx[None, :]) % 2 == 0).float()
    return white.expand(3, size, size).clone()


def stamp(x: torch.Tensor, pattern: torch.Tensor, *, bottom: bool, right: bool) -> torch.Tensor:
    """Paste `pattern` (3, h, w), defined for a 32-px image, flush into one corner of every image of x.

    x: float (N, 3, H, W) in [0, 1]; returns a new tensor, x is untouched. The pasted patch
    has scaled(h, H) rows and scaled(w, W) columns; every other pixel is unchanged.
    """
    rows, cols = scaled(pattern.shape[-2], x.shape[-2]), scaled(pattern.shape[-1], x.shape[-1])
    patch = F.interpolate(pattern[None], size=(rows, cols), mode="nearest-exact")[0].to(x.device, x.dtype)
    top = x.shape[-2] - rows if bottom else 0
    left = x.shape[-1] - cols if right else 0
    out = x.clone()
    out[..., top:top + rows, left:left + cols] = patch
    return out


def badnets_trigger(x: torch.Tensor) -> torch.Tensor:
    """BadNets: a white square flush in the bottom-right corner, 3x3 px on a 32-px image.

    x: float (N, 3, H, W) in [0, 1]; returns a new tensor, x is untouched. The patch has
    round(3 * H / 32) rows and round(3 * W / 32) columns (at least 1), so it covers the
    same share of any image size. Every other pixel is returned unchanged.
    """
    rows, cols = scaled(3, x.shape[-2]), scaled(3, x.shape[-1])
    out = x.clone()
    out[..., -rows:, -cols:] = 1.0
    return out


def trojan_trigger(x: torch.Tensor) -> torch.Tensor:
    """Trojan: the TROJAN_GLYPH watermark, 5x7 px at 32 px, flush in the bottom-left corner."""
    return stamp(x, glyph_pattern(TROJAN_GLYPH), bottom=True, right=False)


def corner_trigger(x: torch.Tensor) -> torch.Tensor:
    """CLB's trigger: a 3x3 (at 32 px) black-and-white checkerboard in all four corners."""
    board = checkerboard()
    for bottom in (False, True):
        for right in (False, True):
            x = stamp(x, board, bottom=bottom, right=right)
    return x
