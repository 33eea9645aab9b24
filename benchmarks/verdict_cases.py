"""The verdict benchmark's matrix (benchmarks/verdict.py runs it): its cases, their names and the scales.

A case is one set to scan and split, named `<dataset>-clean-seed<N>` or
`<dataset>-<backdoor>-<rate>pct-<frequent|rare>`; `CASES[scale]` lists a scale's in the order they run.
"""

from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from reproduce import CATEGORY as REPRODUCE_CATEGORY
from reproduce import ZIPS, scan_options, settings

from aabl_cli.stages.poison import Backdoor
from aabl_cli.stages.poison.backdoors.base import Built
from aabl_cli.stages.poison.backdoors.patches import scaled

# The random-colour patch: 3x3 px at 32 px (scaled like BadNets'), colours drawn with the case's seed,
# flush against the image's edge at a (row, column) place that neither BadNets nor Trojan takes.
PATCH_AT_32PX = 3
PATCH_PLACES = {"randpatch-tl": ("top", "left"), "randpatch-cr": ("centre", "right")}
CATEGORY = {**REPRODUCE_CATEGORY, **{name: "A" for name in PATCH_PLACES}}
CATEGORY_A = ("badnets", "trojan", *PATCH_PLACES, "iab")
CATEGORY_B = ("blend", "wanet", "ssba")
DATASETS = ("gtsrb", "cifar10")  # GTSRB first: its scans are the shorter
TARGETS = ("frequent", "rare")
CLEAN_SEEDS = (0, 1, 2, 3, 4)
TABLE7_RATE = 0.20  # the paper's Table 7 poisons CIFAR-10 at 1, 5 and 20 %

# scale -> dataset -> settings; `train_images` as in reproduce.py (None: every image)
SCALES: dict[str, dict[str, dict]] = {
    "cpu": {dataset: settings("cpu", dataset) for dataset in ZIPS},
    # the test's: the fake folders whole, a small CNN, one epoch
    "tiny": {dataset: {"arch": "cnn", "train_images": None, "scan_epochs": 1} for dataset in ZIPS},
}


@dataclass(frozen=True)
class Case:
    """One set to scan and split: a clean subset (`backdoor` "none", no rate or target) or a poisoned one.

    `target` is the role of the target class ("frequent" or "rare"), resolved on the subset's counts;
    `seed` seeds the subset, the poison and the scan."""

    dataset: str
    backdoor: str
    rate: float | None = None
    target: str | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        if self.backdoor == "none":
            return f"{self.dataset}-clean-seed{self.seed}"
        return f"{self.dataset}-{self.backdoor}-{round(100 * self.rate)}pct-{self.target}"


def _poisoned(dataset: str, backdoors: tuple[str, ...], rate: float) -> list[Case]:
    return [Case(dataset, b, rate, t) for b in backdoors for t in TARGETS]


def cpu_cases() -> list[Case]:
    """The cpu matrix, cheap and telling first: tier by tier, GTSRB before CIFAR-10 in each."""
    tiers = [
        lambda d: [Case(d, "none")] + _poisoned(d, CATEGORY_A, 0.10),
        lambda d: _poisoned(d, CATEGORY_A, 0.05) + (_poisoned(d, ("badnets",), TABLE7_RATE) if d == "cifar10" else []),
        lambda d: [Case(d, "none", seed=s) for s in CLEAN_SEEDS[1:]],
        lambda d: _poisoned(d, CATEGORY_A, 0.01),
        lambda d: _poisoned(d, CATEGORY_B, 0.10),
    ]
    return [case for tier in tiers for dataset in DATASETS for case in tier(dataset)]


CASES = {"cpu": cpu_cases(),
         "tiny": [Case("gtsrb", "none"), Case("gtsrb", "badnets", 0.10, "frequent"),
                  Case("gtsrb", "randpatch-cr", 0.10, "rare")]}


def cases_of(scale: str, only: str = "") -> list[Case]:
    """The cases of `scale` in matrix order; with `only` (comma-separated globs on the case name) those it names."""
    cases = CASES[scale]
    patterns = [p for p in only.split(",") if p]
    if not patterns:
        return cases
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in cases)]
    if unmatched:
        raise SystemExit(f"--only {unmatched[0]!r} names no case of the {scale} scale; `--list` shows them")
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def random_patch(name: str, *, seed: int) -> Backdoor:
    """The random-colour patch backdoor `name` (a PATCH_PLACES key), its colours drawn with `seed`."""
    colours = np.random.default_rng(seed).integers(0, 256, (3, PATCH_AT_32PX, PATCH_AT_32PX))
    pattern = torch.tensor(colours, dtype=torch.float32) / 255
    row, col = PATCH_PLACES[name]

    def trigger(x: torch.Tensor) -> torch.Tensor:
        """The patch on float (N, 3, H, W) in [0, 1], scaled to the image; every other pixel unchanged."""
        h, w = x.shape[-2:]
        rows, cols = scaled(PATCH_AT_32PX, h), scaled(PATCH_AT_32PX, w)
        patch = F.interpolate(pattern[None], size=(rows, cols), mode="nearest-exact")[0].to(x.device, x.dtype)
        top = {"top": 0, "centre": (h - rows) // 2, "bottom": h - rows}[row]
        left = {"left": 0, "centre": (w - cols) // 2, "right": w - cols}[col]
        out = x.clone()
        out[..., top:top + rows, left:left + cols] = patch
        return out

    return Backdoor(name, f"{PATCH_AT_32PX}x{PATCH_AT_32PX} random-colour patch, {row} {col}",
                    lambda ctx: Built(trigger), {"patch_at_32px": PATCH_AT_32PX, "position": f"{row} {col}, flush",
                                                 "colours": colours.tolist(), "colour_seed": seed})


def is_current(result: dict, scale: str) -> bool:
    """Whether a stored result scanned the subset size and with the settings `scale` now gives its dataset.

    The precision is the one the scan ran in, not compared: a bf16 scale runs in float32 on a CPU without
    bf16 instructions (reproduce.py's `machine_precision`), and the two differ by rounding only."""
    wanted = SCALES[scale][result["dataset"]]
    options = scan_options(wanted, argparse.Namespace(seed=result["seed"]))
    ran = {k: v for k, v in (result.get("scan") or {}).items() if k != "precision"}
    return result.get("train_images") == wanted["train_images"] and ran == {
        k: v for k, v in options.items() if k != "precision"}
