"""What `aabl report` reads: a work directory's scan/, split/ and (when there) train/, read and cross-checked."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aabl_cli.core.errors import AablError
from aabl_cli.core.workdir import Workdir, read_summary


@dataclass
class SplitTable:
    """split.csv as arrays, in dataset order."""

    paths: list[str]
    labels: np.ndarray
    scores: np.ndarray
    kept: np.ndarray
    poisoned: np.ndarray | None


@dataclass
class Inputs:
    """Everything the page shows, read and checked."""

    workdir: Path
    scan: dict[str, Any]
    split: dict[str, Any]
    table: SplitTable
    train: dict[str, Any] | None
    history: list[dict[str, float]] | None


def _read_json(path: Path, stage: str, fix: str) -> dict[str, Any]:
    try:
        data = read_summary(path, stage)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AablError(f"{path} is damaged or unreadable ({str(err).splitlines()[0]}); {fix}") from err
    if not isinstance(data, dict):
        raise AablError(f"{path} is damaged (not a JSON object); {fix}")
    return data


def _read_split_csv(path: Path, *, samples: int, classes: int, fix: str) -> SplitTable:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            has_truth = "poisoned" in (reader.fieldnames or [])
            rows = [(r["path"], int(r["label"]), float(r["score"]), int(r["kept"]),
                     int(r["poisoned"]) if has_truth else 0) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
        raise AablError(f"{path} is damaged or unreadable ({err}); {fix}") from err
    if len(rows) != samples:
        raise AablError(f"{path} has {len(rows)} rows but split.json counts {samples} images; {fix}")
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    scores = np.array([r[2] for r in rows], dtype=np.float64)
    if len(rows) and (labels.min() < 0 or labels.max() >= classes or not np.isfinite(scores).all()):
        raise AablError(f"{path} holds labels outside the scan's {classes} classes or non-finite scores; {fix}")
    return SplitTable(paths=[r[0] for r in rows], labels=labels, scores=scores,
                      kept=np.array([r[3] for r in rows], dtype=bool),
                      poisoned=np.array([r[4] for r in rows], dtype=bool) if has_truth else None)


def _read_history(path: Path) -> list[dict[str, float]]:
    """history.csv rows as floats; empty cells (no validation set) are left out of their row."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
        raise AablError(f"{path} is damaged or unreadable ({err}); run `aabl train` again") from err


def read_inputs(workdir: Path) -> Inputs:
    """Read and cross-check a work directory's stage outputs; an AablError says which command to run."""
    wd = Workdir(workdir)
    workdir = wd.root
    if not workdir.is_dir():
        raise AablError(f"work directory {workdir} does not exist; run `aabl scan DATA --workdir {workdir}` and "
                        f"`aabl split --workdir {workdir}` first")
    rescan, resplit = f"run `aabl scan DATA --workdir {workdir}` again", f"run `aabl split --workdir {workdir}` again"
    if not wd.scan.json.is_file():
        raise AablError(f"no scan in {workdir} ({wd.scan.json} is missing); "
                        f"run `aabl scan DATA --workdir {workdir}` first")
    if not wd.split.json.is_file():
        raise AablError(f"no split in {workdir} ({wd.split.json} is missing); "
                        f"run `aabl split --workdir {workdir}` first")
    scan = _read_json(wd.scan.json, "scan", rescan)
    split = _read_json(wd.split.json, "split", resplit)
    try:
        classes, samples = [str(c) for c in scan["classes"]], int(split["samples"])
        for key in ("data", "dataset_fingerprint"):
            str(scan[key])
        for key in ("threshold", "kept_share", "kept", "isolated"):
            float(split[key])
        rows = split["per_class"]
        if not isinstance(split["settings"], dict) or not isinstance(rows, list) or len(rows) != len(classes):
            raise ValueError("settings or per_class")
        for row in rows:
            str(row["class"]), float(row["share_of_data"]), float(row["share_of_isolated"])
        str(split["verdict"])
    except (KeyError, TypeError, ValueError) as err:
        raise AablError(f"{workdir}: scan.json or split.json lacks or garbles {err}; {resplit}") from err
    if split.get("dataset_fingerprint") != scan["dataset_fingerprint"]:
        raise AablError(f"{wd.split.json} was made from another scan (the dataset fingerprints "
                        f"differ); {resplit}")
    table = _read_split_csv(wd.split.split_csv, samples=samples, classes=len(classes), fix=resplit)
    train = history = None
    if wd.train.json.is_file():
        train = _read_json(wd.train.json, "train", f"run `aabl train --workdir {workdir}` again")
        if wd.train.history.is_file():
            history = _read_history(wd.train.history)
    return Inputs(workdir=workdir, scan=scan, split=split, table=table, train=train, history=history)
