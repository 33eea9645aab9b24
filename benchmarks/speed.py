"""Throughput of aabl's three hot loops against a plain baseline written the common way.

    python benchmarks/speed.py DATA [--arch cnn] [--device auto] [--train-images 4096]
        [--score-images 2048] [--at-images 512] [--md benchmarks/SPEED.md]

On the same images (the first N of a seeded shuffle of the image folder DATA) and the same
initial weights, it times
  - a naive training epoch (Adam, crop + flip, batch 128),
  - the iFGSM scoring pass (eps 2/255, 5 steps, then SCE on the clean and attacked image),
  - a PGD-10 adversarial-training epoch (eps 8/255, step 2/255, SGD, batch 128),
once through aabl (`core.loop.fit`, `stages.scan.score_samples`) and once through the baseline:
torchvision `ImageFolder` + `DataLoader` with PIL transforms, float32, and the PGD loop of
torchattacks' shape (a fresh autograd graph per step, clamp to the eps ball and to [0, 1]).
Each side runs in its own subprocess, so its peak host memory (and GPU memory) is its own.
Prints a table of images/s and ratios and, with --md, writes it as Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cli_runner import publish

BATCH = 128
PHASES = ("naive training epoch", "scoring pass", "PGD-10 AT epoch")


def _subset(n_total: int, n: int, seed: int) -> list[int]:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def _model(arch: str, num_classes: int, image_size: int, device: torch.device) -> torch.nn.Module:
    from aabl_cli.core.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, image_size=image_size)
    return model.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _epochs(device: torch.device) -> int:
    """Training phases run this many epochs and time the last: on a GPU the first one pays for
    kernel loading, cuDNN's algorithm search and (with --compile) compilation."""
    return 2 if device.type == "cuda" else 1


def _projected_minutes(side: dict[str, float], n: int = 50_000, kept: int = 45_000) -> float:
    """The paper's recipe from the measured rates: 20 naive epochs on n images, one scoring
    pass, 100 PGD-10 epochs on the kept share (about 90 % after a 10 % split)."""
    seconds = 20 * n / side[PHASES[0]] + n / side[PHASES[1]] + 100 * kept / side[PHASES[2]]
    return seconds / 60


