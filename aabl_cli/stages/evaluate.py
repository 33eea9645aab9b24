"""Batched evaluation: clean accuracy (ACC), robust accuracy (RA) under PGD, APGD-CE or AutoAttack's
white-box part, attack success (ASR)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aabl_cli.core import distributed
from aabl_cli.core.accuracy import accuracy, predict
from aabl_cli.core.apgd import INITIAL_STEP, MOMENTUM, RHO, checkpoints, target_count
from aabl_cli.core.attacks import PAPER_RA, Threat
from aabl_cli.core.checkpoint import load_model
from aabl_cli.core.data import ImageDataset, list_image_folder, load_image_folder
from aabl_cli.core.device import make_generator, prepare_model, resolve_device, use_precision
from aabl_cli.core.errors import AablError
from aabl_cli.core.memory import choose_data_path
from aabl_cli.core.stream import Images, StreamedImages, select
from aabl_cli.core.text import in_255ths


def _load_for_model(folder: str | Path, classes: list[str], image_size: list[int], *,
                    cache_dir: str | Path | None, quiet: bool) -> tuple[ImageDataset, torch.Tensor]:
    """An image folder and its labels in the checkpoint's class indices (folder names must be among them)."""
    data = load_image_folder(folder, image_size=tuple(image_size), cache_dir=cache_dir, min_classes=1,
                             warn_empty=False, quiet=quiet)
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise AablError(f"{folder} has class folder(s) {unknown[:5]} that the model does not know "
                        f"(its classes: {classes[:10]}); use a folder with the training class names")
    mapping = torch.tensor([classes.index(c) for c in data.classes], dtype=torch.int64)
    return data, mapping[data.labels]


def evaluate(model: str | Path, test: str | Path, *, poisoned: str | Path | None = None,
             threat: Threat = PAPER_RA, batch_size: int = 256, seed: int = 0, device: str = "auto",
             cache_dir: str | Path | None = None, precision: str = "auto", data_memory: int | str = "auto",
             quiet: bool = False) -> dict[str, Any]:
    """ACC on the clean `test` folder, RA under `threat` (its `attack`), ASR on the `poisoned` folder.

    The poisoned folder holds triggered images relabelled to the target (`aabl poison
    --test`), so ASR is the share classified as their (target) label; `target_rate` is the
    same share on the clean non-target test images, ASR's baseline. Returns fractions.
    `precision` of the forward passes: `core.device.use_precision` (recorded in the result).
    `data_memory` (bytes, or "auto"): the budget above which the test images are streamed from
    the decode cache (`core.memory`); the path taken is recorded as `data_path`.
    """
    dev = distributed.setup(resolve_device(device))
    quiet = quiet or not distributed.is_main()
    if poisoned is not None:
        check_triggered_set(poisoned)
    with use_precision(precision):
        result = _evaluate(model, test, poisoned=poisoned, threat=threat, batch_size=batch_size, seed=seed, dev=dev,
                           cache_dir=cache_dir, data_memory=data_memory, quiet=quiet)
    result["precision"] = precision
    return result


def _evaluate(model: str | Path, test: str | Path, *, poisoned: str | Path | None, threat: Threat, batch_size: int,
              seed: int, dev: torch.device, cache_dir: str | Path | None, data_memory: int | str,
              quiet: bool) -> dict[str, Any]:
    net, meta = load_model(Path(model), device=dev)
    net = prepare_model(net, dev)
    started = time.time()
    with distributed.main_first():  # rank 0 fills the decode cache, the others read it
        test_set, labels = _load_for_model(test, meta["classes"], meta["image_size"], cache_dir=cache_dir,
                                           quiet=quiet)
        poisoned_set, p_labels = (None, None) if poisoned is None else _load_for_model(
            poisoned, meta["classes"], meta["image_size"], cache_dir=cache_dir, quiet=quiet)
    sets = [s for s in (test_set, poisoned_set) if s is not None]
    path = choose_data_path(sum(len(s) * s.row_bytes for s in sets), data_memory=data_memory, device=dev)
    images = StreamedImages(test_set, dev) if path.streamed else test_set.images
    result: dict[str, Any] = {
        "model": str(model), "test": str(test), "samples": int(images.shape[0]), "data_path": path.as_record(),
        "acc": _sharded_accuracy(net, images, labels, device=dev, batch_size=batch_size),
    }
    if threat.eps > 0:
        result["ra"] = _sharded_accuracy(net, images, labels, device=dev, batch_size=batch_size, threat=threat,
                                         generator=make_generator(dev, seed + 1_000_003 * distributed.rank()))
        result["attack"] = attack_record(threat, classes=len(meta["classes"]))
        result["threat"] = asdict(threat)
    if poisoned_set is not None and p_labels is not None:
        p_images = StreamedImages(poisoned_set, dev) if path.streamed else poisoned_set.images
        result["poisoned"] = str(poisoned)
        result["asr"] = _sharded_accuracy(net, p_images, p_labels, device=dev, batch_size=batch_size)
        result.update(_target_rate(net, images, labels, p_labels, meta["classes"], device=dev,
                                   batch_size=batch_size))
    result["warnings"] = reading_warnings(result)
    if distributed.world() > 1:
        result["distributed"] = distributed.describe(batch_size)
    result["seconds"] = {"total": time.time() - started}
    return result


