"""The one training loop: plain or adversarial, on one device or data-parallel, with no files.

The loop works on the uint8 dataset tensor, or on its stream from the decode cache when the
set does not fit the memory budget (`core.memory`, `core.stream`): batches are `randperm`
slices, read ahead on a background thread when streamed, augmentation (random crop with
padding, horizontal flip) is batched tensor work on the delivered batch, and the float
conversion happens per batch. Loss and accuracy accumulate as tensors, so nothing
waits for the device inside the loop. The learning rate is a function of the fractional
epoch, set before every batch (`step_schedule`, `onecycle_schedule`). What happens between
epochs (checkpoints, resume state: `core.resume`) is the caller's `on_epoch`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aabl_cli.core import distributed
from aabl_cli.core.attacks import Threat
from aabl_cli.core.data import ImageDataset, load_image_folder
from aabl_cli.core.device import autocast, make_generator, resolve_device
from aabl_cli.core.ema import EMA
from aabl_cli.core.fuse import AttackView
from aabl_cli.core.graphs import GraphedAttack
from aabl_cli.core.memory import DataPath, choose_data_path
from aabl_cli.core.pixels import batch_to_float
from aabl_cli.core.progress import log, progress
from aabl_cli.core.stream import Images, StreamedImages, read_batches

CPU_WARN_SECONDS = 3600
SCHEDULES = ("step", "onecycle")
ONECYCLE_PEAK = 0.4  # share of the iterations over which onecycle rises to its peak
RANK_SEED_STRIDE = 1_000_003  # each process samples with its own generator: seed + stride * rank


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


def lr_at(epoch: float, *, lr: float, milestones: list[int]) -> float:
    """Step schedule: x0.1 at each milestone epoch; `epoch` is 0-based and may be fractional
    (epoch + batch / batches): the whole epoch keeps the rate of its start."""
    whole = math.floor(epoch)
    return lr * 0.1 ** sum(1 for m in milestones if whole >= m)


def step_schedule(lr: float, milestones: Sequence[int] = ()) -> Callable[[float], float]:
    """epoch (0-based, fractional) -> learning rate: `lr`, x0.1 at each milestone; constant without milestones."""
    return functools.partial(lr_at, lr=lr, milestones=list(milestones))


def onecycle_at(epoch: float, *, lr: float, epochs: int, peak: float = ONECYCLE_PEAK) -> float:
    """One cycle (Smith; Wong, Rice & Kolter 2020): from 0 up to `lr` linearly over the first `peak`
    share of the `epochs`, then linearly down to 0 at the end; `epoch` is fractional and 0-based."""
    top = peak * epochs
    if epoch <= top:
        return lr * epoch / top
    return lr * max(0.0, epochs - epoch) / (epochs - top)


def onecycle_schedule(lr: float, epochs: int) -> Callable[[float], float]:
    """epoch (0-based, fractional) -> learning rate of the one-cycle schedule over `epochs`."""
    return functools.partial(onecycle_at, lr=lr, epochs=epochs)


def make_schedule(name: str, *, lr: float, epochs: int, milestones: Sequence[int] = ()) -> Callable[[float], float]:
    """The schedule called `name` (SCHEDULES): step (x0.1 at each of `milestones`) or onecycle."""
    return onecycle_schedule(lr, epochs) if name == "onecycle" else step_schedule(lr, milestones)


def open_training_set(data: str | Path, *, device: str, quiet: bool, **load: Any
                      ) -> tuple[torch.device, ImageDataset, bool]:
    """A training stage's start: join torchrun's process group when launched by it (else just resolve
    `device`), then decode `data` (`load`: load_image_folder's options), rank 0 first so that it fills
    the decode cache the others read. Returns this process's device, the dataset and whether this
    process stays quiet (every one but rank 0)."""
    dev = distributed.setup(resolve_device(device))
    quiet = quiet or not distributed.is_main()
    with distributed.main_first():
        dataset = load_image_folder(data, quiet=quiet, **load)
    return dev, dataset, quiet


def choose_path(dataset: ImageDataset, device: torch.device, indices: torch.Tensor | None = None, *,
                data_memory: int | str = "auto") -> DataPath:
    """Resident or streamed: whether this process's rows (`indices`, default all) fit `data_memory`
    (`core.memory.choose_data_path`)."""
    count = len(dataset) if indices is None else len(indices)
    return choose_data_path(count * dataset.row_bytes, data_memory=data_memory, device=device)


def host_images(dataset: ImageDataset, *, stream: bool) -> Images:
    """All of `dataset`'s images in host memory as the data path reads them (e.g. for `channel_stats`):
    the memory-mapped tensor, or a stream that reads a few rows at a time."""
    return StreamedImages(dataset, torch.device("cpu")) if stream else dataset.images


def place_on_device(dataset: ImageDataset, device: torch.device, indices: torch.Tensor | None = None, *,
                    stream: bool = False) -> tuple[Images, torch.Tensor]:
    """The uint8 set (or the rows `indices`, a process's shard) where training reads it: on a
    GPU resident on the device; on the CPU in host memory; with `stream`, a `StreamedImages` that
    reads each batch from the decode cache and delivers it there. Labels are always resident."""
    images, labels = dataset.images, dataset.labels
    whole = indices is None or (len(indices) == len(labels) and torch.equal(indices, torch.arange(len(labels))))
    if not whole:
        labels = labels[indices]
    if stream:
        streamed = StreamedImages(dataset, device, None if whole else indices)
        return streamed, labels.to(streamed.device)
    if not whole:  # a copy of the shard alone; the whole set stays shared (memory-mapped)
        images = images[indices]
    if device.type == "cuda":
        return images.to(device), labels.to(device)
    return images, labels


def sampling_generator(device: torch.device, seed: int) -> torch.Generator:
    """The generator `fit` shuffles and augments with: one per process under torchrun."""
    return make_generator(device, seed + RANK_SEED_STRIDE * distributed.rank())


def fit(model: nn.Module, images: Images, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
        epochs: int, batch_size: int, schedule: Callable[[float], float], device: torch.device,
        threat: Threat | None = None, ema: EMA | None = None, seed: int = 0,
        generator: torch.Generator | None = None, start_epoch: int = 0, history: list[dict[str, Any]] | None = None,
        on_epoch: Callable[[int, list[dict[str, Any]]], None] | None = None,
        validate: Callable[[], dict[str, float]] | None = None, compile: bool = False,
        desc: str = "training", quiet: bool = False) -> list[dict[str, Any]]:
    """Train `model` in place from `start_epoch` to `epochs`; returns the history (one row per epoch).

    `images` uint8 (N, C, H, W) (a tensor, or a `StreamedImages`) and `labels` int64 (N,) may live
    on the CPU or on `device`.
    `schedule(t)` gives the learning rate of the batch at t = epoch + batch / batches (0-based);
    a row's `lr` is its epoch's first. With `threat` (eps > 0) every batch is replaced by its
    PGD examples, made in eval mode (fixed batch-norm statistics), before the training step.
    `ema` (`core.ema.EMA`) is updated after every optimizer step. Batches are drawn with
    `generator` (default: `sampling_generator(seed)`). `validate()` (rank 0; it picks the model
    it measures: the EMA's when there is one) adds its numbers to each row;
    `on_epoch(epochs_done, history)` runs after every epoch on every process (saving resume
    state: `core.resume.Resume.save`).
    `compile`: torch.compile the passes, dropping each epoch's last partial batch.
    Under torchrun each process passes its own shard (all of the same size) and the model
    trains wrapped in DistributedDataParallel.
    """
    world, rank = distributed.world(), distributed.rank()
    quiet = quiet or rank != 0
    generator = sampling_generator(images.device, seed) if generator is None else generator
    history = list(history or [])
    n = images.shape[0]
    batches = math.ceil(n / batch_size)
    view = AttackView(model) if threat is not None and threat.eps > 0 else None
    step_model: nn.Module = model
    if distributed.active() and world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    attack_model: nn.Module | None = view
    if compile:
        step_model = torch.compile(step_model)
        attack_model = torch.compile(view) if view is not None else None
    attack = None
    if view is not None and threat is not None:
        attack = GraphedAttack(attack_model, eps=threat.eps, step_size=threat.step_size, steps=threat.steps,
                               random_start=threat.random_start, device=device, graphs=not compile)
    for epoch in range(start_epoch, epochs):
        lr = schedule(epoch)
        t0 = time.perf_counter()
        loss_sum, correct, seen = _train_epoch(model, images, labels, optimizer=optimizer, batch_size=batch_size,
                                               device=device, generator=generator, compile=compile,
                                               warn_epochs=epochs if epoch == start_epoch else None,
                                               desc=f"{desc} {epoch + 1}/{epochs}", quiet=quiet, batches=batches,
                                               schedule=schedule, epoch=epoch, ema=ema,
                                               view=view, step_model=step_model, attack=attack)
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
        log(f"{desc} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.3f}{extra} ({row['seconds']:.1f} s)", quiet=quiet)
        if on_epoch is not None:
            on_epoch(epoch + 1, history)
    return history


def _train_epoch(model: nn.Module, images: Images, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                 batch_size: int, device: torch.device, generator: torch.Generator, compile: bool,
                 warn_epochs: int | None, desc: str, quiet: bool, batches: int,
                 schedule: Callable[[float], float], epoch: int, ema: EMA | None = None,
                 view: AttackView | None = None, step_model: nn.Module | None = None,
                 attack: GraphedAttack | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch; returns the summed loss, the correct count (tensors on the device) and the samples seen.
    Batch b of epoch `epoch` steps at the learning rate `schedule(epoch + b / batches)`; `ema` is
    updated after each optimizer step.
    `view`: the model with batch norm folded (`fuse.AttackView`), refreshed before each batch's
    `attack` (a `graphs.GraphedAttack` on the view); `step_model`: what the training step calls
    (the model, or its compiled form). `warn_epochs`: on the CPU, estimate that many epochs from
    this one's first batches and warn when they take long."""
    step_model = model if step_model is None else step_model
    n = images.shape[0]
    perm = torch.randperm(n, generator=generator, device=images.device)
    steps = [(b, perm[b * batch_size:(b + 1) * batch_size]) for b in range(batches)]
    # batch norm cannot train on one sample; compiled graphs keep one batch shape
    steps = [(b, idx) for b, idx in steps if len(idx) >= 2 and not (compile and len(idx) < batch_size and b > 0)]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    t0 = time.perf_counter()
    chunks = read_batches(images, [idx for _, idx in steps])
    for (b, idx), chunk in progress(zip(steps, chunks), total=len(steps), desc=desc, unit="batch", quiet=quiet):
        x = batch_to_float(batch_augment(chunk, generator), device)
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
        for group in optimizer.param_groups:
            group["lr"] = schedule(epoch + b / batches)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(idx)
        if warn_epochs is not None and b == 2 and device.type == "cpu":
            _warn_if_slow(time.perf_counter() - t0, 3, batches, warn_epochs, quiet)
    return loss_sum, correct, max(seen, 1)


def _warn_if_slow(elapsed: float, done: int, batches: int, epochs: int, quiet: bool) -> None:
    estimate = elapsed / done * batches * epochs
    if estimate > CPU_WARN_SECONDS:
        log(f"note: this CPU run will take about {estimate / 3600:.1f} h of training; a GPU (--device cuda), "
            "a smaller --arch or fewer --epochs make it shorter", quiet=quiet)
