"""Stage 3: PGD adversarial training from scratch on the kept set (`core.loop.fit` with a threat).

The default recipe is the paper's (PGD-10, SGD, step schedule); `schedule="onecycle"`, `ema`
and, with a validation set, `keep="best"` guard against the ways adversarial training fails to
learn or un-learns (`core.best`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aabl_cli import __version__
from aabl_cli.core import distributed
from aabl_cli.core.accuracy import accuracy, balanced_subset
from aabl_cli.core.attacks import PAPER_RA, Threat
from aabl_cli.core.best import BestEpoch, collapse_epoch
from aabl_cli.core.checkpoint import save_model
from aabl_cli.core.data import ImageDataset, check_image_size, load_image_folder
from aabl_cli.core.device import make_generator, prepare_model, seed_everything, use_precision
from aabl_cli.core.ema import EMA
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import Place, inside, refuse_overlap, replace_dir, write_json
from aabl_cli.core.images import DEFAULT_MAX_IMAGE_PIXELS
from aabl_cli.core.lock import workdir_lock
from aabl_cli.core.loop import (
    SCHEDULES,
    choose_path,
    fit,
    host_images,
    make_schedule,
    open_training_set,
    place_on_device,
    sampling_generator,
)
from aabl_cli.core.models import build_model, channel_stats
from aabl_cli.core.progress import log
from aabl_cli.core.resume import Resume, prepare_folder
from aabl_cli.core.stream import Images, StreamedImages
from aabl_cli.core.workdir import StageFolder, Workdir, read_summary

ADV_METHODS = ("pgd", "fgsm-rs")
KEEP = ("best", "last")


def default_milestones(epochs: int) -> list[int]:
    """50 %, 75 % and 90 % of the epochs (50/75/90 at 100, as in the paper)."""
    return sorted({max(1, round(epochs * f)) for f in (0.5, 0.75, 0.9)})


def train_settings(data: str | Path, *, image_size: Sequence[int], arch: str, epochs: int, eps: float,
                   step_size: float, steps: int, adv_method: str, lr: float, momentum: float, weight_decay: float,
                   batch_size: int, schedule: str, milestones: list[int] | None, ema: float, keep: str,
                   val: str | Path | None, val_size: int, seed: int, compile: bool, precision: str,
                   distributed: dict[str, Any]) -> dict[str, Any]:
    """The settings train.json records (and `aabl run` compares) for these options on images of
    `image_size` [H, W], resolved: fgsm-rs's step (1.25 eps, one step), the default milestones
    (none for onecycle), `keep` "last" without a validation set."""
    if adv_method == "fgsm-rs":
        step_size, steps = 1.25 * eps, 1
    if schedule != "step":
        milestones = []
    elif milestones is None:
        milestones = default_milestones(epochs)
    return {"data": str(Path(data).resolve()), "arch": arch, "epochs": epochs,
            "adv_method": adv_method if eps > 0 else None, "eps": eps, "step_size": step_size, "steps": steps,
            "random_start": True, "optimizer": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
            "batch_size": batch_size, "schedule": schedule, "milestones": sorted(milestones), "ema": ema,
            "keep": keep if val is not None else "last", "val": None if val is None else str(val),
            "val_size": val_size, "seed": seed, "image_size": list(image_size), "compile": compile,
            "precision": precision, "distributed": distributed}


def train(data: str | Path | None = None, *, workdir: str | Path = "aabl-out", arch: str = "resnet18",
          epochs: int = 100, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
          lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
          schedule: str = "step", milestones: list[int] | None = None, ema: float = 0.0, keep: str = "best",
          val: str | Path | None = None, val_size: int = 1000, seed: int = 0, device: str = "auto",
          resume: bool | str = False, quiet: bool = False, cache_dir: str | Path | None = None,
          on_bad_file: str = "error", image_size: int | None = None, adv_method: str = "pgd",
          compile: bool = False, precision: str = "auto",
          max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data_memory: int | str = "auto") -> dict[str, Any]:
    """PGD adversarial training from scratch (Madry et al.); `eps=0` trains plainly.

    `adv_method="fgsm-rs"` trains on one FGSM step of 1.25 eps from a uniform random start
    ("fast is better than free", Wong et al. 2020) instead, ignoring `steps` and `step_size`.
    `schedule`: "step" (x0.1 at each of `milestones`) or "onecycle" (per batch, 0 up to `lr` at
    40 % of the iterations, then down to 0). `ema` > 0: validate and save the exponential moving
    average of the weights with this decay (`core.ema`). With `val`, `keep="best"` saves the
    epoch of the best val_ra rather than the last. `precision`: `core.device.use_precision`.
    `data_memory` (bytes, or "auto"): the budget above which the images (and the validation
    subset) are streamed from the decode cache (`core.memory`); recorded as `data_path`.

    Reads an image folder (default: `workdir/split/kept`), writes `workdir/train/` with
    `model.safetensors`, `train.json` and `history.csv`; returns the summary, which names the
    epoch saved (`kept_epoch`), the best val_ra and the epoch a collapse was seen at, if any.
    """
    if adv_method not in ADV_METHODS:
        raise AablError(f"unknown --adv-method {adv_method!r}; use one of {', '.join(ADV_METHODS)}")
    if schedule not in SCHEDULES:
        raise AablError(f"unknown --schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if schedule != "step" and milestones is not None:
        raise AablError(f"--milestones applies to --schedule step; --schedule {schedule} sets the rate per batch: "
                        "drop --milestones")
    if not 0 <= ema < 1:
        raise AablError(f"--ema {ema} is outside [0, 1); give a decay such as 0.995, or 0 for no average")
    if keep not in KEEP:
        raise AablError(f"unknown --keep {keep!r}; use one of {', '.join(KEEP)}")
    wd = Workdir(workdir)
    _refuse_link_none(Path(data) if data is not None else wd.split.kept)
    if data is None:
        data = wd.split.kept
        if not data.exists():
            raise AablError(f"no data given and {data} does not exist; run `aabl split` first or pass DATA")
    partial = wd.partial("train")
    val_place = None if val is None else Place(Path(val), "the --val folder")
    refuse_overlap([Place(Path(data), "the data folder"), val_place],
                   replaces=wd.outputs("train"), writes_into=[Place(wd.root, "--workdir")],
                   fix="choose a --workdir outside the data folder and --val that does not hold them either")
    own_split = ("split",) if inside(data, wd.split.path) else ()
    # one writer, and no split under it
    with workdir_lock(wd.root, *own_split, "train", quiet=quiet), use_precision(precision):
        started = time.time()
        dev, dataset, quiet = open_training_set(data, device=device, quiet=quiet, image_size=image_size,
                                                on_bad_file=on_bad_file, cache_dir=cache_dir,
                                                max_image_pixels=max_image_pixels)
        shard = distributed.training_shard(len(dataset))
        path = choose_path(dataset, dev, shard, data_memory=data_memory)
        if path.streamed:
            log(f"train: streaming the images from the decode cache: {path.reason}", quiet=quiet)
        val_set = None
        if distributed.is_main():  # validation runs on rank 0 alone
            val_set = _load_val(val, dataset, val_size=val_size, seed=seed, cache_dir=cache_dir,
                                max_image_pixels=max_image_pixels, stream=path.streamed, device=dev, quiet=quiet)
        check_image_size(dataset)
        settings = train_settings(dataset.root, image_size=dataset.image_size, arch=arch, epochs=epochs, eps=eps,
                                  step_size=step_size, steps=steps, adv_method=adv_method, lr=lr, momentum=momentum,
                                  weight_decay=weight_decay, batch_size=batch_size, schedule=schedule,
                                  milestones=milestones, ema=ema, keep=keep, val=val, val_size=val_size, seed=seed,
                                  compile=compile, precision=precision, distributed=distributed.describe(batch_size))

        seed_everything(seed)
        mean, std = channel_stats(host_images(dataset, stream=path.streamed))
        model = prepare_model(build_model(arch, num_classes=len(dataset.classes), image_size=dataset.image_size,
                                          mean=mean, std=std), dev)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        threat = Threat(eps=eps, step_size=settings["step_size"], steps=settings["steps"],
                        random_start=True) if eps > 0 else None
        average = EMA(model, decay=ema) if ema > 0 else None
        evaluated = model if average is None else average.module  # what validation measures and files hold
        best = BestEpoch(evaluated, weights=keep == "best") if val is not None else None

        def save(path: Path, done: int) -> None:
            save_model(path, evaluated, arch=arch, classes=dataset.classes, image_size=dataset.image_size,
                       stage="train", eps=eps, epochs=done, seed=seed, dataset_fingerprint=dataset.fingerprint)

        validate = None
        if val_set is not None:
            vx, vy = val_set
            val_threat = threat if threat is not None else PAPER_RA

            def validate() -> dict[str, float]:
                gen = make_generator(dev, seed)
                return {"val_acc": accuracy(evaluated, vx, vy, device=dev, batch_size=256),
                        "val_ra": accuracy(evaluated, vx, vy, device=dev, batch_size=256, threat=val_threat,
                                           generator=gen)}

        def on_epoch(done: int, rows: list[dict[str, Any]]) -> None:
            if best is not None:
                best.observe(rows)
                _report_collapse(rows, best, keep=keep, quiet=quiet)
            state.save(done, rows)

        prepare_folder(partial, resume)
        images, labels = place_on_device(dataset, dev, shard, stream=path.streamed)
        state = Resume(partial, key={**settings, "fingerprint": dataset.fingerprint}, mode=resume, save_model=save,
                       desc="train", quiet=quiet)
        generator = sampling_generator(images.device, seed)
        parts = {name: part for name, part in (("ema", average), ("best", best)) if part is not None}
        start, done = state.restore(model, optimizer, generator, epochs=epochs, parts=parts)
        history = fit(model, images, labels, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
                      schedule=make_schedule(schedule, lr=lr, epochs=epochs, milestones=settings["milestones"]),
                      threat=threat, ema=average, device=dev, generator=generator, start_epoch=start, history=done,
                      on_epoch=on_epoch, validate=validate, compile=compile, desc="train", quiet=quiet)
        kept = len(history)
        if settings["keep"] == "best" and best is not None and best.epoch and best.epoch != kept:
            kept = best.epoch
            evaluated.load_state_dict(best.weights)
            if distributed.is_main():
                save(partial.model, kept)
        summary = {
            "stage": "train", "aabl_version": __version__, "torch_version": torch.__version__,
            "device": str(dev), "settings": settings, "data_path": path.as_record(),
            "dataset_fingerprint": dataset.fingerprint,
            "samples": len(dataset), "classes": dataset.classes, "class_counts": dataset.class_counts(),
            "skipped": dataset.skipped, "final": history[-1] if history else {}, "kept_epoch": kept,
            "best_val_ra": best.val_ra if best is not None and best.epoch else None,
            "collapse_epoch": collapse_epoch([row.get("val_ra") for row in history]),
            "seconds": {"total": time.time() - started},
        }
        if distributed.is_main():
            write_json(partial.json, summary)
            replace_dir(partial.path, wd.train.path)
        return summary


def _report_collapse(history: list[dict[str, Any]], best: BestEpoch, *, keep: str, quiet: bool) -> None:
    """A log line at the epoch a collapse is first seen (`core.best.collapse_epoch`)."""
    epoch = history[-1]["epoch"]
    if collapse_epoch([row.get("val_ra") for row in history]) != epoch:
        return
    saved = (f"--keep best saves the best epoch's weights (so far epoch {best.epoch})" if keep == "best" else
             "--keep last saves the last epoch's weights; --keep best would save the best epoch's")
    log(f"train: robust accuracy collapsed at epoch {epoch}: val_ra {history[-1]['val_ra']:.3f}, below half of "
        f"its best {best.val_ra:.3f} (epoch {best.epoch}), a sign of catastrophic overfitting; {saved}",
        quiet=quiet)


def _refuse_link_none(data: Path) -> None:
    """A split written with `--link none` leaves kept/ and isolated/ without images: say so, not "no images"."""
    split = StageFolder(data.parent, "split")
    if data not in (split.kept, split.isolated) or not split.json.is_file():
        return
    try:
        link = read_summary(split.json, "split")["settings"]["link"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if link == "none":
        raise AablError(f"{data.parent} was written by `aabl split --link none`, which lists the split in split.csv "
                        f"but puts no images in {data}; split again with `aabl split --link copy` (or hardlink or "
                        "symlink), then train")


def _load_val(val: str | Path | None, train_set: ImageDataset, *, val_size: int, seed: int,
              cache_dir: str | Path | None, max_image_pixels: int, stream: bool, device: torch.device,
              quiet: bool) -> tuple[Images, torch.Tensor] | None:
    """The seeded, class-balanced validation subset: a copy, or with `stream` read from the cache."""
    if val is None:
        return None
    val_set = load_image_folder(val, image_size=train_set.image_size, cache_dir=cache_dir, min_classes=1,
                                max_image_pixels=max_image_pixels, quiet=quiet)
    if val_set.classes != train_set.classes:
        raise AablError(f"--val {val} has classes {val_set.classes}, the training data {train_set.classes}; "
                        "pass a validation folder with the same class folders")
    idx = balanced_subset(val_set.labels, size=val_size, seed=seed)
    if stream:
        return StreamedImages(val_set, device, idx), val_set.labels[idx]
    return val_set.images[idx], val_set.labels[idx]
