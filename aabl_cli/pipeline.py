"""`aabl run`: scan, split and train in one work directory, each stage done once.

A stage counts as finished when its JSON (`scan/scan.json`, `split/split.json`,
`train/train.json`) exists with the same settings and the same dataset fingerprint; it is
then not redone, so a run that stopped (or was stopped) continues with the stage it was
in (which itself resumes from its last epoch). A stage that is redone makes every stage
after it redo too.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aabl_cli import distributed
from aabl_cli.data import dataset_fingerprint, list_image_folder, load_image_folder
from aabl_cli.device import resolve_device
from aabl_cli.errors import AablError
from aabl_cli.progress import log
from aabl_cli.train import default_milestones

STAGES = ("scan", "split", "train")
# settings a stage's JSON records that decide whether an earlier run can be reused
SCAN_KEYS = ("arch", "epochs", "lr", "batch_size", "eps", "step_size", "steps", "alpha", "beta", "seed", "compile")
SPLIT_KEYS = ("method", "fraction", "threshold", "min_isolated", "link")
TRAIN_KEYS = ("arch", "epochs", "adv_method", "eps", "step_size", "steps", "lr", "momentum", "weight_decay",
              "batch_size", "milestones", "seed", "compile")
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
    settings = recorded.get("settings", {})
    changed = [k for k, v in wanted.items() if not _same(settings.get(k), v)]
    if changed:
        return f"to redo (other {', '.join(changed)})"
    if fingerprint is not None and recorded.get("dataset_fingerprint") != fingerprint:
        return "to redo (the data changed)"
    return None


def _fingerprint(folder: Path, *, decode: bool, **load: Any) -> tuple[str, int]:
    """The dataset fingerprint stages record, and the image count. Without `decode`, from the
    listing alone (no image is read; files an `--on-bad-file skip` run left out then differ)."""
    if decode:
        dataset = load_image_folder(folder, quiet=True, **load)
        return dataset.fingerprint, len(dataset)
    listing = list_image_folder(folder)
    paths = [rel for rel, _ in listing.files]
    return dataset_fingerprint(listing.root, paths), len(paths)


def _wanted(opts: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The settings a stage's JSON records for these options."""
    opts = {**opts, "compile": opts.get("compile_model", False)}
    if "method" in opts and opts["method"] != "otsu":  # split's own resolution of its options
        opts["min_isolated"] = None
    if "adv_method" in opts:  # train's own resolution of its options
        if opts["adv_method"] == "fgsm-rs":
            opts["step_size"], opts["steps"] = 1.25 * opts["eps"], 1
        if opts["eps"] <= 0:
            opts["adv_method"] = None
        if opts.get("milestones") is None:
            opts["milestones"] = default_milestones(opts["epochs"])
    return {k: opts[k] for k in keys if k in opts}


def plan(data: Path, workdir: Path, scan_opts: dict[str, Any], split_opts: dict[str, Any],
         train_opts: dict[str, Any], *, decode: bool, load: dict[str, Any]) -> Plan:
    fingerprint, n = _fingerprint(data, decode=decode, **load)
    result = Plan(data=data, workdir=workdir, images=n)
    scan_why = _finished(workdir / "scan" / "scan.json", _wanted(scan_opts, SCAN_KEYS), fingerprint)
    if scan_why is None:
        recorded = json.loads((workdir / "scan" / "scan.json").read_text())
        if Path(recorded.get("dataset_root", "")) != Path(data).resolve():
            scan_why = "to redo (another data folder)"
    result.status["scan"] = scan_why or "done"
    split_why = "to run" if scan_why else _finished(workdir / "split" / "split.json",
                                                    _wanted(split_opts, SPLIT_KEYS), fingerprint)
    result.status["split"] = split_why or "done"
    train_why: str | None = "to run" if split_why else None
    if train_why is None:
        kept = workdir / "split" / "kept"
        if not kept.exists():
            train_why = "to run"
        else:
            kept_fp, _ = _fingerprint(kept, decode=decode, **load)
            train_why = _finished(workdir / "train" / "train.json", _wanted(train_opts, TRAIN_KEYS), kept_fp)
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
    from PIL import Image

    listing = list_image_folder(folder)
    if not listing.files:
        raise AablError(f"{folder} holds no images")
    with Image.open(listing.root / listing.files[0][0]) as image:
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
    load = {k: common[k] for k in ("cache_dir", "on_bad_file", "image_size") if k in common}
    result = plan(data, workdir, scan_opts, split_opts, train_opts, decode=not dry_run, load=load)
    if dry_run:
        estimate(result, scan_opts, train_opts, device=common.get("device", "auto"),
                 image_size=common.get("image_size"))
        return {"plan": result.status, "estimate_s": result.estimate_s, "images": result.images,
                "lines": result.lines()}
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
