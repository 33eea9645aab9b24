"""`aabl run`: scan, split and train in one work directory, each stage done once.

A stage counts as finished when its JSON (`scan/scan.json`, `split/split.json`,
`train/train.json`) exists with the same settings and the same dataset fingerprint; it is
then not redone, so a run that stopped (or was stopped) continues with the stage it was
in (which itself resumes from its last epoch). A stage that is redone makes every stage
after it redo too.
"""

from __future__ import annotations

import collections
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aabl_cli import distributed
from aabl_cli.data import (
    DEFAULT_MAX_IMAGE_PIXELS,
    dataset_fingerprint,
    list_image_folder,
    load_image_folder,
    open_image,
)
from aabl_cli.device import resolve_device
from aabl_cli.errors import AablError
from aabl_cli.fsutil import SECOND_ROUND, Place, refuse_overlap, stage_outputs
from aabl_cli.lock import workdir_lock
from aabl_cli.progress import log
from aabl_cli.train import default_milestones

STAGES = ("scan", "split", "train")
# Every setting a stage's JSON records is compared with the one this run would record, so any
# that changes an output redoes the stage; a recorded setting this run cannot reproduce counts as
# changed. Not compared: split's CI gates, which change no output (run re-reads them), and of the
# process layout all but the world size (the backend changes no result).
NOT_COMPARED = ("fail_over", "fail_on_suspect")
KEPT_SHARE = 0.9  # what the time estimate assumes the split keeps


