"""A procedural 10-class image set, generated in code (nothing to download).

Each class is a shape (disk, square, ring, cross, ...) in a random colour, position and
size on a noisy background. The shapes are large, so a small CNN learns them quickly and
they survive an 8/255 perturbation: adversarial training can visibly learn at CPU scale,
which natural images do not allow in minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Sorted, so that a class's index here is its label in the image folder.
CLASSES = ("checker", "cross", "diagonal", "disk", "frame", "hbars", "ring", "square", "triangle", "vbars")


def _masks(label: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    name = CLASSES[label]
    if name == "disk":
        return dy**2 + dx**2 <= r**2
    if name == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if name == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= r * 0.55)
    if name == "cross":
        return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))
    if name == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if name == "hbars":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r) & (np.floor((dy + r) / (r * 0.5)) % 2 == 0)
    if name == "vbars":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r) & (np.floor((dx + r) / (r * 0.5)) % 2 == 0)
    if name == "diagonal":
        return (np.abs(dy - dx) <= r * 0.35) & (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if name == "checker":
        cells = (np.floor((dy + r) / (r * 0.67)) + np.floor((dx + r) / (r * 0.67))) % 2 == 0
        return cells & (np.abs(dx) <= r) & (np.abs(dy) <= r)
    frame = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    return frame & ~((np.abs(dy) <= r * 0.6) & (np.abs(dx) <= r * 0.6))


def make_shapes(per_class: int, *, size: int = 16, seed: int = 0, contrast: float = 0.5,
                noise: float = 0.06, brightness: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each of the 10 classes: uint8 (N, size, size, 3) and int64 labels (N,).

    `contrast`: mean brightness step between shape and background (0..1); `noise`: std
    of the per-pixel Gaussian noise. Lower contrast and more noise make a naive model
    less robust to small perturbations, as natural images do. `brightness`: the darker
    of the two colours is drawn from [0.1, brightness - contrast] per channel, so the
    brighter one rarely exceeds `brightness` (it is 0.7-1.3 x contrast above the darker);
    well below 1, a white patch trigger stands out on every image.
    """
    rng = np.random.default_rng(seed)
    n = per_class * len(CLASSES)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        r = rng.uniform(0.28, 0.4) * size
        cy, cx = rng.uniform(r * 0.9, size - r * 0.9, size=2)
        base = rng.uniform(0.1, brightness - contrast, size=3)
        sign = rng.choice([-1.0, 1.0])
        shift = contrast * rng.uniform(0.7, 1.3, size=3)
        colour, back = (base + shift, base) if sign > 0 else (base, base + shift)
        mask = _masks(int(label), yy, xx, cy, cx, r)[..., None]
        img = np.where(mask, colour, back) + rng.normal(0, noise, size=(size, size, 3))
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_shapes(root: str | Path, *, per_class: int, size: int = 16, seed: int = 0, contrast: float = 0.5,
                 noise: float = 0.06, brightness: float = 0.9) -> Path:
    """Write `make_shapes` as an image folder `root/<class>/<index>.png`; returns `root`."""
    images, labels = make_shapes(per_class, size=size, seed=seed, contrast=contrast, noise=noise,
                                 brightness=brightness)
    return write_images(root, images, labels)


def write_images(root: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write uint8 (N, H, W, 3) `images` as `root/<class>/<index>.png`, with the shapes' class names
    (every class folder, even an empty one); returns `root`. Index i is the image's row, so
    `root/<class>/<i:05d>.png` is row i whatever class it is filed under."""
    root = Path(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / image_path(i, int(label)))
    return root


def image_path(index: int, label: int) -> str:
    """Where `write_images` puts row `index` with `label`, relative to its root."""
    return f"{CLASSES[label]}/{index:05d}.png"