def _conv_share(run) -> float:
    """Share of the operator time (self time, all devices) spent in convolution kernels while `run()` runs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
    events = prof.key_averages()
    device_time = sum(getattr(e, "self_device_time_total", 0) for e in events)
    key = "self_device_time_total" if device_time > 0 else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events)
    conv = sum(getattr(e, key) for e in events if "conv" in e.key.lower() or "cudnn" in e.key.lower())
    return conv / total if total else float("nan")


# ---------------------------------------------------------------- aabl


def run_ours(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from aabl_cli.core.attacks import Threat
    from aabl_cli.core.data import load_image_folder
    from aabl_cli.core.device import prepare_model
    from aabl_cli.core.loop import fit, step_schedule
    from aabl_cli.stages.scan import score_samples

    data = load_image_folder(args.data, cache_dir=args.cache_dir, quiet=True)
    classes, size = len(data.classes), data.image_size[0]
    results = {}

    def epoch(indices: list[int], threat: Threat | None, optimizer_name: str) -> float:
        model = prepare_model(_model(args.arch, classes, size, device), device)
        if optimizer_name == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        images, labels = data.images[indices].to(device), data.labels[indices].to(device)
        _sync(device)
        history = fit(model, images, labels, optimizer=optimizer, epochs=_epochs(device), batch_size=BATCH,
                      schedule=step_schedule(optimizer.param_groups[0]["lr"]), threat=threat, device=device, seed=0,
                      compile=args.side == "compiled", desc="speed", quiet=True)
        _sync(device)
        return history[-1]["images_per_s"]

    n = len(data)
    results[PHASES[0]] = epoch(_subset(n, args.train_images, 1), None, "adam")
    model = prepare_model(_model(args.arch, classes, size, device), device)
    indices = _subset(n, args.score_images, 2)
    images, labels = data.images[indices].to(device), data.labels[indices].to(device)
    if device.type == "cuda":  # warm-up: kernel loading and cuDNN's algorithm search stay out of the timing
        score_samples(model, images[:2 * BATCH], labels[:2 * BATCH], device=device, eps=2 / 255, step_size=2 / 255,
                      steps=5, quiet=True)
    _sync(device)
    t0 = time.perf_counter()
    score_samples(model, images, labels, device=device, eps=2 / 255, step_size=2 / 255, steps=5, quiet=True)
    _sync(device)
    results[PHASES[1]] = len(indices) / (time.perf_counter() - t0)
    threat = Threat(eps=8 / 255, step_size=2 / 255, steps=10, random_start=True)
    results[PHASES[2]] = epoch(_subset(n, args.at_images, 3), threat, "sgd")
    results["peak host MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before profiling
    if args.profile:
        results["conv share (AT)"] = _conv_share(lambda: epoch(_subset(n, 2 * BATCH, 4), threat, "sgd"))
    return results


# ---------------------------------------------------------------- baseline


def _baseline_pgd(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, step_size: float,
                  steps: int, random_start: bool) -> torch.Tensor:
    """The usual PGD loop: mean cross-entropy, a fresh graph per step, clamps on the image."""
    images = images.clone().detach()
    adv = images.clone().detach()
    if random_start:
        adv = (adv + torch.empty_like(adv).uniform_(-eps, eps)).clamp(0, 1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = F.cross_entropy(model(adv), labels)
        grad = torch.autograd.grad(cost, adv)[0]
        adv = adv.detach() + step_size * grad.sign()
        adv = (images + (adv - images).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def run_baseline(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    from aabl_cli.core.losses import sce

    plain = torchvision.datasets.ImageFolder(args.data, transform=transforms.ToTensor())
    size = plain[0][0].shape[-1]
    augment = transforms.Compose([transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor()])
    augmented = torchvision.datasets.ImageFolder(args.data, transform=augment)
    classes, n = len(plain.classes), len(plain)
    pin = device.type == "cuda"
    results = {}

    def loader(dataset, indices: list[int], shuffle: bool) -> DataLoader:
        return DataLoader(Subset(dataset, indices), batch_size=BATCH, shuffle=shuffle, num_workers=args.workers,
                          pin_memory=pin, persistent_workers=False)

    def epoch(indices: list[int], adversarial: bool) -> float:
        model = _model(args.arch, classes, size, device)
        if adversarial:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(_epochs(device)):  # the last epoch is timed
            _sync(device)
            t0 = time.perf_counter()
            for x, y in loader(augmented, indices, shuffle=True):
                x, y = x.to(device), y.to(device)
                if adversarial:
                    model.eval()
                    x = _baseline_pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10, random_start=True)
                model.train()
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss.item()  # the usual per-batch logging
            _sync(device)
            seconds = time.perf_counter() - t0
        return len(indices) / seconds

    results[PHASES[0]] = epoch(_subset(n, args.train_images, 1), adversarial=False)
    model = _model(args.arch, classes, size, device).eval()
    indices = _subset(n, args.score_images, 2)
    if device.type == "cuda":  # warm-up, as on our side
        for x, y in loader(plain, indices[:2 * BATCH], shuffle=False):
            _baseline_pgd(model, x.to(device), y.to(device), eps=2 / 255, step_size=2 / 255, steps=5,
                          random_start=False)
    _sync(device)
    t0 = time.perf_counter()
    scores = []
    for x, y in loader(plain, indices, shuffle=False):
        x, y = x.to(device), y.to(device)
        x_adv = _baseline_pgd(model, x, y, eps=2 / 255, step_size=2 / 255, steps=5, random_start=False)
        with torch.no_grad():
            scores.append(sce(model(x_adv), y).cpu())
            scores.append(sce(model(x), y).cpu())
    _sync(device)
    results[PHASES[1]] = len(indices) / (time.perf_counter() - t0)
    results[PHASES[2]] = epoch(_subset(n, args.at_images, 3), adversarial=True)
    results["peak host MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before profiling
    if args.profile:
        results["conv share (AT)"] = _conv_share(lambda: epoch(_subset(n, 2 * BATCH, 4), adversarial=True))
    return results


# ---------------------------------------------------------------- driver


def _side(args: argparse.Namespace) -> None:
    from aabl_cli.core.device import resolve_device

    device = resolve_device(args.device)
    run = run_baseline if args.side == "baseline" else run_ours
    results = run(args, device)
    if device.type == "cuda":
        results["peak GPU MB"] = torch.cuda.max_memory_allocated() / 2**20
    if device.type == "cuda":
        results["device"] = torch.cuda.get_device_name(device)
    else:
        results["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(json.dumps(results))


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="image folder (class sub-folders)")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--score-images", type=int, default=2048)
    parser.add_argument("--at-images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also profile two AT batches per side and report the share of time in convolutions")
    parser.add_argument("--md", type=Path, default=None, help="append the table to this Markdown file")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size of every phase, both sides")
    parser.add_argument("--compile", action="store_true",
                        help="also time aabl with torch.compile (the --compile option of scan and train)")
    parser.add_argument("--side", choices=("ours", "compiled", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    BATCH = args.batch
    if args.side:
        _side(args)
        return
    sides = {}
    for side in ("baseline", "ours") + (("compiled",) if args.compile else ()):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the {side} side failed:\n{done.stderr[-4000:]}")
        sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, base = sides["ours"], sides["baseline"]
    compiled = sides.get("compiled")
    lines = [f"### `{args.arch}` on {ours['device']}", "",
             f"Images: {args.train_images} (naive epoch), {args.score_images} (scoring), {args.at_images} (AT epoch) "
             f"from `{Path(args.data).name}`; batch {BATCH}; baseline DataLoader workers {args.workers}"
             + ("" if "CPU" in ours["device"] else "; training phases timed on their second epoch") + ".", "",
             "| phase | baseline img/s | aabl img/s | ratio |" + (" --compile img/s | ratio |" if compiled else ""),
             "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if compiled else "")]
    for phase in PHASES:
        row = f"| {phase} | {base[phase]:.1f} | {ours[phase]:.1f} | {ours[phase] / base[phase]:.2f}x |"
        if compiled:
            row += f" {compiled[phase]:.1f} | {compiled[phase] / base[phase]:.2f}x |"
        lines.append(row)
    projected = {name: _projected_minutes(side) for name, side in sides.items()}
    row = (f"| projected A-ABL pipeline, 50,000 images (min) | {projected['baseline']:.1f} | {projected['ours']:.1f} | "
           f"{projected['baseline'] / projected['ours']:.2f}x |")
    if compiled:
        row += f" {projected['compiled']:.1f} | {projected['baseline'] / projected['compiled']:.2f}x |"
    lines.append(row)
    for key in ("peak host MB", "peak GPU MB"):
        if key in ours:
            lines.append(f"| {key} | {base[key]:.0f} | {ours[key]:.0f} | {ours[key] / base[key]:.2f}x |")
    if "conv share (AT)" in ours:
        lines.append(f"| time in convolution kernels (AT, profiled) | {base['conv share (AT)']:.0%} | "
                     f"{ours['conv share (AT)']:.0%} | |")
    publish(lines, args.md)


if __name__ == "__main__":
    main()
