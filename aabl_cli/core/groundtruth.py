"""The ground truth of a poisoned folder: `poison.csv` beside its class folders (`aabl poison` writes it)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

POISON_CSV = "poison.csv"


def read_ground_truth(root: Path, paths: list[str]) -> np.ndarray | None:
    """`poisoned` flags (0/1) from `root/poison.csv` in the order of `paths`, or None without one."""
    truth_path = Path(root) / POISON_CSV
    if not truth_path.is_file():
        return None
    try:
        with open(truth_path, newline="", encoding="utf-8-sig") as fh:
            flags = {row["path"]: int(row["poisoned"]) for row in csv.DictReader(fh)}
    except (KeyError, TypeError, ValueError, OSError, csv.Error):
        return None
    return np.array([flags.get(p, 0) for p in paths], dtype=np.int64)
