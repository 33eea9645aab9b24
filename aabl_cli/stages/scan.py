"""Stage 1: train a naive model, then score every sample by how well it resists iFGSM.

Score = SCE of the adversarial example against the sample's given label. Lower score =
more robust = more suspicious: a patch-trigger poison stays classified as its (target)
label under a tiny perturbation, a clean sample flips.
"""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aabl_cli import __version__
from aabl_cli.core import distributed
from aabl_cli.core.checkpoint import load_model, save_model
from aabl_cli.core.data import ImageDataset, check_image_size
from aabl_cli.core.device import autocast, prepare_model, seed_everything, use_precision
from aabl_cli.core.errors import RuntimeFault
from aabl_cli.core.fsutil import SECOND_ROUND, Place, refuse_overlap, replace_dir, write_json
from aabl_cli.core.fuse import AttackView
from aabl_cli.core.graphs import GraphedAttack
from aabl_cli.core.groundtruth import read_ground_truth
from aabl_cli.core.images import DEFAULT_MAX_IMAGE_PIXELS
from aabl_cli.core.lock import workdir_lock
from aabl_cli.core.loop import (
    choose_path,
    fit,
    host_images,
    open_training_set,
    place_on_device,
    sampling_generator,
    step_schedule,
)
from aabl_cli.core.losses import sce
from aabl_cli.core.models import build_model, channel_stats
from aabl_cli.core.pixels import batch_to_float
from aabl_cli.core.plots import plot_scores
from aabl_cli.core.progress import log, progress
from aabl_cli.core.resume import Resume, prepare_folder, write_history
from aabl_cli.core.stream import Images, read_batches
from aabl_cli.core.threshold import choose_isolated
from aabl_cli.core.workdir import Workdir

SCORE_FIELDS = ("index", "path", "label", "class", "score", "ce_adv", "loss_clean", "pred_clean", "pred_adv")


def score_samples(model: nn.Module, images: Images, labels: torch.Tensor, *, device: torch.device,
                  eps: float, step_size: float, steps: int, alpha: float = 0.1, beta: float = 1.0,
                  batch_size: int = 256, quiet: bool = False) -> dict[str, np.ndarray]:
    """Attack every sample with iFGSM (model in eval mode, no augmentation) and score it.

    `images` uint8 (N, C, H, W): a tensor, or a `StreamedImages` read ahead batch by batch.
    Returns arrays of length N in dataset order: `score` (SCE on the adversarial
    example), `ce_adv`, `loss_clean` (SCE on the clean image), `pred_clean`, `pred_adv`.
    """
    model.eval()
    view = AttackView(model)  # batch norm folded away: same outputs, cheaper steps
    attack = GraphedAttack(view, eps=eps, step_size=step_size, steps=steps, random_start=False, device=device)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("score", "ce_adv", "loss_clean", "pred_clean", "pred_adv")}
    n = images.shape[0]
    starts = range(0, n, batch_size)
    chunks = read_batches(images, [slice(start, start + batch_size) for start in starts])
    for start, chunk in progress(zip(starts, chunks), total=len(starts), desc="scoring", unit="batch", quiet=quiet):
        x = batch_to_float(chunk, device)
        y = labels[start:start + batch_size].to(device)
        x_adv = attack(x, y)  # iFGSM: PGD without a random start
        with torch.no_grad(), autocast(device):
            logits_clean = view(x).float()
            logits_adv = view(x_adv).float()
        out["score"].append(sce(logits_adv, y, alpha=alpha, beta=beta))
        out["ce_adv"].append(F.cross_entropy(logits_adv, y, reduction="none"))
        out["loss_clean"].append(sce(logits_clean, y, alpha=alpha, beta=beta))
        out["pred_clean"].append(logits_clean.argmax(dim=1))
        out["pred_adv"].append(logits_adv.argmax(dim=1))
    return {k: torch.cat(v).cpu().numpy() if v else np.empty(0) for k, v in out.items()}


def _score_batch(batch_size: int, device: torch.device) -> int:
    """Scoring batch: larger on a GPU (throughput); on the CPU the training batch, whose
    activations the host already held, so scoring raises no memory peak of its own."""
    return max(batch_size, 256) if device.type == "cuda" else batch_size


