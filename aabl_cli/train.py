"""Stage 3: PGD adversarial training on the kept set, and the training loop `scan` shares.

The loop works on the uint8 dataset tensor: batches are `randperm` slices, augmentation
(random crop with padding, horizontal flip) is batched tensor work, and the float
conversion happens per batch. Loss and accuracy accumulate as tensors, so nothing
waits for the device inside the loop.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from aabl_cli import __version__, distributed
from aabl_cli.checkpoint import load_state, save_model, save_state
from aabl_cli.data import DEFAULT_MAX_IMAGE_PIXELS, ImageDataset, check_image_size, load_image_folder
from aabl_cli.device import autocast, make_generator, prepare_model, resolve_device, seed_everything
from aabl_cli.errors import AablError
from aabl_cli.evaluate import PAPER_RA, Threat, accuracy, balanced_subset, to_float
from aabl_cli.fsutil import Place, inside, refuse_overlap, replace_dir, stage_outputs, write_json
from aabl_cli.fuse import AttackView
from aabl_cli.graphs import GraphedAttack
from aabl_cli.lock import workdir_lock
from aabl_cli.models import build_model, channel_stats
from aabl_cli.progress import log, progress

ADV_METHODS = ("pgd", "fgsm-rs")
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ra", "seconds", "images_per_s")
CPU_WARN_SECONDS = 3600


def batch_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 1/8 of the side, 4 px at 32 px) and horizontal flip of a
    uint8 (N, C, H, W) batch, as one gather on the batch's device; returns uint8."""
    n, _, h, w = images.shape
    pad = max(1, round(h / 8))
    padded = F.pad(images, (pad, pad, pad, pad))
    dev = images.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def lr_at(epoch: int, *, lr: float, milestones: list[int]) -> float:
    """Step schedule: x0.1 at each milestone epoch (0-based epoch index)."""
    return lr * 0.1 ** sum(1 for m in milestones if epoch >= m)


def default_milestones(epochs: int) -> list[int]:
    """50 %, 75 % and 90 % of the epochs (50/75/90 at 100, as in the paper)."""
    return sorted({max(1, round(epochs * f)) for f in (0.5, 0.75, 0.9)})


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    threat: Threat | None  # None: plain training
    milestones: list[int]
    lr: float
    compile: bool = False  # torch.compile the passes; drops each epoch's last partial batch


def fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
        settings: LoopSettings, device: torch.device, seed: int, partial_dir: Path, resume: bool | str,
        save_checkpoint: Callable[[Path, int], None], resume_key: dict[str, Any], desc: str, quiet: bool,
        validate: Callable[[], dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Train `model` in place for `settings.epochs`, saving resume state after every epoch.

    `images` uint8 (N, C, H, W) and `labels` int64 (N,) may live on the CPU or on `device`.
    Resume state (model, optimizer, RNG, history) lives in one file in `partial_dir`,
    written after the epoch's model, so a kill at any moment resumes from the last complete
    epoch; with `resume` a run continues after it, and must have the same `resume_key`
    (`resume="auto"`: continues when it has, starts over when it has not).
    Under torchrun each process passes its own shard (all of the same size) and the model
    trains wrapped in DistributedDataParallel; only rank 0 writes, and the state file holds
    every process's sampling generator. Returns the per-epoch history rows.
    """
    world, rank = distributed.world(), distributed.rank()
    quiet = quiet or rank != 0
    generator = make_generator(images.device, seed + 1_000_003 * rank)
    state_path, model_path, history_path = (partial_dir / "state.safetensors", partial_dir / "model.safetensors",
                                            partial_dir / "history.csv")  # the last two are outputs only
    history: list[dict[str, Any]] = []
    start = 0
    key_json = json.dumps(resume_key, sort_keys=True)
    if resume == "auto" and state_path.exists() and (recorded := _resume_key(state_path)) != key_json:
        log(f"{desc}: the interrupted run in {partial_dir} used other settings or data; starting over "
            f"({changed_settings(recorded, resume_key)})", quiet=quiet)
        resume = False
    if resume and state_path.exists():
        start, rng, gen_state, meta = load_state(state_path, optimizer, model=model)
        if meta.get("resume_key") != key_json:
            raise AablError(f"the interrupted run in {partial_dir} used other settings or data "
                            f"({changed_settings(meta.get('resume_key'), resume_key)}); run again with the same "
                            "options, or without --resume to start over")
        torch.set_rng_state(rng)
        processes = len(gen_state) if gen_state.dim() == 2 else 1
        if processes != world:
            raise AablError(f"the interrupted run in {partial_dir} ran as {processes} process(es), this one as "
                            f"{world}; resume with the same number of processes")
        generator.set_state(gen_state[rank].clone() if world > 1 else gen_state)  # a row of its own
        history = json.loads(meta.get("history", "[]"))
        log(f"{desc}: resuming after epoch {start}/{settings.epochs}", quiet=quiet)
    elif resume is True:
        log(f"{desc}: nothing to resume in {partial_dir}; starting from scratch", quiet=quiet)

    n = images.shape[0]
    batches = math.ceil(n / settings.batch_size)
    adversarial = settings.threat is not None and settings.threat.eps > 0
    view = AttackView(model) if adversarial else None
    step_model: nn.Module = model
    if distributed.active() and world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    attack_model: nn.Module | None = view
    if settings.compile:
        step_model = torch.compile(step_model)
        attack_model = torch.compile(view) if view is not None else None
    attack = None
    if view is not None and settings.threat is not None:
        threat = settings.threat
        attack = GraphedAttack(attack_model, eps=threat.eps, step_size=threat.step_size, steps=threat.steps,
                               random_start=threat.random_start, device=device, graphs=not settings.compile)
    for epoch in range(start, settings.epochs):
        lr = lr_at(epoch, lr=settings.lr, milestones=settings.milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum, correct, seen = _train_epoch(model, images, labels, optimizer=optimizer, settings=settings,
                                               device=device, generator=generator, first=(epoch == start),
                                               desc=f"{desc} {epoch + 1}/{settings.epochs}", quiet=quiet,
                                               batches=batches, view=view, step_model=step_model,
                                               attack=attack)
        totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                                          torch.tensor(float(seen), device=device).double()]))
        loss_total, correct_total, seen_total = totals.tolist()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_total / seen_total,
                               "train_acc": correct_total / seen_total}
        if validate is not None and rank == 0:
            row.update(validate())
        row["seconds"] = time.perf_counter() - t0
        row["images_per_s"] = n * world / row["seconds"]
        history.append(row)
        extra = "".join(f" {k} {row[k]:.3f}" for k in ("val_acc", "val_ra") if k in row)
        log(f"{desc} epoch {epoch + 1}/{settings.epochs}: loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.3f}{extra} ({row['seconds']:.1f} s)", quiet=quiet)
        gen_states = distributed.all_gather_object(generator.get_state())
        if rank == 0:
            save_checkpoint(model_path, epoch + 1)
            save_state(state_path, optimizer=optimizer, epoch=epoch + 1, rng=torch.get_rng_state(),
                       generator=torch.stack(gen_states) if world > 1 else gen_states[0],
                       meta={"resume_key": key_json, "history": json.dumps(history)}, model=model)
            write_history(history_path, history)
    return history


def changed_settings(recorded: str | None, resume_key: dict[str, Any]) -> str:
    """What differs between a resume state's recorded key (JSON) and this run's, for a message:
    `epochs was 3, now 5; lr was 0.1, now 0.05`."""
    try:
        old = json.loads(recorded or "")
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return "its settings are not recorded"
    new = json.loads(json.dumps(resume_key))  # as it would be recorded: tuples become lists
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


def _train_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                 settings: LoopSettings, device: torch.device, generator: torch.Generator, first: bool, desc: str,
                 quiet: bool, batches: int, view: AttackView | None = None, step_model: nn.Module | None = None,
                 attack: GraphedAttack | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch; returns the summed loss, the correct count (tensors on the device) and the samples seen.
    `view`: the model with batch norm folded (`fuse.AttackView`), refreshed before each batch's
    `attack` (a `graphs.GraphedAttack` on the view); `step_model`: what the training step calls
    (the model, or its compiled form)."""
    step_model = model if step_model is None else step_model
    n = images.shape[0]
    perm = torch.randperm(n, generator=generator, device=images.device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    t0 = time.perf_counter()
    for b in progress(range(batches), total=batches, desc=desc, unit="batch", quiet=quiet):
        idx = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
        if len(idx) < 2 or (settings.compile and len(idx) < settings.batch_size and b > 0):
            continue  # batch norm cannot train on one sample; compiled graphs keep one batch shape
        x = to_float(batch_augment(images[idx], generator), device)
        y = labels[idx].to(device, non_blocking=True)
        if attack is not None and view is not None:
            model.eval()  # attack with fixed batch-norm statistics, as TRADES and fast-AT do
            distributed.broadcast_buffers(model)  # every process attacks with rank 0's statistics
            view.refresh()
            x = attack(x, y, generator)
        model.train()
        with autocast(device):
            logits = step_model(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(idx)
        if first and b == 2 and device.type == "cpu":
            _warn_if_slow(time.perf_counter() - t0, 3, batches, settings.epochs, quiet)
    return loss_sum, correct, max(seen, 1)


def _warn_if_slow(elapsed: float, done: int, batches: int, epochs: int, quiet: bool) -> None:
    estimate = elapsed / done * batches * epochs
    if estimate > CPU_WARN_SECONDS:
        log(f"note: this CPU run will take about {estimate / 3600:.1f} h of training; a GPU (--device cuda), "
            "a smaller --arch or fewer --epochs make it shorter", quiet=quiet)


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def prepare_partial(partial: Path, resume: bool | str) -> None:
    """The stage's in-progress folder: kept for --resume, otherwise started afresh. A kept one loses
    the temporary files a killed writer left (`.NAME.tmp*`), or they would reach the output."""
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for leftover in partial.glob(".*.tmp*"):
        if not leftover.is_dir():
            leftover.unlink(missing_ok=True)


def train(data: str | Path | None = None, *, workdir: str | Path = "aabl-out", arch: str = "resnet18",
          epochs: int = 100, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
          lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
          milestones: list[int] | None = None, val: str | Path | None = None, val_size: int = 1000,
          seed: int = 0, device: str = "auto", resume: bool | str = False, quiet: bool = False,
          cache_dir: str | Path | None = None, on_bad_file: str = "error",
          image_size: int | None = None, adv_method: str = "pgd", compile_model: bool = False,
          max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """PGD adversarial training from scratch (Madry et al.); `eps=0` trains plainly.

    `adv_method="fgsm-rs"` trains on one FGSM step of 1.25 eps from a uniform random start
    ("fast is better than free", Wong et al. 2020) instead, ignoring `steps` and `step_size`.

    Reads an image folder (default: `workdir/split/kept`), writes `workdir/train/` with
    `model.safetensors`, `train.json` and `history.csv`; returns the summary.
    """
    if adv_method not in ADV_METHODS:
        raise AablError(f"unknown --adv-method {adv_method!r}; use one of {', '.join(ADV_METHODS)}")
    if adv_method == "fgsm-rs":
        step_size, steps = 1.25 * eps, 1
    workdir = Path(workdir)
    _refuse_link_none(Path(data) if data is not None else workdir / "split" / "kept")
    if data is None:
        data = workdir / "split" / "kept"
        if not data.exists():
            raise AablError(f"no data given and {data} does not exist; run `aabl split` first or pass DATA")
    partial = workdir / ".train.partial"
    val_place = None if val is None else Place(Path(val), "the --val folder")
    refuse_overlap([Place(Path(data), "the data folder"), val_place],
                   replaces=stage_outputs(workdir, "train"), writes_into=[Place(workdir, "--workdir")],
                   fix="choose a --workdir outside the data folder and --val that does not hold them either")
    own_split = ("split",) if inside(data, workdir / "split") else ()
    with workdir_lock(workdir, *own_split, "train", quiet=quiet):  # one writer, and no split under it
        started = time.time()
        dev = distributed.setup(resolve_device(device))
        quiet = quiet or not distributed.is_main()
        with distributed.main_first():  # rank 0 fills the decode cache, the others read it
            dataset = load_image_folder(data, image_size=image_size, on_bad_file=on_bad_file, cache_dir=cache_dir,
                                        max_image_pixels=max_image_pixels, quiet=quiet)
            val_set = None
            if distributed.is_main():  # validation runs on rank 0 alone
                val_set = _load_val(val, dataset, val_size=val_size, seed=seed, cache_dir=cache_dir,
                                    max_image_pixels=max_image_pixels, quiet=quiet)
        check_image_size(dataset)
        milestones = default_milestones(epochs) if milestones is None else sorted(milestones)

        seed_everything(seed)
        mean, std = channel_stats(dataset.images)
        model = prepare_model(build_model(arch, num_classes=len(dataset.classes), image_size=dataset.image_size,
                                          mean=mean, std=std), dev)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        threat = Threat(eps=eps, step_size=step_size, steps=steps, random_start=True) if eps > 0 else None
        settings = {"data": str(Path(dataset.root).resolve()), "arch": arch, "epochs": epochs,
                    "adv_method": adv_method if eps > 0 else None, "eps": eps,
                    "step_size": step_size, "steps": steps, "random_start": True, "optimizer": "sgd", "lr": lr,
                    "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
                    "milestones": milestones,
                    "val": None if val is None else str(val), "val_size": val_size, "seed": seed,
                    "image_size": list(dataset.image_size), "compile": compile_model,
                    "distributed": distributed.describe(batch_size)}

        def save(path: Path, done: int) -> None:
            save_model(path, model, arch=arch, classes=dataset.classes, image_size=dataset.image_size, stage="train",
                       adv_eps=eps, epochs=done, seed=seed, dataset_fingerprint=dataset.fingerprint)

        validate = None
        if val_set is not None:
            vx, vy = val_set
            val_threat = threat if threat is not None else PAPER_RA

            def validate() -> dict[str, float]:
                gen = make_generator(dev, seed)
                return {"val_acc": accuracy(model, vx, vy, device=dev, batch_size=256),
                        "val_ra": accuracy(model, vx, vy, device=dev, batch_size=256, threat=val_threat, generator=gen)}

        if distributed.is_main():
            prepare_partial(partial, resume)
        distributed.barrier()
        images, labels = place_on_device(dataset, dev, distributed.training_shard(len(dataset)))
        history = fit(model, images, labels, optimizer=optimizer,
                      settings=LoopSettings(epochs=epochs, batch_size=batch_size, threat=threat, milestones=milestones,
                                            lr=lr, compile=compile_model),
                      device=dev, seed=seed, partial_dir=partial, resume=resume, save_checkpoint=save,
                      resume_key={**settings, "fingerprint": dataset.fingerprint}, desc="train", quiet=quiet,
                      validate=validate)
        summary = {
            "stage": "train", "aabl_version": __version__, "torch_version": torch.__version__,
            "device": str(dev), "settings": settings, "dataset_fingerprint": dataset.fingerprint,
            "samples": len(dataset), "classes": dataset.classes, "class_counts": dataset.class_counts(),
            "skipped": dataset.skipped, "final": history[-1] if history else {},
            "seconds": time.time() - started,
        }
        if distributed.is_main():
            write_json(partial / "train.json", summary)
            replace_dir(partial, workdir / "train")
        return summary


def _refuse_link_none(data: Path) -> None:
    """A split written with `--link none` leaves kept/ and isolated/ without images: say so, not "no images"."""
    split_json = data.parent / "split.json"
    if data.name not in ("kept", "isolated") or not split_json.is_file():
        return
    try:
        link = json.loads(split_json.read_text())["settings"]["link"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if link == "none":
        raise AablError(f"{data.parent} was written by `aabl split --link none`, which lists the split in split.csv "
                        f"but puts no images in {data}; split again with `aabl split --link copy` (or hardlink or "
                        "symlink), then train")


def place_on_device(dataset: ImageDataset, device: torch.device,
                    indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 set (or the rows `indices`, a process's shard) where training reads it: on a
    GPU resident on the device; on the CPU in host memory."""
    images, labels = dataset.images, dataset.labels
    whole = indices is None or (len(indices) == len(labels) and torch.equal(indices, torch.arange(len(labels))))
    if not whole:  # a copy of the shard alone; the whole set stays shared (memory-mapped)
        images, labels = images[indices], labels[indices]
    if device.type == "cuda":
        return images.to(device), labels.to(device)
    return images, labels


def _load_val(val: str | Path | None, train_set: ImageDataset, *, val_size: int, seed: int,
              cache_dir: str | Path | None, max_image_pixels: int,
              quiet: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    if val is None:
        return None
    val_set = load_image_folder(val, image_size=train_set.image_size, cache_dir=cache_dir, min_classes=1,
                                max_image_pixels=max_image_pixels, quiet=quiet)
    if val_set.classes != train_set.classes:
        raise AablError(f"--val {val} has classes {val_set.classes}, the training data {train_set.classes}; "
                        "pass a validation folder with the same class folders")
    idx = balanced_subset(val_set.labels, size=val_size, seed=seed)
    return val_set.images[idx], val_set.labels[idx]

