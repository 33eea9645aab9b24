"""`aabl run`: scan, split and train in one work directory, each stage done once.

A stage counts as finished when its JSON (`scan/scan.json`, `split/split.json`,
`train/train.json`) exists with the same settings and the same dataset fingerprint; it is
then not redone, so a run that stopped (or was stopped) continues with the stage it was
in (which itself resumes from its last epoch). A stage that is redone makes every stage
after it redo too.

The settings wanted are what the stage would record: its own settings function
(`scan_settings`, ...) for these options, compared by `core.settings.stale_reason`, so every
setting a stage records counts, and one this run cannot reproduce counts as changed. Not
compared: split's CI gates (`split.GATES`), which change no output (run re-reads them), and
of the process layout all but the world size (the backend changes no result).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aabl_cli.core import distributed
from aabl_cli.core.data import list_image_folder, load_image_folder, peek_image_folder
from aabl_cli.core.device import autocast, channels_last, prepare_model, resolve_device, use_precision
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import SECOND_ROUND, Place, refuse_overlap
from aabl_cli.core.images import DEFAULT_MAX_IMAGE_PIXELS, open_image
from aabl_cli.core.lock import workdir_lock
from aabl_cli.core.models import build_model
from aabl_cli.core.progress import log
from aabl_cli.core.settings import settings_for, stale_reason
from aabl_cli.core.workdir import STAGES, Workdir
from aabl_cli.stages.scan import scan, scan_settings
from aabl_cli.stages.split import GATES, gates_for, split, split_settings
from aabl_cli.stages.train import train, train_settings

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


def _fingerprint(folder: Path, *, decode: bool, **load: Any) -> tuple[str, int, list[int]]:
    """The dataset fingerprint stages record, the image count and the image size [H, W] a stage
    would train at. Without `decode`, from the listing and the image headers alone (no image is
    decoded; files an `--on-bad-file skip` run left out then differ)."""
    if decode:
        dataset = load_image_folder(folder, quiet=True, **load)
        return dataset.fingerprint, len(dataset), list(dataset.image_size)
    return peek_image_folder(folder, image_size=load.get("image_size"),
                             max_image_pixels=load.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))


def plan(data: Path, workdir: Path, scan_opts: dict[str, Any], split_opts: dict[str, Any],
         train_opts: dict[str, Any], *, decode: bool, load: dict[str, Any]) -> Plan:
    """Which stages are done: each stage's JSON against the settings its own settings function
    gives for these options (every recorded setting counts, but split's gates), and the data."""
    wd = Workdir(workdir)
    fingerprint, n, size = _fingerprint(data, decode=decode, **load)
    result = Plan(data=data, workdir=workdir, images=n)
    processes = {"world_size": distributed.env_world_size()}  # of the layout, only this changes a result
    scan_why = stale_reason(wd.scan.json, settings_for(scan, scan_settings, scan_opts, data=data, image_size=size,
                                                       distributed=processes), fingerprint)
    result.status["scan"] = scan_why or "done"
    split_why = "to run" if scan_why else stale_reason(wd.split.json, settings_for(split, split_settings, split_opts),
                                                       fingerprint, ignore=GATES)
    result.status["split"] = split_why or "done"
    train_why: str | None = "to run" if split_why else None
    if train_why is None:
        if not wd.split.kept.exists():
            train_why = "to run"
        else:
            kept_fp, _, kept_size = _fingerprint(wd.split.kept, decode=decode, **load)
            wanted = settings_for(train, train_settings, train_opts, data=wd.split.kept, image_size=kept_size,
                                  distributed=processes)
            train_why = stale_reason(wd.train.json, wanted, kept_fp)
    result.status["train"] = train_why or "done"
    return result


def estimate(result: Plan, scan_opts: dict[str, Any], train_opts: dict[str, Any], *, device: str,
             image_size: int | None) -> None:
    """Time a few training steps of each stage's network here, in the stage's --precision, and
    extrapolate the stages."""
    dev = resolve_device(device)
    classes = max(2, len(list_image_folder(result.data).classes))
    side = image_size or _first_image_side(result.data)
    per_step: dict[tuple[str, int, str], float] = {}
    stages = {(o["arch"], o["batch_size"], o.get("precision", "auto")) for o in (scan_opts, train_opts)}
    for arch, batch, precision in stages:
        with use_precision(precision):
            per_step[arch, batch, precision] = _step_seconds(arch, batch, classes, side, dev)
    n = result.images
    scan_step = per_step[scan_opts["arch"], scan_opts["batch_size"], scan_opts.get("precision", "auto")]
    scan_batches = math.ceil(n / scan_opts["batch_size"])
    result.estimate_s["scan"] = scan_batches * scan_step * (scan_opts["epochs"] + scan_opts["steps"] + 1)
    result.estimate_s["split"] = 0.002 * n
    train_steps = 1 if train_opts.get("adv_method") == "fgsm-rs" else train_opts["steps"]
    passes = 1 + (train_steps if train_opts["eps"] > 0 else 0)
    train_batches = math.ceil(KEPT_SHARE * n / train_opts["batch_size"])
    train_step = per_step[train_opts["arch"], train_opts["batch_size"], train_opts.get("precision", "auto")]
    result.estimate_s["train"] = train_batches * train_step * passes * train_opts["epochs"]


def _step_seconds(arch: str, batch: int, classes: int, side: int, dev: torch.device) -> float:
    """Seconds of one training step of `arch` on `dev` under the current precision (the median of three,
    after a warm-up)."""
    model = prepare_model(build_model(arch, num_classes=classes, image_size=(side, side)), dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, side, side, device=dev)
    if channels_last(dev):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=dev)
    times = []
    for _ in range(4):  # the first is a warm-up
        t0 = time.perf_counter()
        with autocast(dev):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        float(loss.detach())  # waits for the device
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]


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
    data, wd = Path(data), Workdir(workdir)
    workdir = wd.root
    if split_opts.get("link") == "none":
        raise AablError("--link none writes no kept/ folder for train to read; use copy, hardlink or symlink")
    val = train_opts.get("val")
    refuse_overlap([Place(data, "the data folder"), None if val is None else Place(Path(val), "the --val folder")],
                   replaces=wd.outputs(*STAGES), writes_into=[Place(workdir, "--workdir")],
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
            summary["split"] = wd.read("split")
            summary["split"]["gates"] = gates_for(summary["split"], fail_over=split_opts.get("fail_over"),
                                                  fail_on_suspect=split_opts.get("fail_on_suspect", False))
        if summary["split"]["gates"]:
            summary["seconds"] = {"total": time.time() - started}
            return summary  # the caller reports the tripped gate; training is skipped
        if result.status["train"] != "done":
            summary["train"] = train(None, workdir=workdir, quiet=quiet, **common, **train_opts)
        else:
            summary["train"] = wd.read("train")
        summary["seconds"] = {"total": time.time() - started}
        return summary
