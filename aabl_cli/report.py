"""`aabl report`: one self-contained HTML page that shows what a split removed and why.

It reads a work directory (scan/, split/ and, when present, train/) and never writes into
it except the page itself. The gallery shows the most robust (lowest-score) isolated images
of each class beside a gradient saliency map from the scan's model: |d loss / d x| against
the image's label, max over channels. A patch trigger is the robust feature that holds the
label in place, so the map lights up where the trigger sits.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from aabl_cli import report_html
from aabl_cli.backdoors.base import to_float
from aabl_cli.checkpoint import load_model
from aabl_cli.data import decode_image
from aabl_cli.device import resolve_device
from aabl_cli.errors import AablError
from aabl_cli.fsutil import Place, refuse_overlap, safe_relative, write_text
from aabl_cli.plots import plot_class_shares, plot_history, plot_scores
from aabl_cli.progress import log, progress

MAX_GALLERY = 256  # images: the page stays a few MB, the saliency pass a few batches
DISPLAY_PX = 96  # small images are enlarged (nearest neighbour, whole pixels) to about this side
MAX_DISPLAY_PX = 160  # larger ones are shrunk to this, or the page grows by megabytes per image
SALIENCY_BATCH = 64


@dataclass
class SplitTable:
    """split.csv as arrays, in dataset order."""

    paths: list[str]
    labels: np.ndarray
    scores: np.ndarray
    kept: np.ndarray
    poisoned: np.ndarray | None


@dataclass
class Inputs:
    """Everything the page shows, read and checked."""

    workdir: Path
    scan: dict[str, Any]
    split: dict[str, Any]
    table: SplitTable
    train: dict[str, Any] | None
    history: list[dict[str, float]] | None


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AablError(f"{path} is damaged or unreadable ({str(err).splitlines()[0]}); {fix}") from err
    if not isinstance(data, dict):
        raise AablError(f"{path} is damaged (not a JSON object); {fix}")
    return data


def _read_split_csv(path: Path, *, samples: int, classes: int, fix: str) -> SplitTable:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            has_truth = "poisoned" in (reader.fieldnames or [])
            rows = [(r["path"], int(r["label"]), float(r["score"]), int(r["kept"]),
                     int(r["poisoned"]) if has_truth else 0) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
        raise AablError(f"{path} is damaged or unreadable ({err}); {fix}") from err
    if len(rows) != samples:
        raise AablError(f"{path} has {len(rows)} rows but split.json counts {samples} images; {fix}")
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    scores = np.array([r[2] for r in rows], dtype=np.float64)
    if len(rows) and (labels.min() < 0 or labels.max() >= classes or not np.isfinite(scores).all()):
        raise AablError(f"{path} holds labels outside the scan's {classes} classes or non-finite scores; {fix}")
    return SplitTable(paths=[r[0] for r in rows], labels=labels, scores=scores,
                      kept=np.array([r[3] for r in rows], dtype=bool),
                      poisoned=np.array([r[4] for r in rows], dtype=bool) if has_truth else None)


def _read_history(path: Path) -> list[dict[str, float]]:
    """history.csv rows as floats; empty cells (no validation set) are left out of their row."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
        raise AablError(f"{path} is damaged or unreadable ({err}); run `aabl train` again") from err


