"""The work directory the stages share, and every path in it.

    WORKDIR/scan/     scores.csv, model.safetensors, scan.json, scores.png, history.csv
    WORKDIR/split/    kept/, isolated/, split.csv, split.json
    WORKDIR/train/    model.safetensors, train.json, history.csv
    WORKDIR/report.html
    WORKDIR/.scan.partial/, .train.partial/   resume state, and the next output as it is assembled
    WORKDIR/.STAGE.lock                        the lock of the stage's writer

`Workdir(root).scan.scores` names a file; `Workdir(root).read("split")` reads a stage's JSON,
written by this version or an older one (whose keys are renamed on reading, see `RENAMED`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aabl_cli.core.fsutil import Place
from aabl_cli.core.lock import lock_path

STAGES = ("scan", "split", "train")  # the stages that write a folder of the work directory
RESUMABLE = ("scan", "train")  # the stages that train, and keep resume state while they do


def _file(name: str, doc: str | None = None) -> property:
    """A file of a stage folder: `folder.path / name`."""
    return property(lambda folder: folder.path / name, doc=doc or name)


@dataclass(frozen=True)
class StageFolder:
    """One stage's folder (its output, or the resume folder where the output is assembled) and its files."""

    path: Path
    stage: str

    def at(self, path: Path) -> StageFolder:
        """The same files in another folder (where the output is being written)."""
        return StageFolder(Path(path), self.stage)

    @property
    def json(self) -> Path:
        """The summary and settings of the stage: scan.json, split.json or train.json."""
        return self.path / f"{self.stage}.json"

    model = _file("model.safetensors", "The model (scan, train).")
    history = _file("history.csv", "One row per training epoch (scan, train).")
    state = _file("state.safetensors", "Resume state (scan, train; kept beside the model).")
    scores = _file("scores.csv", "One score per image, in dataset order (scan).")
    scores_png = _file("scores.png", "The score histogram (scan).")
    split_csv = _file("split.csv", "Kept or isolated, per image (split).")
    kept = _file("kept", "The kept images as an image folder (split).")
    isolated = _file("isolated", "The isolated images as an image folder (split).")


class Workdir:
    """Every path of a work directory (`--workdir`, default ./aabl-out)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Workdir({str(self.root)!r})"

    def stage(self, name: str) -> StageFolder:
        return StageFolder(self.root / name, name)

    @property
    def scan(self) -> StageFolder:
        return self.stage("scan")

    @property
    def split(self) -> StageFolder:
        return self.stage("split")

    @property
    def train(self) -> StageFolder:
        return self.stage("train")

    def partial(self, name: str) -> StageFolder:
        """The resume folder of a training stage, where its output is assembled until it is renamed into place."""
        return StageFolder(self.root / f".{name}.partial", name)

    def lock(self, name: str) -> Path:
        return lock_path(self.root, name)

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def outputs(self, *stages: str, note: str = "") -> list[Place]:
        """The folders that writing `stages` replaces: each stage's output and resume folder.
        `note` is added to their names in messages (e.g. " (written next)")."""
        places = [Place(self.stage(stage).path, f"the {stage} output{note}") for stage in stages]
        return places + [Place(self.partial(stage).path, f"the {stage} resume folder{note}")
                         for stage in stages if stage in RESUMABLE]

    def read(self, stage: str) -> dict[str, Any]:
        """The stage's JSON with this version's key names. Raises OSError or ValueError (JSON)."""
        return read_summary(self.stage(stage).json, stage)


# Keys older versions wrote, and their names now (one name per concept; see scratch/renames.md).
RENAMED: dict[str, dict[str, str]] = {
    "scan": {"dataset_root": "data", "naive_train_acc": "train_acc", "clean_acc": "acc", "adv_acc": "ra"},
    "split": {"dataset_root": "data", "gamma": "kept_share", "isolated_fraction": "isolated_share"},
    "train": {},
}


def read_summary(path: Path, stage: str) -> dict[str, Any]:
    """A stage's JSON file, its older keys renamed (`upgrade`). Raises OSError or ValueError."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return upgrade(data, stage) if isinstance(data, dict) else data


def upgrade(summary: dict[str, Any], stage: str) -> dict[str, Any]:
    """`summary` (a stage's JSON) with the keys an older version wrote under their present names,
    and `seconds` as a dict (`{"total": ...}`) where it was a number."""
    out = _renamed(summary, RENAMED.get(stage, {}))
    if stage == "split" and isinstance(out.get("per_class"), list):
        out["per_class"] = [_renamed(row, {"isolated_fraction": "isolated_share"}) if isinstance(row, dict) else row
                            for row in out["per_class"]]
    if isinstance(out.get("seconds"), (int, float)) and not isinstance(out["seconds"], bool):
        out["seconds"] = {"total": out["seconds"]}
    return out


def _renamed(row: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """`row` with each old key of `names` under its new name (a new key already there wins)."""
    out = dict(row)
    for old, new in names.items():
        if old in out:
            out.setdefault(new, out.pop(old))
    return out
