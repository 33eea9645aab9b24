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


def isolation_metrics(poisoned: np.ndarray, isolated: np.ndarray) -> dict[str, int | float]:
    """How well the isolated set catches the poison; both arguments are bool (N,) in dataset order.

    `poisoned` (count) and `rho` (its share of the set); `rho_vul`, the poison's share of the kept
    rest (0 when nothing is kept); `precision`, its share of the isolated set (0 when nothing is
    isolated); `recall`, the share of the poison isolated (NaN without poison).
    """
    kept = ~isolated
    return {
        "poisoned": int(poisoned.sum()),
        "rho": float(poisoned.mean()),
        "rho_vul": float(poisoned[kept].mean()) if kept.any() else 0.0,
        "precision": float(poisoned[isolated].mean()) if isolated.any() else 0.0,
        "recall": float(isolated[poisoned].mean()) if poisoned.any() else float("nan"),
    }