def read_inputs(workdir: Path) -> Inputs:
    """Read and cross-check a work directory's stage outputs; an AablError says which command to run."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise AablError(f"work directory {workdir} does not exist; run `aabl scan DATA --workdir {workdir}` and "
                        f"`aabl split --workdir {workdir}` first")
    rescan, resplit = f"run `aabl scan DATA --workdir {workdir}` again", f"run `aabl split --workdir {workdir}` again"
    if not (workdir / "scan" / "scan.json").is_file():
        raise AablError(f"no scan in {workdir} ({workdir / 'scan' / 'scan.json'} is missing); "
                        f"run `aabl scan DATA --workdir {workdir}` first")
    if not (workdir / "split" / "split.json").is_file():
        raise AablError(f"no split in {workdir} ({workdir / 'split' / 'split.json'} is missing); "
                        f"run `aabl split --workdir {workdir}` first")
    scan = _read_json(workdir / "scan" / "scan.json", rescan)
    split = _read_json(workdir / "split" / "split.json", resplit)
    try:
        classes, samples = [str(c) for c in scan["classes"]], int(split["samples"])
        for key in ("dataset_root", "dataset_fingerprint"):
            str(scan[key])
        for key in ("threshold", "gamma", "kept", "isolated"):
            float(split[key])
        rows = split["per_class"]
        if not isinstance(split["settings"], dict) or not isinstance(rows, list) or len(rows) != len(classes):
            raise ValueError("settings or per_class")
        for row in rows:
            str(row["class"]), float(row["share_of_data"]), float(row["share_of_isolated"])
        str(split["verdict"])
    except (KeyError, TypeError, ValueError) as err:
        raise AablError(f"{workdir}: scan.json or split.json lacks or garbles {err}; {resplit}") from err
    if split.get("dataset_fingerprint") != scan["dataset_fingerprint"]:
        raise AablError(f"{workdir / 'split' / 'split.json'} was made from another scan (the dataset fingerprints "
                        f"differ); {resplit}")
    table = _read_split_csv(workdir / "split" / "split.csv", samples=samples, classes=len(classes), fix=resplit)
    train = history = None
    if (workdir / "train" / "train.json").is_file():
        train = _read_json(workdir / "train" / "train.json", f"run `aabl train --workdir {workdir}` again")
        if (workdir / "train" / "history.csv").is_file():
            history = _read_history(workdir / "train" / "history.csv")
    return Inputs(workdir=workdir, scan=scan, split=split, table=table, train=train, history=history)


def choose_gallery(labels: np.ndarray, scores: np.ndarray, isolated: np.ndarray, *, num_classes: int,
                   per_class: int, first: int | None = None, cap: int = MAX_GALLERY) -> list[tuple[int, np.ndarray]]:
    """The lowest-score isolated samples of each class that has any: (label, indices) pairs, class `first`
    (the suspected target) leading. With many classes each gets fewer, so the total stays within `cap`."""
    counts = np.bincount(labels[isolated], minlength=num_classes)
    present = [c for c in range(num_classes) if counts[c]]
    present.sort(key=lambda c: (c != first, -counts[c], c))
    present = present[:cap]
    take = min(per_class, max(1, cap // max(1, len(present))))
    chosen = []
    for c in sorted(present, key=lambda c: (c != first, c)):
        idx = np.flatnonzero(isolated & (labels == c))
        chosen.append((c, idx[np.argsort(scores[idx], kind="stable")[:take]]))
    return chosen


def gradient_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|d CE / d x| of a [0, 1] batch against labels `y`, max over channels, each map scaled to peak 1.

    One backward pass for the batch: the loss is a sum and, in eval mode, samples do not interact, so
    each image's gradient is its own. The loss is taken in float64 so a confidently classified image
    (a poison, typically) keeps a non-zero gradient instead of a saturated softmax's exact 0.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # logits to the CPU for float64: MPS has none, and they are only N x classes
        loss = F.cross_entropy(model(x).cpu().double(), y.cpu(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    saliency = grad.abs().amax(dim=1)
    peak = saliency.flatten(1).amax(dim=1).clamp_min(torch.finfo(saliency.dtype).tiny)
    return saliency / peak.view(-1, 1, 1)


def overlay_pair(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The image beside its saliency heat map blended over a dimmed grey copy, enlarged with whole pixels
    (nearest neighbour, so a 3x3 trigger stays a sharp 3x3 block). uint8 (H', 2W' + gap, 3)."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    side = max(h, w)
    grey = image.astype(np.float32).mean(axis=2, keepdims=True) / 255.0
    # The square root lifts a trigger's weaker pixels next to its peak into view; inferno ends in a light
    # yellow that stands out on the dimmed image, and a low value lets the image show through.
    level = np.sqrt(np.clip(saliency, 0, 1))
    heat = colormaps["inferno"](level)[..., :3].astype(np.float32)
    alpha = level[..., None]
    blend = (1 - alpha) * 0.6 * grey + alpha * heat
    pair = [image, np.clip(blend * 255, 0, 255).astype(np.uint8)]
    if side < DISPLAY_PX:
        factor = math.ceil(DISPLAY_PX / side)
        pair = [p.repeat(factor, axis=0).repeat(factor, axis=1) for p in pair]
    elif side > MAX_DISPLAY_PX:
        size = (round(w * MAX_DISPLAY_PX / side), round(h * MAX_DISPLAY_PX / side))
        pair = [np.asarray(Image.fromarray(p).resize(size, Image.BILINEAR)) for p in pair]
    gap = np.full((pair[0].shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([pair[0], gap, pair[1]], axis=1)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _figure(plot: Any, *args: Any, **kwargs: Any) -> tuple[bytes, Any]:
    buffer = io.BytesIO()
    result = plot(buffer, *args, **kwargs)
    return buffer.getvalue(), result


def _load_gallery_images(inputs: Inputs, indices: list[int], size: tuple[int, int]) -> dict[int, np.ndarray]:
    """Decode the chosen images: the split's isolated/ copy first (what was removed), else the dataset."""
    roots = [inputs.workdir / "split" / "isolated", Path(inputs.scan["dataset_root"])]
    images = {}
    for i in indices:
        rel = safe_relative(inputs.table.paths[i])
        for root in roots:
            if (root / rel).is_file():
                try:
                    images[i] = decode_image(root / rel, size)
                    break
                except AablError:
                    continue
    return images


def _saliency_for(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, *,
                  quiet: bool) -> np.ndarray:
    maps = []
    batches = range(0, len(images), SALIENCY_BATCH)
    for start in progress(batches, total=len(batches), desc="saliency", unit="batch", quiet=quiet):
        x = to_float(images[start:start + SALIENCY_BATCH]).to(device)
        y = torch.from_numpy(labels[start:start + SALIENCY_BATCH]).to(device)
        maps.append(gradient_saliency(model, x, y).float().cpu().numpy())
    return np.concatenate(maps) if maps else np.empty((0, 0, 0), dtype=np.float32)


