"""Pack CIFAR-10 for a machine it has to travel to: every training image and a seeded, class-balanced
subset of the test images, in a zip of the same layout (TOP/train/CLASS/*.jpg, TOP/test/CLASS/*.jpg).

    python benchmarks/pack.py SRC_ZIP OUT_ZIP [--test-images 2000] [--seed 0] [--max-mib 60]

The images' bytes are copied unchanged and stored, not compressed (JPEGs do not compress). The same
source and seed give the same zip, byte for byte: entries in the source's order, one fixed date.
"""

from __future__ import annotations

import argparse
import os
import random
import zipfile
from collections import defaultdict
from pathlib import Path

DATE = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: no trace of when or where it was packed


def choose(names: list[str], *, test_images: int, seed: int) -> list[str]:
    """The entries of `names` to keep, in their order: every TOP/train/ file and, of the TOP/test/ files,
    test_images // classes per class drawn with `seed` (fewer where a class is smaller)."""
    tests: dict[str, list[str]] = defaultdict(list)
    kept = set()
    for name in names:
        parts = name.split("/")
        if len(parts) != 4 or name.endswith("/"):
            continue  # directory entries and stray files: extraction recreates folders from the paths
        if parts[1] == "train":
            kept.add(name)
        elif parts[1] == "test":
            tests[parts[2]].append(name)
    if not kept or not tests:
        raise SystemExit("expected TOP/train/CLASS/FILE and TOP/test/CLASS/FILE entries (as in cifar10-jpeg.zip)")
    per_class = test_images // len(tests)
    rng = random.Random(seed)
    for cls in sorted(tests):
        kept.update(rng.sample(tests[cls], min(per_class, len(tests[cls]))))
    return [name for name in names if name in kept]


def pack(src: Path, out: Path, *, test_images: int, seed: int) -> dict[str, int]:
    """Write `out` (through a temporary sibling, so an existing `out` is complete); the entries per part."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    counts: dict[str, int] = defaultdict(int)
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as packed:
        for name in choose(source.namelist(), test_images=test_images, seed=seed):
            entry = zipfile.ZipInfo(name, date_time=DATE)
            entry.external_attr = 0o644 << 16
            packed.writestr(entry, source.read(name))
            counts[name.split("/")[1]] += 1
    os.replace(tmp, out)
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--test-images", type=int, default=2000, help="test images in all, split evenly over classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-mib", type=float, default=60.0,
                        help="fail above this size (MiB): what travels with a checkout is limited")
    args = parser.parse_args()
    counts = pack(args.src, args.out, test_images=args.test_images, seed=args.seed)
    mib = args.out.stat().st_size / 2**20
    print(f"wrote {args.out}: {counts.get('train', 0)} train and {counts.get('test', 0)} test images, {mib:.1f} MiB")
    if mib > args.max_mib:
        args.out.unlink()
        raise SystemExit(f"{args.out} is {mib:.1f} MiB, over --max-mib {args.max_mib:g}: pack fewer test images")


if __name__ == "__main__":
    main()
