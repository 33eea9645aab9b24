"""The report's gallery: the most robust (lowest-score) isolated images of each class, each beside a
gradient saliency map from the scan's model (|d loss / d x| against the image's label, max over
channels). A patch trigger is the robust feature that holds the label in place, so the map lights
up where the trigger sits.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from aabl_cli.core.checkpoint import load_model
from aabl_cli.core.device import resolve_device
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import safe_relative
from aabl_cli.core.images import decode_image
from aabl_cli.core.pixels import hwc_to_float
from aabl_cli.core.progress import log, progress
from aabl_cli.core.workdir import Workdir
from aabl_cli.stages.report.inputs import Inputs

MAX_GALLERY = 256  # images: the page stays a few MB, the saliency pass a few batches
DISPLAY_PX = 96  # small images are enlarged (nearest neighbour, whole pixels) to about this side
MAX_DISPLAY_PX = 160  # larger ones are shrunk to this, or the page grows by megabytes per image
SALIENCY_BATCH = 64


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


def _load_gallery_images(inputs: Inputs, indices: list[int], size: tuple[int, int]) -> dict[int, np.ndarray]:
    """Decode the chosen images: the split's isolated/ copy first (what was removed), else the dataset."""
    roots = [Workdir(inputs.workdir).split.isolated, Path(inputs.scan["data"])]
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
        x = hwc_to_float(images[start:start + SALIENCY_BATCH]).to(device)
        y = torch.from_numpy(labels[start:start + SALIENCY_BATCH]).to(device)
        maps.append(gradient_saliency(model, x, y).float().cpu().numpy())
    return np.concatenate(maps) if maps else np.empty((0, 0, 0), dtype=np.float32)


def gallery_of(inputs: Inputs, *, per_class: int, device: str, quiet: bool) -> dict[str, Any]:
    """The gallery: per class, path, score, truth and a PNG of image and saliency map; and what was left out."""
    table, classes = inputs.table, list(inputs.scan["classes"])
    suspected = inputs.split.get("suspected_label")
    chosen = choose_gallery(table.labels, table.scores, ~table.kept, num_classes=len(classes), per_class=per_class,
                            first=suspected if inputs.split.get("verdict") == "backdoor suspected" else None)
    flat = [int(i) for _, idx in chosen for i in idx]
    if not flat:  # nothing isolated: no model needed
        return {"groups": [], "missing": [], "classes_left_out": 0, "per_class": per_class}
    model_path = Workdir(inputs.workdir).scan.model
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