def write_scores(path: Path, dataset: ImageDataset, scores: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SCORE_FIELDS)
        labels = dataset.labels.tolist()
        for i, rel in enumerate(dataset.paths):
            writer.writerow([i, rel, labels[i], dataset.classes[labels[i]], f"{scores['score'][i]:.9g}",
                             f"{scores['ce_adv'][i]:.9g}", f"{scores['loss_clean'][i]:.9g}",
                             int(scores["pred_clean"][i]), int(scores["pred_adv"][i])])


def scan_settings(data: str | Path, *, image_size: Sequence[int], arch: str, epochs: int, lr: float,
                  batch_size: int, eps: float, step_size: float, steps: int, alpha: float, beta: float,
                  model: str | Path | None, seed: int, compile: bool, precision: str,
                  distributed: dict[str, Any]) -> dict[str, Any]:
    """The settings scan.json records (and `aabl run` compares) for these options on images of
    `image_size` [H, W]. With `model` the scan trained nothing: `arch` is the checkpoint's, `epochs` 0."""
    return {"data": str(Path(data).resolve()), "arch": arch, "epochs": epochs, "optimizer": "adam", "lr": lr,
            "weight_decay": 0.0, "batch_size": batch_size, "eps": eps, "step_size": step_size, "steps": steps,
            "random_start": False, "alpha": alpha, "beta": beta, "model": None if model is None else str(model),
            "seed": seed, "image_size": list(image_size), "compile": compile, "precision": precision,
            "distributed": distributed}