def _gallery(inputs: Inputs, *, per_class: int, device: str, quiet: bool) -> dict[str, Any]:
    table, classes = inputs.table, list(inputs.scan["classes"])
    suspected = inputs.split.get("suspected_label")
    chosen = choose_gallery(table.labels, table.scores, ~table.kept, num_classes=len(classes), per_class=per_class,
                            first=suspected if inputs.split.get("verdict") == "backdoor suspected" else None)
    flat = [int(i) for _, idx in chosen for i in idx]
    if not flat:  # nothing isolated: no model needed
        return {"groups": [], "missing": [], "classes_left_out": 0, "per_class": per_class}
    model_path = inputs.workdir / "scan" / "model.safetensors"
    if not model_path.is_file():
        raise AablError(f"{model_path} is missing (the gallery's saliency maps need the scan's model); "
                        f"run `aabl scan DATA --workdir {inputs.workdir}` again")
    dev = resolve_device(device)
    model, meta = load_model(model_path, device=dev, classes=classes)
    size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    images = _load_gallery_images(inputs, flat, size)
    found = [i for i in flat if i in images]
    log(f"report: saliency of {len(found)} isolated images on {dev}", quiet=quiet)
    stack = np.stack([images[i] for i in found]) if found else np.empty((0, *size, 3), dtype=np.uint8)
    maps = dict(zip(found, _saliency_for(model, stack, table.labels[found], dev, quiet=quiet)))
    isolated_counts = np.bincount(table.labels[~table.kept], minlength=len(classes))
    groups = []
    for label, idx in chosen:
        items = [{"path": table.paths[i], "score": float(table.scores[i]),
                  "poisoned": None if table.poisoned is None else bool(table.poisoned[i]),
                  "png": png_bytes(overlay_pair(images[i], maps[i]))} for i in (int(j) for j in idx) if i in maps]
        groups.append({"class": classes[label], "isolated": int(isolated_counts[label]), "items": items})
    left_out = int((isolated_counts > 0).sum()) - len(chosen)
    return {"groups": groups, "missing": [table.paths[i] for i in flat if i not in images],
            "classes_left_out": left_out, "per_class": per_class}


def confusion(table: SplitTable) -> dict[str, int] | None:
    """kept / isolated x poison / clean counts, when split.csv carries the ground truth."""
    if table.poisoned is None:
        return None
    p, k = table.poisoned, table.kept
    return {"kept_poison": int((k & p).sum()), "kept_clean": int((k & ~p).sum()),
            "isolated_poison": int((~k & p).sum()), "isolated_clean": int((~k & ~p).sum())}


def report(workdir: str | Path = "aabl-out", *, out: str | Path | None = None, per_class: int = 8,
           device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Write the HTML report of a work directory to `out` (default `workdir/report.html`); return a summary."""
    started = time.time()
    workdir = Path(workdir)
    inputs = read_inputs(workdir)
    out = Path(out) if out is not None else workdir / "report.html"
    reads = [Place(Path(inputs.scan["dataset_root"]), "the scanned data folder")]
    reads += [Place(workdir / stage, f"the {stage} output") for stage in ("scan", "split", "train")
              if (workdir / stage).exists()]
    refuse_overlap(reads, replaces=[Place(out, "--out")], fix="write the report outside the dataset and the stage "
                                                                "folders (the default is WORKDIR/report.html)")
    table = inputs.table
    hist_png, _ = _figure(plot_scores, table.scores, threshold=float(inputs.split["threshold"]),
                          isolated=~table.kept, poisoned=table.poisoned)
    classes_png, left_out = _figure(plot_class_shares, inputs.split["per_class"],
                                    suspected=inputs.split.get("suspected_class"))
    history_png = _figure(plot_history, inputs.history)[0] if inputs.history else None
    gallery = _gallery(inputs, per_class=per_class, device=device, quiet=quiet)
    counts = confusion(table)
    page, sections = report_html.render(inputs=inputs, confusion=counts, gallery=gallery, figures={
        "scores": hist_png, "classes": classes_png, "history": history_png}, classes_left_out=left_out)
    write_text(out, page)
    shown = sum(len(g["items"]) for g in gallery["groups"])
    summary = {"report": str(out), "bytes": len(page.encode("utf-8")), "sections": sections,
               "samples": int(len(table.paths)), "kept": int(table.kept.sum()), "isolated": int((~table.kept).sum()),
               "verdict": inputs.split["verdict"], "gallery": {"images": shown, "per_class": {
                   g["class"]: len(g["items"]) for g in gallery["groups"]}, "unreadable": len(gallery["missing"])},
               "confusion": counts, "training": inputs.train is not None, "seconds": time.time() - started}
    return summary