def attack_record(threat: Threat, *, classes: int) -> dict[str, Any]:
    """What RA was measured under, for the JSON: the attack's name and the settings it ran with."""
    record: dict[str, Any] = {"name": threat.attack, "eps": threat.eps, "steps": threat.steps,
                              "restarts": threat.restarts}
    if threat.attack == "pgd":
        return {**record, "step_size": threat.step_size, "random_start": threat.random_start}
    record.update(parts=["apgd-ce"], random_start=True, initial_step=INITIAL_STEP * threat.eps, momentum=MOMENTUM,
                  rho=RHO, checkpoints=checkpoints(threat.steps))
    if threat.attack == "autoattack":
        record.update(parts=["apgd-ce", "apgd-t"], targets=target_count(classes), not_run=["fab-t", "square"])
    return record


def describe(result: dict[str, Any]) -> str:
    """One line for a person: ACC, RA and the attack it is under, ASR and its target rate."""
    parts = [f"ACC {100 * result['acc']:.1f}%"]
    if "ra" in result:
        parts.append(f"RA {100 * result['ra']:.1f}% under {attack_name(result['attack'])}")
    if "asr" in result:
        rate = result.get("target_rate")
        parts.append(f"ASR {100 * result['asr']:.1f}%" + ("" if rate is None else f" (target rate {100 * rate:.1f}%)"))
    return ", ".join(parts)


def attack_name(record: dict[str, Any]) -> str:
    """`attack_record` in words: PGD-10 at eps 8/255, APGD-CE with 100 iterations at eps 8/255, ..."""
    budget = f"eps {_budget(record['eps'])}"
    restarts = f", {record['restarts']} restarts" if record["restarts"] > 1 else ""
    if record["name"] == "pgd":
        return f"PGD-{record['steps']} at {budget}, step {_budget(record['step_size'])}{restarts}"
    if record["name"] == "apgd":
        return f"APGD-CE with {record['steps']} iterations at {budget}{restarts}"
    return (f"AutoAttack's APGD-CE and APGD-T ({record['targets']} targets), {record['steps']} iterations each, "
            f"at {budget}{restarts}")


def _budget(value: float) -> str:
    """8/255 for a whole number of 255ths, else the decimal."""
    n255 = in_255ths(value)
    return f"{value:.4g}" if n255 is None else f"{n255}/255"


def check_triggered_set(folder: str | Path) -> None:
    """ASR counts the triggered images classified as the one target class, so `folder` must hold
    images under one class folder only (the target's, as `aabl poison --test` writes it). A folder
    with several labels, e.g. the clean test set, would report its accuracy as the ASR."""
    listing = list_image_folder(folder)
    filled = sorted({listing.classes[label] for _, label in listing.files})
    if len(filled) > 1:
        shown = ", ".join(repr(c) for c in filled[:5]) + (", ..." if len(filled) > 5 else "")
        raise AablError(f"--poisoned {folder} holds images in {len(filled)} class folders ({shown}), but ASR needs "
                        "one target class: pass the triggered set that `aabl poison --test` writes, which holds "
                        "only triggered images, all under the target class's folder")


def _target_rate(net: nn.Module, images: Images, labels: torch.Tensor, p_labels: torch.Tensor,
                 classes: list[str], *, device: torch.device, batch_size: int) -> dict[str, Any]:
    """ASR's baseline: the share of clean test images outside the target class classified as the
    target, without any trigger. An ASR near it says the model favours the target class, not that
    it learnt the trigger. Empty without one target or without clean non-target images."""
    targets = p_labels.unique()
    if len(targets) != 1:
        return {}
    target = int(targets[0])
    others = labels != target
    if not bool(others.any()):
        return {}
    rate = _sharded_accuracy(net, select(images, others), torch.full((int(others.sum()),), target, dtype=labels.dtype),
                             device=device, batch_size=batch_size)
    return {"target": classes[target], "target_rate": rate}


# an ASR this close to the target rate (and that rate this high) is the model's bias, not a trigger
BIAS_MARGIN, BIAS_FLOOR = 0.10, 0.20


def reading_warnings(result: dict[str, Any]) -> list[str]:
    """What a reader of `result` must know before trusting its ASR: a model that already
    classifies many clean non-target images as the target scores a high ASR without having
    learnt any trigger (it has collapsed onto, or favours, that class)."""
    asr, rate = result.get("asr"), result.get("target_rate")
    if asr is None or rate is None or rate < BIAS_FLOOR or asr - rate >= BIAS_MARGIN:
        return []
    return [f"ASR {100 * asr:.1f}% is within {100 * BIAS_MARGIN:.0f} points of the target rate {100 * rate:.1f}%: "
            f"without any trigger the model already classifies that share of clean non-target images as "
            f"{result['target']!r}, so the ASR shows a bias towards that class, not a learnt trigger"]


def _sharded_accuracy(model: nn.Module, images: Images, labels: torch.Tensor, *, device: torch.device,
                      batch_size: int, threat: Threat | None = None,
                      generator: torch.Generator | None = None) -> float:
    """`accuracy` over this process's shard, summed over the processes under torchrun."""
    if distributed.world() == 1:
        return accuracy(model, images, labels, device=device, batch_size=batch_size, threat=threat,
                        generator=generator)
    idx = distributed.shard(images.shape[0])
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    if len(idx):
        pred = predict(model, select(images, idx), device=device, batch_size=batch_size, threat=threat,
                       generator=generator, labels=labels[idx])
        correct[0] = float((pred == labels[idx]).sum())
        correct[1] = float(len(idx))
    right, total = distributed.all_reduce_sum(correct).tolist()
    return right / total if total else float("nan")