def scan(data: str | Path, *, workdir: str | Path = "aabl-out", arch: str = "resnet18", epochs: int = 20,
         lr: float = 1e-3, batch_size: int = 128, eps: float = 2 / 255, step_size: float = 2 / 255,
         steps: int = 5, alpha: float = 0.1, beta: float = 1.0, model: str | Path | None = None, seed: int = 0,
         device: str = "auto", resume: bool | str = False, quiet: bool = False, cache_dir: str | Path | None = None,
         on_bad_file: str = "error", image_size: int | None = None, compile: bool = False, precision: str = "auto",
         max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data_memory: int | str = "auto") -> dict[str, Any]:
    """Naive training (Adam, no weight decay, crop+flip) then iFGSM scoring of every sample.

    Writes `workdir/scan/` with `scores.csv`, `model.safetensors`, `scan.json` and
    `scores.png`; with `model` (a checkpoint) the training is skipped. Returns the summary.
    `precision` of the forward passes: `core.device.use_precision`. `data_memory` (bytes, or
    "auto"): the budget above which the images are streamed from the decode cache rather than
    held (`core.memory`); the same results either way, recorded as `data_path`, not a setting.
    """
    wd = Workdir(workdir)
    partial = wd.partial("scan")
    refuse_overlap([Place(Path(data), "the data folder")], writes_into=[Place(wd.root, "--workdir")],
                   replaces=[*wd.outputs("scan"), *wd.outputs("split", note=" (written next)")],
                   fix=f"choose a --workdir outside the data folder that does not hold it either ({SECOND_ROUND})")
    # one writer at a time, until scan/ is in place
    with workdir_lock(wd.root, "scan", quiet=quiet), use_precision(precision):
        started = time.time()
        dev, dataset, quiet = open_training_set(data, device=device, quiet=quiet, image_size=image_size,
                                                on_bad_file=on_bad_file, cache_dir=cache_dir,
                                                max_image_pixels=max_image_pixels)
        check_image_size(dataset)
        processes = f" in {distributed.world()} processes" if distributed.world() > 1 else ""
        log(f"scan: {len(dataset)} images, {len(dataset.classes)} classes, {dataset.image_size[0]}x"
            f"{dataset.image_size[1]} px, on {dev}{processes}", quiet=quiet)
        prepare_folder(partial, resume)
        seed_everything(seed)
        given = None if model is None else load_model(Path(model), device=dev, classes=dataset.classes)
        settings = scan_settings(dataset.root, image_size=dataset.image_size,
                                 arch=arch if given is None else given[1]["arch"],
                                 epochs=epochs if given is None else 0, lr=lr, batch_size=batch_size, eps=eps,
                                 step_size=step_size, steps=steps, alpha=alpha, beta=beta, model=model, seed=seed,
                                 compile=compile, precision=precision, distributed=distributed.describe(batch_size))
        train_seconds = 0.0
        n = len(dataset)
        train_idx, score_idx = distributed.training_shard(n), distributed.shard(n)  # both arange(n) alone
        path = choose_path(dataset, dev, train_idx, data_memory=data_memory)
        if path.streamed:
            log(f"scan: streaming the images from the decode cache: {path.reason}", quiet=quiet)
        images: Images | None = None
        history: list[dict[str, Any]] = []
        if given is not None:
            net, meta = given
            if list(meta["image_size"]) != list(dataset.image_size):
                log(f"note: the checkpoint was trained at {meta['image_size']} px, the data is "
                    f"{list(dataset.image_size)} px", quiet=quiet)
            net = prepare_model(net, dev)
            if distributed.is_main():
                shutil.copyfile(model, partial.model)  # the scoring model, as it was given
        else:
            mean, std = channel_stats(host_images(dataset, stream=path.streamed))
            net = prepare_model(build_model(arch, num_classes=len(dataset.classes), image_size=dataset.image_size,
                                            mean=mean, std=std), dev)
            optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=0.0)

            def save(path: Path, done: int) -> None:
                save_model(path, net, arch=arch, classes=dataset.classes, image_size=dataset.image_size, stage="scan",
                           eps=0.0, epochs=done, seed=seed, dataset_fingerprint=dataset.fingerprint)

            t0 = time.time()
            images, labels = place_on_device(dataset, dev, train_idx, stream=path.streamed)
            state = Resume(partial, key={**settings, "fingerprint": dataset.fingerprint}, mode=resume,
                           save_model=save, desc="scan: naive training", quiet=quiet)
            generator = sampling_generator(images.device, seed)
            start, done = state.restore(net, optimizer, generator, epochs=epochs)
            history = fit(net, images, labels, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
                          schedule=step_schedule(lr), device=dev, generator=generator, start_epoch=start,
                          history=done, on_epoch=state.save, compile=compile, desc="scan: naive training",
                          quiet=quiet)
            train_seconds = time.time() - t0
        if images is None or not torch.equal(train_idx, score_idx):
            images, labels = place_on_device(dataset, dev, score_idx, stream=path.streamed)
        t0 = time.time()
        local = score_samples(net, images, labels, device=dev, eps=eps, step_size=step_size, steps=steps,
                              alpha=alpha, beta=beta, batch_size=_score_batch(batch_size, dev), quiet=quiet)
        scores = {k: distributed.gather_in_order(torch.from_numpy(v), score_idx, n).numpy() for k, v in local.items()}
        score_seconds = time.time() - t0
        log(f"scan: scored {len(dataset)} images with iFGSM in {score_seconds:.1f} s", quiet=quiet)
        if not np.isfinite(scores["score"]).all():
            raise RuntimeFault(f"scoring {dataset.root} produced non-finite scores (the naive model diverged); "
                               "try a lower --lr or another --seed")
        if not distributed.is_main():  # rank 0 writes the outputs
            return {"stage": "scan", "rank": distributed.rank(), "samples": n}
        write_scores(partial.scores, dataset, scores)
        if history:
            write_history(partial.history, history)

        truth = read_ground_truth(dataset.root, dataset.paths)
        isolated, threshold = choose_isolated(scores["score"], method="otsu")
        plot_scores(partial.scores_png, scores["score"], threshold=threshold, isolated=isolated, poisoned=truth)
        labels_np = dataset.labels.numpy()
        summary = {
            "stage": "scan", "aabl_version": __version__, "torch_version": torch.__version__, "device": str(dev),
            "data": str(Path(dataset.root).resolve()), "dataset_fingerprint": dataset.fingerprint,
            "settings": settings, "data_path": path.as_record(), "samples": len(dataset), "classes": dataset.classes,
            "class_counts": dataset.class_counts(), "skipped": dataset.skipped,
            # the naive model on its own training images: its last epoch's (augmented) accuracy, then in
            # eval mode on the images as they are (acc) and under the scoring iFGSM (ra)
            "train_acc": history[-1]["train_acc"] if history else None,
            "acc": float((scores["pred_clean"] == labels_np).mean()),
            "ra": float((scores["pred_adv"] == labels_np).mean()),
            "score_median": float(np.median(scores["score"])),
            "otsu_preview": {"threshold": threshold, "isolated": int(isolated.sum())},
            "seconds": {"train": train_seconds, "score": score_seconds, "total": time.time() - started},
        }
        write_json(partial.json, summary)
        replace_dir(partial.path, wd.scan.path)
        return summary
