"""Resume state of a stage's training, kept in its resume folder (`WORKDIR/.STAGE.partial`).

`fit` knows nothing of files: a stage that can be interrupted (scan, train) makes a `Resume`,
lets it restore the last finished epoch before `fit`, and passes `resume.save` as `fit`'s
`on_epoch`, which writes the epoch's model, then the state (model, optimizer, RNGs, history,
and the stage's other parts: the weights' moving average, the best epoch's weights) in one
file, then history.csv. A kill at any moment resumes from the last complete epoch.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from aabl_cli.core import distributed
from aabl_cli.core.checkpoint import Stateful, load_state, save_state
from aabl_cli.core.errors import AablError
from aabl_cli.core.progress import log
from aabl_cli.core.workdir import StageFolder

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ra", "seconds", "images_per_s")


class Resume:
    """Load the state of an interrupted run before `fit`, save it after every epoch.

    `folder` is the stage's resume folder; `key` the settings and data the run must share with
    an interrupted one to continue it (recorded in the state file). `mode`: True continues an
    interrupted run (and refuses one with another key), "auto" continues it when it has the
    same key and starts over when it has not, False starts over. `save_model(path, epochs_done)`
    writes the stage's checkpoint. Under torchrun every process calls `restore` and `save` (the
    generators' states are gathered), and rank 0 alone writes.
    """

    def __init__(self, folder: StageFolder, *, key: dict[str, Any], mode: bool | str,
                 save_model: Callable[[Path, int], None], desc: str, quiet: bool) -> None:
        self.folder, self.key, self.mode = folder, key, mode
        self.key_json = json.dumps(key, sort_keys=True)
        self.save_model, self.desc, self.quiet = save_model, desc, quiet
        self._bound: tuple[dict[str, Stateful], torch.optim.Optimizer, torch.Generator] | None = None

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, *,
                epochs: int, parts: Mapping[str, Stateful] | None = None) -> tuple[int, list[dict[str, Any]]]:
        """Load the interrupted run's model, optimizer, RNG and generator states and `parts` (by name,
        e.g. {"ema": ema}) as `mode` says; returns (epochs already done, their history) to pass to `fit`
        as `start_epoch`, `history`. `save` writes the same parts."""
        every = {"model": model, **(parts or {})}
        self._bound = (every, optimizer, generator)
        world, rank = distributed.world(), distributed.rank()
        state_path, partial, resume = self.folder.state, self.folder.path, self.mode
        if resume == "auto" and state_path.exists() and (recorded := _resume_key(state_path)) != self.key_json:
            log(f"{self.desc}: the interrupted run in {partial} used other settings or data; starting over "
                f"({changed_settings(recorded, self.key)})", quiet=self.quiet)
            resume = False
        if resume and state_path.exists():
            start, rng, gen_state, meta = load_state(state_path, optimizer, parts=every)
            if meta.get("resume_key") != self.key_json:
                raise AablError(f"the interrupted run in {partial} used other settings or data "
                                f"({changed_settings(meta.get('resume_key'), self.key)}); run again with the same "
                                "options, or without --resume to start over")
            torch.set_rng_state(rng)
            processes = len(gen_state) if gen_state.dim() == 2 else 1
            if processes != world:
                raise AablError(f"the interrupted run in {partial} ran as {processes} process(es), this one as "
                                f"{world}; resume with the same number of processes")
            generator.set_state(gen_state[rank].clone() if world > 1 else gen_state)  # a row of its own
            log(f"{self.desc}: resuming after epoch {start}/{epochs}", quiet=self.quiet)
            return start, json.loads(meta.get("history", "[]"))
        if resume is True:
            log(f"{self.desc}: nothing to resume in {partial}; starting from scratch", quiet=self.quiet)
        return 0, []

    def save(self, epochs_done: int, history: list[dict[str, Any]]) -> None:
        """`fit`'s `on_epoch`: the epoch's model, then the resume state, then history.csv (rank 0)."""
        assert self._bound is not None, "restore() binds the model, optimizer and generator first"
        parts, optimizer, generator = self._bound
        gen_states = distributed.all_gather_object(generator.get_state())
        if distributed.rank() != 0:
            return
        self.save_model(self.folder.model, epochs_done)
        save_state(self.folder.state, optimizer=optimizer, epoch=epochs_done, rng=torch.get_rng_state(),
                   generator=torch.stack(gen_states) if len(gen_states) > 1 else gen_states[0],
                   meta={"resume_key": self.key_json, "history": json.dumps(history)}, parts=parts)
        write_history(self.folder.history, history)


def changed_settings(recorded: str | None, key: dict[str, Any]) -> str:
    """What differs between a resume state's recorded key (JSON) and this run's, for a message:
    `epochs was 3, now 5; lr was 0.1, now 0.05`."""
    try:
        old = json.loads(recorded or "")
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return "its settings are not recorded"
    new = json.loads(json.dumps(key))  # as it would be recorded: tuples become lists
    changes = []
    for name in [*new, *(k for k in old if k not in new)]:
        if old.get(name) == new.get(name):
            continue
        if name == "fingerprint":
            changes.append("the images changed (dataset fingerprint)")
        else:
            was = json.dumps(old[name]) if name in old else "unset"
            now = json.dumps(new[name]) if name in new else "unset"
            changes.append(f"{name} was {was}, now {now}")
    return "; ".join(changes) or "its settings are recorded differently"


def _resume_key(state_path: Path) -> str | None:
    try:
        with safe_open(str(state_path), framework="pt") as fh:
            return (fh.metadata() or {}).get("resume_key")
    except Exception:  # noqa: BLE001 - a damaged state: load_state reports it
        return None


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """history.csv: one row per epoch (HISTORY_FIELDS), written through a temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def prepare_folder(folder: StageFolder, resume: bool | str) -> None:
    """The stage's resume folder, where its outputs are also assembled: kept for --resume, otherwise
    started afresh (rank 0; every process waits for it). A kept one loses the temporary files a killed
    writer left (`.NAME.tmp*`), or they would reach the output."""
    if distributed.is_main():
        partial = folder.path
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        for leftover in partial.glob(".*.tmp*"):
            if not leftover.is_dir():
                leftover.unlink(missing_ok=True)
    distributed.barrier()
