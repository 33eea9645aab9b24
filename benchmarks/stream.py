"""The streamed data path against the resident one, side by side in one run.

    python benchmarks/stream.py WORK [--images 8000] [--size 128] [--budget 64M] [--batches 8]
        [--scan-images 1000] [--scan-size 64]

Generates WORK/data, `--images` seeded `--size`-px PNGs in 10 classes (8,000 at 128 px: 375 MiB
decoded), decodes it once into WORK/cache, then in one subprocess per path (so each peak RSS is its
own):
  - prepares training as scan does (`channel_stats` over the set, then the data path),
  - times the data path alone: `--batches` batches of 128 in a seeded random order, read, augmented
    (crop + flip) and converted to float, as `core.loop.fit` does,
  - times the same path feeding a forward pass of `cnn` at batch 128 (eval mode, no gradients),
and reports images/s and peak RSS (VmHWM). The resident side takes the whole set (`--data-memory
1T`), the streamed side `--budget`. Then it runs `aabl scan` end to end on the first `--scan-images`
images (at `--scan-size` px, 1 epoch, 1 iFGSM step) on both paths and compares the scores.csv bytes.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 128
CLASSES = 10
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def generate(root: Path, images: int, size: int) -> None:
    """Class colour, stripes and noise per image (as the tests' folders), seeded; written once."""
    from PIL import Image

    if root.exists():
        return
    rng = np.random.default_rng(0)
    tmp = root.with_name(root.name + ".tmp")
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(images):
        label = i % CLASSES
        colour = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 197 + 80) % 256], dtype=np.float64)
        img = np.broadcast_to(colour, (size, size, 3)).copy()
        img[((yy if label % 2 else xx) // (2 + label % 3)) % 2 == 0] *= 0.5
        img += rng.normal(0, 12, img.shape)
        folder = tmp / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.png")
    tmp.rename(root)


def subset(data: Path, out: Path, count: int) -> None:
    """The first `count` images of `data` (in dataset order, by class) as hard links."""
    if out.exists():
        return
    from aabl_cli.core.data import list_image_folder

    listing = list_image_folder(data)
    step = max(1, len(listing.files) // count)
    for rel, _ in listing.files[::step][:count]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(data / rel, out / rel)


def child(data: Path, cache: Path, budget: str, batches: int) -> dict[str, object]:
    """One path's numbers, in this (fresh) process."""
    import torch

    from aabl_cli.core.data import load_image_folder
    from aabl_cli.core.device import prepare_model
    from aabl_cli.core.loop import batch_augment, choose_path, host_images, place_on_device, sampling_generator
    from aabl_cli.core.models import build_model, channel_stats
    from aabl_cli.core.pixels import batch_to_float
    from aabl_cli.core.stream import read_batches

    torch.set_num_threads(1)
    dev = torch.device("cpu")
    dataset = load_image_folder(data, cache_dir=cache, quiet=True)
    path = choose_path(dataset, dev, data_memory=budget)
    mean, std = channel_stats(host_images(dataset, stream=path.streamed))
    images, _ = place_on_device(dataset, dev, stream=path.streamed)
    model = prepare_model(build_model("cnn", num_classes=len(dataset.classes), image_size=dataset.image_size,
                                      mean=mean, std=std), dev).eval()
    generator = sampling_generator(dev, 0)
    perm = torch.randperm(len(dataset), generator=generator)
    order = [perm[b * BATCH:(b + 1) * BATCH] for b in range(len(dataset) // BATCH)]

    def timed(indices: list[torch.Tensor], forward: bool) -> float:
        t0 = time.perf_counter()
        for chunk in read_batches(images, indices):
            x = batch_to_float(batch_augment(chunk, generator), dev)
            if forward:
                with torch.no_grad():
                    model(x)
        return len(indices) * BATCH / (time.perf_counter() - t0)

    data_rate = timed(order[:4 * batches], forward=False)
    forward_rate = timed(order[-batches:], forward=True)
    with open("/proc/self/status") as fh:
        peak = int(next(line for line in fh if line.startswith("VmHWM:")).split()[1])
    return {"mode": path.mode, "reason": path.reason, "data_ips": data_rate, "forward_ips": forward_rate,
            "peak_mib": peak / 1024, "decoded_mib": len(dataset) * dataset.row_bytes / 2**20}


def run_child(args: argparse.Namespace, budget: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, __file__, str(args.work), "--child", budget, "--batches", str(args.batches)],
                          env=CHILD_ENV, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def scan(args: argparse.Namespace, data: Path, budget: str, name: str) -> tuple[bytes, dict[str, object], float]:
    work = args.work / f"scan-{name}"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aabl_cli", "scan", str(data), "--workdir", str(work), "--cache-dir",
                           str(args.work / "cache"), "--arch", "cnn", "--epochs", "1", "--steps", "1", "--image-size",
                           str(args.scan_size), "--device", "cpu", "--data-memory", budget, "--quiet", "--json"],
                          env=CHILD_ENV, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads(done.stdout)
    return (work / "scan" / "scores.csv").read_bytes(), summary["data_path"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--budget", default="64M")
    parser.add_argument("--batches", type=int, default=8, help="batches timed with the forward pass (x4 without)")
    parser.add_argument("--scan-images", type=int, default=1000)
    parser.add_argument("--scan-size", type=int, default=64)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data, cache = args.work / "data", args.work / "cache"
    if args.child is not None:
        print(json.dumps(child(data, cache, args.child, args.batches)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    generate(data, args.images, args.size)
    print(f"data: {args.images} images of {args.size} px ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    t0 = time.perf_counter()
    first = run_child(args, args.budget)  # the first decode happens here, streamed: its peak is in this row
    print(f"first decode and streamed measurement: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    streamed, resident = run_child(args, args.budget), run_child(args, "1T")
    small = args.work / "subset"
    subset(data, small, args.scan_images)
    scores_r, path_r, seconds_r = scan(args, small, "1T", "resident")
    scores_s, path_s, seconds_s = scan(args, small, "1K", "streamed")

    print("| path | data path img/s | + `cnn` forward img/s | peak RSS MiB |\n| --- | ---: | ---: | ---: |")
    for row in (resident, streamed):
        print(f"| {row['mode']} | {row['data_ips']:.0f} | {row['forward_ips']:.1f} | {row['peak_mib']:.0f} |")
    print(f"| streamed, first run (decode included) | {first['data_ips']:.0f} | {first['forward_ips']:.1f} | "
          f"{first['peak_mib']:.0f} |")
    print(f"\nstreamed/resident: data path {streamed['data_ips'] / resident['data_ips']:.1%}, with the forward pass "
          f"{streamed['forward_ips'] / resident['forward_ips']:.1%}; decoded {resident['decoded_mib']:.0f} MiB; "
          f"streamed reason: {streamed['reason']}")
    print(f"scan of {args.scan_images} images at {args.scan_size} px: resident {seconds_r:.0f} s ({path_r['mode']}), "
          f"streamed {seconds_s:.0f} s ({path_s['mode']}); scores.csv identical: {scores_r == scores_s}")


if __name__ == "__main__":
    main()
