"""Turn torchvision's CIFAR-10 or GTSRB download into the image folders aabl reads.

    python examples/export_torchvision.py cifar10 OUT [--download-dir DIR]
    python examples/export_torchvision.py gtsrb OUT [--download-dir DIR] [--size 32]

Writes OUT/train/<class>/<index>.png and OUT/test/<class>/<index>.png (lossless PNG; GTSRB
images resized to --size x --size, as the paper uses them). Class folders are CIFAR-10's
names, or GTSRB's two-digit class numbers.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image


def export(dataset: Sequence[tuple[Image.Image, int]], classes: Sequence[str], out: Path,
           size: int | None = None) -> int:
    """Write every (image, label) of `dataset` to out/<class>/<index>.png; returns the count."""
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(dataset) - 1, 0)))
    for index in range(len(dataset)):
        image, label = dataset[index]
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        image.save(out / classes[label] / f"{index:0{width}d}.png")
    return len(dataset)


def _load(name: str, root: Path) -> dict[str, tuple[Any, list[str]]]:
    from torchvision import datasets

    if name == "cifar10":
        splits = {"train": datasets.CIFAR10(root, train=True, download=True),
                  "test": datasets.CIFAR10(root, train=False, download=True)}
        return {k: (v, list(v.classes)) for k, v in splits.items()}
    splits = {"train": datasets.GTSRB(root, split="train", download=True),
              "test": datasets.GTSRB(root, split="test", download=True)}
    return {k: (v, [f"{c:02d}" for c in range(43)]) for k, v in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("cifar10", "gtsrb"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--download-dir", type=Path, default=Path("torchvision-data"))
    parser.add_argument("--size", type=int, default=None, help="resize to N x N (default: 32 for gtsrb)")
    args = parser.parse_args()
    size = args.size if args.size is not None else (32 if args.dataset == "gtsrb" else None)
    for split, (dataset, classes) in _load(args.dataset, args.download_dir).items():
        count = export(dataset, classes, args.out / split, size=size)
        print(f"wrote {count} images to {args.out / split}")


if __name__ == "__main__":
    main()
