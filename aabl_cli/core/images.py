"""One image file in, one RGB uint8 array out: every read of a user's image goes through here.

Only the documented formats are decoded (`PIL_FORMATS`), and an image is refused from its
header when it holds more than `max_image_pixels` pixels, before its pixels are allocated.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from aabl_cli.core.errors import AablError

# Pillow's names for the formats read ("PPM" also reads PGM and PBM). Image.open tries these alone, so a
# PostScript or other file named .png never reaches Ghostscript or another decoder outside Pillow.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "WEBP")
FORMATS_READ = "PNG, JPEG, BMP, PPM/PGM/PBM and WebP"
# Pixels per image decoded at most, checked from the header before decoding: 40 M pixels is a
# 7,300 x 5,500 photo (120 MB as RGB); a 48-KB PNG can claim 400 M pixels (1.2 GB and more decoded).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# open_image's own check replaces Pillow's, whose warning does not name the file.
Image.MAX_IMAGE_PIXELS = None
MIN_SIDE = 16  # px: the smallest input every --arch takes (the small CNN pools three times)


def open_image(path: str | os.PathLike[str], *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               data: bytes | None = None) -> Image.Image:
    """Open an image file of a documented format, reading its header alone; every read of a
    user's image goes through here. Use it as `with open_image(path) as img:`.

    Pillow tries only `PIL_FORMATS`; an image of more than `max_image_pixels` pixels is refused
    before anything allocates its pixels. `data`: the file's bytes when the caller has read
    them (`path` then only names the file). Raises AablError naming the file.
    """
    try:
        img = Image.open(path if data is None else io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError as err:
        raise AablError(f"{path}: not a readable image (aabl reads {FORMATS_READ}); remove or replace it, "
                        "or pass --on-bad-file skip") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise AablError(f"{path}: unreadable ({err}); remove or replace it, or pass --on-bad-file skip") from err
    width, height = img.size
    if width * height > max_image_pixels:
        img.close()
        raise AablError(f"{path}: {width}x{height} px is {width * height} pixels, more than the cap of "
                        f"{max_image_pixels} pixels per image, so it was not decoded (a decompression bomb?); "
                        f"pass --max-image-pixels {width * height} to read it, remove it, "
                        "or pass --on-bad-file skip")
    return img


def decode_image(path: str | os.PathLike[str], size: tuple[int, int] | None = None, *,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data: bytes | None = None) -> np.ndarray:
    """Decode one file to an RGB uint8 array (H, W, 3), resized (bilinear) to `size` if given.

    `data`: the file's bytes when already read (see `open_image`). Raises AablError naming the
    file when it is not a readable image of a documented format or holds more than
    `max_image_pixels` pixels.
    """
    with open_image(path, max_image_pixels=max_image_pixels, data=data) as img:
        try:
            img.load()
            rgb = _to_rgb(img)
        except (OSError, SyntaxError, ValueError) as err:
            raise AablError(f"{path}: unreadable ({err}); remove or replace it, or pass --on-bad-file skip") from err
    if size is not None and (rgb.height, rgb.width) != tuple(size):
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the top 8 bits rather than PIL's clipping conversion.
        arr = np.asarray(img, dtype=np.int64)
        scale = 257 if arr.max() > 255 else 1
        img = Image.fromarray(np.clip(arr // scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def header_size(path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int] | AablError:
    """(H, W) from the header, or why the file will not be decoded."""
    try:
        with open_image(path, max_image_pixels=max_image_pixels) as img:
            return img.height, img.width
    except AablError as err:
        return err