@dataclass
class Plan:
    """What `run` will do: per stage, `done` (reused) or the reason it runs."""

    data: Path
    workdir: Path
    images: int
    status: dict[str, str] = field(default_factory=dict)
    estimate_s: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"aabl run: {self.images} images in {self.data}, work directory {self.workdir}"]
        for stage in STAGES:
            eta = self.estimate_s.get(stage)
            when = f" (about {_human(eta)})" if eta is not None and self.status[stage] != "done" else ""
            out.append(f"  {stage:5}  {self.status[stage]}{when}")
        todo = sum(v for k, v in self.estimate_s.items() if self.status[k] != "done")
        if all(self.status[stage] == "done" for stage in STAGES):
            out.append("  nothing to do: every stage is done (change an option to redo a stage)")
        elif self.estimate_s:
            out.append(f"  estimated time on this machine: {_human(todo)}")
        return out


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _same(recorded: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):  # the keys `wanted` names; the record may hold more
        return isinstance(recorded, dict) and all(_same(recorded.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, float) or isinstance(recorded, float):
        try:
            return math.isclose(float(recorded), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return recorded == wanted


def _finished(path: Path, wanted: dict[str, Any], fingerprint: str | None) -> str | None:
    """None when `path` records these settings and this fingerprint; else why the stage runs."""
    if not path.exists():
        return "to run"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return f"to redo ({path.name} is unreadable)"
    settings = recorded.get("settings") if isinstance(recorded, dict) else None
    if not isinstance(settings, dict):
        return f"to redo ({path.name} records no settings)"
    keys = [k for k in settings if k not in NOT_COMPARED] + [k for k in wanted if k not in settings]
    changed = [k for k in keys if k not in wanted or not _same(settings.get(k), wanted[k])]
    if "data" in changed:
        return "to redo (another data folder)"
    if changed:
        return f"to redo (other {', '.join(changed)})"
    if fingerprint is not None and recorded.get("dataset_fingerprint") != fingerprint:
        return "to redo (the data changed)"
    return None


def _fingerprint(folder: Path, *, decode: bool, **load: Any) -> tuple[str, int, list[int]]:
    """The dataset fingerprint stages record, the image count and the image size [H, W] a stage
    would train at. Without `decode`, from the listing and the image headers alone (no image is
    decoded; files an `--on-bad-file skip` run left out then differ)."""
    if decode:
        dataset = load_image_folder(folder, quiet=True, **load)
        return dataset.fingerprint, len(dataset), list(dataset.image_size)
    listing = list_image_folder(folder)
    paths = [rel for rel, _ in listing.files]
    size = load.get("image_size")
    cap = load.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    hw = [size, size] if size is not None else _most_common_size(listing.root, paths, cap)
    return dataset_fingerprint(listing.root, paths), len(paths), hw


def _most_common_size(root: Path, paths: list[str], max_image_pixels: int) -> list[int]:
    """[H, W] of most images under `root`, from their headers (as load_image_folder picks it)."""
    counts: collections.Counter[tuple[int, int]] = collections.Counter()
    for rel in paths:
        try:
            with open_image(root / rel, max_image_pixels=max_image_pixels) as image:
                counts[image.height, image.width] += 1
        except AablError:
            continue  # the real run reports it
    return list(counts.most_common(1)[0][0]) if counts else []


def _defaults(stage: Callable[..., Any]) -> dict[str, Any]:
    """A stage function's keyword defaults: the settings `run` leaves to the stage."""
    return {k: p.default for k, p in inspect.signature(stage).parameters.items() if p.default is not p.empty}


def _scan_settings(opts: dict[str, Any], *, data: Path, image_size: list[int]) -> dict[str, Any]:
    """What scan.json's `settings` will record for these options (see scan.scan)."""
    from aabl_cli.scan import scan

    o = {**_defaults(scan), **opts}
    return {"data": str(Path(data).resolve()), "arch": o["arch"], "epochs": o["epochs"], "optimizer": "adam",
            "lr": o["lr"], "weight_decay": 0.0, "batch_size": o["batch_size"], "eps": o["eps"],
            "step_size": o["step_size"], "steps": o["steps"], "random_start": False, "alpha": o["alpha"],
            "beta": o["beta"], "model": None, "seed": o["seed"], "image_size": image_size,
            "compile": o["compile_model"], "distributed": {"world_size": distributed.env_world_size()}}


def _split_settings(opts: dict[str, Any]) -> dict[str, Any]:
    """What split.json's `settings` will record for these options (see split.split)."""
    from aabl_cli.split import split

    o = {**_defaults(split), **opts}
    return {"method": o["method"], "fraction": o["fraction"], "threshold": o["threshold"],
            "min_isolated": o["min_isolated"] if o["method"] == "otsu" else None, "link": o["link"]}


def _train_settings(opts: dict[str, Any], *, data: Path, image_size: list[int]) -> dict[str, Any]:
    """What train.json's `settings` will record for these options (see train.train)."""
    from aabl_cli.train import train

    o = {**_defaults(train), **opts}
    step_size, steps = (1.25 * o["eps"], 1) if o["adv_method"] == "fgsm-rs" else (o["step_size"], o["steps"])
    milestones = default_milestones(o["epochs"]) if o["milestones"] is None else sorted(o["milestones"])
    return {"data": str(Path(data).resolve()), "arch": o["arch"], "epochs": o["epochs"],
            "adv_method": o["adv_method"] if o["eps"] > 0 else None, "eps": o["eps"], "step_size": step_size,
            "steps": steps, "random_start": True, "optimizer": "sgd", "lr": o["lr"], "momentum": o["momentum"],
            "weight_decay": o["weight_decay"], "batch_size": o["batch_size"], "milestones": milestones,
            "val": None if o["val"] is None else str(o["val"]), "val_size": o["val_size"], "seed": o["seed"],
            "image_size": image_size, "compile": o["compile_model"],
            "distributed": {"world_size": distributed.env_world_size()}}


def plan(data: Path, workdir: Path, scan_opts: dict[str, Any], split_opts: dict[str, Any],
         train_opts: dict[str, Any], *, decode: bool, load: dict[str, Any]) -> Plan:
    fingerprint, n, size = _fingerprint(data, decode=decode, **load)
    result = Plan(data=data, workdir=workdir, images=n)
    scan_why = _finished(workdir / "scan" / "scan.json", _scan_settings(scan_opts, data=data, image_size=size),
                         fingerprint)
    result.status["scan"] = scan_why or "done"
    split_why = "to run" if scan_why else _finished(workdir / "split" / "split.json", _split_settings(split_opts),
                                                    fingerprint)
    result.status["split"] = split_why or "done"
    train_why: str | None = "to run" if split_why else None
    if train_why is None:
        kept = workdir / "split" / "kept"
        if not kept.exists():
            train_why = "to run"
        else:
            kept_fp, _, kept_size = _fingerprint(kept, decode=decode, **load)
            train_why = _finished(workdir / "train" / "train.json",
                                  _train_settings(train_opts, data=kept, image_size=kept_size), kept_fp)
    result.status["train"] = train_why or "done"
    return result


def estimate(result: Plan, scan_opts: dict[str, Any], train_opts: dict[str, Any], *, device: str,
             image_size: int | None) -> None:
    """Time a few training steps of each stage's network here and extrapolate the stages."""
    from aabl_cli.device import prepare_model
    from aabl_cli.models import build_model

    dev = resolve_device(device)
    classes = max(2, len(list_image_folder(result.data).classes))
    side = image_size or _first_image_side(result.data)
    per_step: dict[str, float] = {}
    for arch, batch in {(scan_opts["arch"], scan_opts["batch_size"]), (train_opts["arch"], train_opts["batch_size"])}:
        model = prepare_model(build_model(arch, num_classes=classes, image_size=(side, side)), dev).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.rand(batch, 3, side, side, device=dev)
        y = torch.randint(0, classes, (batch,), device=dev)
        times = []
        for _ in range(4):  # the first is a warm-up
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            float(loss.detach())  # waits for the device
            times.append(time.perf_counter() - t0)
        per_step[arch, batch] = sorted(times[1:])[1]
    n = result.images
    scan_step = per_step[scan_opts["arch"], scan_opts["batch_size"]]
    scan_batches = math.ceil(n / scan_opts["batch_size"])
    result.estimate_s["scan"] = scan_batches * scan_step * (scan_opts["epochs"] + scan_opts["steps"] + 1)
    result.estimate_s["split"] = 0.002 * n
    train_steps = 1 if train_opts.get("adv_method") == "fgsm-rs" else train_opts["steps"]
    passes = 1 + (train_steps if train_opts["eps"] > 0 else 0)
    train_batches = math.ceil(KEPT_SHARE * n / train_opts["batch_size"])
    result.estimate_s["train"] = (train_batches * per_step[train_opts["arch"], train_opts["batch_size"]]
                                  * passes * train_opts["epochs"])


def _first_image_side(folder: Path) -> int:
    listing = list_image_folder(folder)
    if not listing.files:
        raise AablError(f"{folder} holds no images")
    with open_image(listing.root / listing.files[0][0]) as image:
        return max(16, min(image.size))


def run_pipeline(data: str | Path, *, workdir: str | Path, scan_opts: dict[str, Any], split_opts: dict[str, Any],
                 train_opts: dict[str, Any], common: dict[str, Any], dry_run: bool = False,
                 quiet: bool = False) -> dict[str, Any]:
    """Run (or with `dry_run`, only plan) the three stages; returns a summary of each."""
    from aabl_cli.scan import scan
    from aabl_cli.split import gates_for, split
    from aabl_cli.train import train

    data, workdir = Path(data), Path(workdir)
    if split_opts.get("link") == "none":
        raise AablError("--link none writes no kept/ folder for train to read; use copy, hardlink or symlink")
    val = train_opts.get("val")
    refuse_overlap([Place(data, "the data folder"), None if val is None else Place(Path(val), "the --val folder")],
                   replaces=stage_outputs(workdir, *STAGES), writes_into=[Place(workdir, "--workdir")],
                   fix=f"choose a --workdir outside the data folder and --val that does not hold them either "
                       f"({SECOND_ROUND})")
    load = {k: common[k] for k in ("cache_dir", "on_bad_file", "max_image_pixels", "image_size") if k in common}
    if dry_run:
        result = plan(data, workdir, scan_opts, split_opts, train_opts, decode=False, load=load)
        estimate(result, scan_opts, train_opts, device=common.get("device", "auto"),
                 image_size=common.get("image_size"))
        return {"plan": result.status, "estimate_s": result.estimate_s, "images": result.images,
                "lines": result.lines()}
    with workdir_lock(workdir, *STAGES, quiet=quiet):  # every stage's writer, from the plan to the last output
        result = plan(data, workdir, scan_opts, split_opts, train_opts, decode=True, load=load)
        distributed.setup(resolve_device(common.get("device", "auto")))  # under torchrun: join the group now
        for line in result.lines():
            log(line, quiet=quiet or not distributed.is_main())
        summary: dict[str, Any] = {"plan": dict(result.status)}
        started = time.time()
        if result.status["scan"] != "done":
            summary["scan"] = scan(data, workdir=workdir, quiet=quiet, **common, **scan_opts)
        if result.status["split"] != "done" and distributed.is_main():  # split runs in one process
            summary["split"] = split(workdir=workdir, **split_opts)
        distributed.barrier()
        if "split" not in summary:
            summary["split"] = json.loads((workdir / "split" / "split.json").read_text())
            summary["split"]["gates"] = gates_for(summary["split"], fail_over=split_opts.get("fail_over"),
                                                  fail_on_suspect=split_opts.get("fail_on_suspect", False))
        if summary["split"]["gates"]:
            summary["seconds"] = time.time() - started
            return summary  # the caller reports the tripped gate; training is skipped
        if result.status["train"] != "done":
            summary["train"] = train(None, workdir=workdir, quiet=quiet, **common, **train_opts)
        else:
            summary["train"] = json.loads((workdir / "train" / "train.json").read_text())
        summary["seconds"] = time.time() - started
        return summary
