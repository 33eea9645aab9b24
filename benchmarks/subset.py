"""Copy a seeded, class-balanced random subset of an image folder (never "the first N").

    python benchmarks/subset.py SRC DST --size 10000 --seed 0
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from aabl_cli.core.data import list_image_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--size", type=int, default=10_000,
                        help="images in all (split evenly over classes); 0: every image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    listing = list_image_folder(args.src)
    per_class = args.size // len(listing.classes) if args.size else len(listing.files)
    rng = random.Random(args.seed)
    copied = 0
    for label in range(len(listing.classes)):
        files = [rel for rel, lab in listing.files if lab == label]
        for rel in sorted(rng.sample(files, min(per_class, len(files)))):
            target = args.dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.src / rel, target)
            copied += 1
    print(f"wrote {copied} images of {len(listing.classes)} classes (at most {per_class} a class) to {args.dst}")


if __name__ == "__main__":
    main()
