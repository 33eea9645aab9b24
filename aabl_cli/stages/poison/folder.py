"""Poison a clean image folder for evaluation: `aabl poison DATA --backdoor B --out DST`.

`BACKDOORS` (`backdoors/__init__.py`) maps each `--backdoor` choice to one small `Backdoor`,
whose `build` returns its trigger, a plain function on float `(N, 3, H, W)` tensors in [0, 1];
the backdoors that need a network (iab, ssba, clb) train it on DATA inside `build`. Here the
folder is copied, the chosen images triggered and written, and the ground truth recorded.
"""

from __future__ import annotations

import collections
import csv
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from aabl_cli import __version__
from aabl_cli.core.checkpoint import save_trigger
from aabl_cli.core.data import FolderListing, list_image_folder
from aabl_cli.core.device import resolve_device
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import (
    Place,
    atomic_output_dir,
    inside,
    refuse_overlap,
    safe_relative,
    temporary_name,
    write_json,
)
from aabl_cli.core.groundtruth import POISON_CSV
from aabl_cli.core.images import decode_image
from aabl_cli.core.lock import workdir_lock
from aabl_cli.core.pixels import float_to_hwc, hwc_to_float
from aabl_cli.core.progress import log, progress
from aabl_cli.stages.poison.backdoors import BACKDOORS, Backdoor
from aabl_cli.stages.poison.backdoors.base import Context, Trigger
from aabl_cli.stages.poison.backdoors.blend import PATTERNS

BATCH = 256  # images decoded, triggered and written per step
# poison.csv; earlier versions named the `backdoor` column `attack` (nothing reads it back)
CSV_COLUMNS = ("path", "poisoned", "kind", "original_label", "label", "backdoor", "target")
MAX_NAME_BYTES = 255  # the longest file name ext4, APFS and most other file systems allow
TRIGGER_FILE = "trigger.safetensors"  # a trained trigger's networks, beside poison.csv
PREVIEW_EXAMPLES = 6  # poisoned images shown by --preview (plus up to half as many noise images)


def resolve_target(target: int | str, classes: Sequence[str]) -> int:
    """Class index of `target`: a class name, or an index into the sorted class names (a name wins)."""
    if isinstance(target, str):
        if target in classes:
            return classes.index(target)
        if target.strip().isdigit():
            target = int(target)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and 0 <= target < len(classes):
        return int(target)
    raise AablError(f"--target {target!r} is not a class; give an index 0..{len(classes) - 1} or one of the "
                    f"class names: {', '.join(classes)}")


def select_poisoned(n: int, candidates: Sequence[int], *, rate: float, seed: int,
                    pool: str = "outside the target class") -> list[int]:
    """Draw round(rate * n) of `candidates` uniformly without replacement; sorted indices.

    `rate` is a share of the n images, as in the paper: the whole set for dirty-label
    backdoors (drawn from the non-target images), the target class for clean-label ones.
    `pool` says where the candidates come from, for the error message.
    """
    if not 0 < rate <= 1:  # also refuses NaN
        raise AablError(f"--rate {rate} is out of range; give the poisoned share in (0, 1], e.g. 0.1")
    count = int(rate * n + 0.5)
    if count == 0:
        raise AablError(f"--rate {rate} of {n} images poisons no image; raise --rate or add images")
    if count > len(candidates):
        raise AablError(f"--rate {rate} asks for {count} poisoned images but only {len(candidates)} are {pool}; "
                        "lower --rate or choose another --target")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.asarray(candidates), size=count, replace=False).tolist())


def select_noise(n: int, poisoned: Sequence[int], *, count: int, seed: int) -> list[int]:
    """Draw `count` of the n images that are not `poisoned` (any class) for WaNet's noise mode; sorted."""
    if count == 0:
        return []
    taken = set(poisoned)
    free = [i for i in range(n) if i not in taken]
    if count > len(free):
        raise AablError(f"{len(poisoned)} poisoned images need {count} more for the noise mode, but only {len(free)} "
                        "are left; lower --rate")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the poisoned draw stays as without noise
    return sorted(rng.choice(np.asarray(free), size=count, replace=False).tolist())


def poison_folder(
    data: str | os.PathLike[str],
    *,
    backdoor: str | Backdoor,
    out: str | os.PathLike[str],
    rate: float | None = None,
    target: int | str = 0,
    test: bool = False,
    seed: int = 0,
    pattern: str = "image",
    epochs: int | None = None,
    arch: str = "cnn",
    device: str = "auto",
    trigger: str | os.PathLike[str] | None = None,
    preview: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write a poisoned copy of the image folder `data` to `out`, with ground truth; returns the summary.

    `backdoor` is a `BACKDOORS` name (the `--backdoor` choices) or a `Backdoor` of the
    caller's own, for a trigger the registry does not hold (poison.csv and poison.json name it
    by its `name`).

    Train mode, dirty label: round(rate * N) images (N = the whole set; rate default 0.1)
    drawn with `seed` from the non-target classes carry the trigger and move to the target
    class. Clean label (clb): round(rate * N_target) target-class images (rate default 0.5)
    carry it and keep their label. WaNet also warps twice as many other images with random
    noise; they keep their label (`kind` noise, `poisoned` 0). All other images are copied
    byte for byte to the same relative path. `test=True` writes the ASR set: every
    non-target image triggered and relabelled; target images are left out and `rate` is
    ignored. Triggered images are PNGs named `<class>/<origin class>_<stem>.png`.

    `out` also gets `poison.csv` (one row per written image, labels as class indices),
    `poison.json` (the settings, training report, counts and seconds: the returned dict)
    and, for iab and ssba, `trigger.safetensors`, which a `--test` run must get back as
    `trigger` so the ASR set carries the same trigger. `epochs` and `arch` set the network
    iab, ssba and clb train (on `data`, on `device`). `preview`: a PNG of clean against
    triggered examples. `data` is never modified; `out` appears whole or not at all. The
    same seed gives the same bytes (on the CPU, with the same thread count).
    """
    if isinstance(backdoor, Backdoor):
        spec = backdoor
    elif backdoor in BACKDOORS:
        spec = BACKDOORS[backdoor]
    else:
        raise AablError(f"unknown backdoor {backdoor!r}; choose one of {', '.join(BACKDOORS)}")
    backdoor = spec.name
    started = time.perf_counter()
    rate = spec.default_rate if rate is None else rate
    listing = list_image_folder(data)
    root, out = listing.root, Path(out)
    trigger_path = _check_trigger(spec, trigger, test)
    _check_out(root, out, trigger_path, pattern if spec.uses_pattern and pattern not in PATTERNS else None)
    preview_path = None if preview is None else _check_preview(Path(preview), root, out)
    n = len(listing.files)
    if n == 0:
        raise AablError(f"{root} holds no images; add images under {root}/<class>/")
    target_index = resolve_target(target, listing.classes)
    labels = [label for _, label in listing.files]
    chosen, noise = _choose(spec, labels, target=target_index, rate=rate, seed=seed, test=test, root=root)
    dev = resolve_device(device)
    ctx = Context(root=root, classes=listing.classes, target=target_index, seed=seed, test=test, pattern=pattern,
                  epochs=(epochs or spec.default_epochs) if spec.default_epochs else None, arch=arch, device=dev,
                  trigger_file=trigger_path, cache_dir=None if cache_dir is None else Path(cache_dir), quiet=quiet)
    built = spec.build(ctx)
    trigger_seconds = time.perf_counter() - started
    names = _poison_names(listing, {**{i: target_index for i in chosen}, **{i: labels[i] for i in noise}},
                          keep_clean=not test)
    if listing.ignored:
        log(f"not copied: {len(listing.ignored)} non-image file(s), e.g. {listing.ignored[0]}", quiet=quiet)
    jobs: list[tuple[str, Sequence[int], Trigger]] = [("poison", chosen, built.trigger)]
    if noise and built.noise is not None:
        noise_trigger, noise_generator = built.noise, torch.Generator().manual_seed(seed)
        jobs.append(("noise", noise, lambda x: noise_trigger(x, noise_generator)))

    staged_preview: Path | None = None
    try:
        with workdir_lock(out.parent, out.name, quiet=quiet, tidy=False), atomic_output_dir(out) as tmp, \
                ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # one writer of --out
            clean = [] if test else [i for i in range(n) if i not in names]
            sizes, examples = _write_images(tmp, pool, listing, clean=clean, jobs=jobs, names=names, quiet=quiet)
            rows = _ground_truth(listing, names, set(noise), test=test, backdoor=backdoor, target=target_index)
            with open(tmp / POISON_CSV, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([CSV_COLUMNS, *rows])
            if built.weights is not None:
                save_trigger(tmp / TRIGGER_FILE, built.weights, backdoor=backdoor, settings=built.report)
            per_class = collections.Counter(labels[i] for i in chosen)
            summary = {
                "backdoor": backdoor,
                "backdoor_params": spec.params,
                "pattern": (pattern if pattern in PATTERNS else str(Path(pattern).resolve())) if spec.uses_pattern
                else None,
                "test": test,
                "rate": None if test else rate,
                "rate_of": None if test else ("target class" if spec.clean_label else "whole set"),
                "target": target_index,
                "target_name": listing.classes[target_index],
                "seed": seed,
                "data": str(root.resolve()),
                "classes": listing.classes,
                "image_size": list(sizes.most_common(1)[0][0]),  # (H, W) of most triggered images
                "trigger_report": built.report,  # training settings and measurements, or the trigger file's
                "trigger_file": TRIGGER_FILE if built.weights is not None else None,
                "device": str(dev),
                "counts": {"source_images": n, "written": len(rows), "poisoned": len(chosen), "noise": len(noise),
                           "clean": len(rows) - len(chosen) - len(noise),
                           "poisoned_per_class": [per_class.get(c, 0) for c in range(len(listing.classes))]},
                "ignored": listing.ignored,
                "aabl_version": __version__,
                "seconds": {"trigger": trigger_seconds, "total": time.perf_counter() - started},
            }
            write_json(tmp / "poison.json", summary)
            if preview_path is not None:
                staged_preview = _stage_preview(preview_path, examples, backdoor=backdoor, tmp=tmp, out=out)
    except BaseException:
        if staged_preview is not None:
            staged_preview.unlink(missing_ok=True)
        raise
    if staged_preview is not None:
        os.replace(staged_preview, preview_path)
    extra = f" and {len(noise)} noise" if noise else ""
    log(f"{backdoor}: {len(chosen)} poisoned{extra} of {len(rows)} written images -> {out}", quiet=quiet)
    return summary


def _choose(spec: Backdoor, labels: Sequence[int], *, target: int, rate: float, seed: int, test: bool,
            root: Path) -> tuple[list[int], list[int]]:
    """The indices to poison and, for WaNet, those to warp with noise; both sorted."""
    n = len(labels)
    non_target = [i for i in range(n) if labels[i] != target]
    if test:
        if not non_target:
            raise AablError(f"every image of {root} is in the target class; a --test set needs images of other classes")
        return non_target, []
    if spec.clean_label:
        in_target = [i for i in range(n) if labels[i] == target]
        chosen = select_poisoned(len(in_target), in_target, rate=rate, seed=seed, pool="in the target class")
    else:
        chosen = select_poisoned(n, non_target, rate=rate, seed=seed)
    return chosen, select_noise(n, chosen, count=spec.noise_ratio * len(chosen), seed=seed)


def _write_images(tmp: Path, pool: ThreadPoolExecutor, listing: FolderListing, *, clean: Sequence[int],
                  jobs: Sequence[tuple[str, Sequence[int], Trigger]], names: dict[int, str], quiet: bool
                  ) -> tuple[collections.Counter[tuple[int, int]], list[tuple[str, np.ndarray, np.ndarray]]]:
    """Copy the `clean` images byte for byte and write each job's (kind, indices, trigger) images as PNG.

    Returns the sizes of the triggered images and a few (kind, clean, triggered) examples for a preview.
    """
    root = listing.root
    for name in listing.classes:  # every class folder, even empty, so labels line up
        (tmp / safe_relative(name)).mkdir()
    for i in progress(clean, total=len(clean), desc="copying", unit="img", quiet=quiet):
        rel = listing.files[i][0]
        dest = tmp / safe_relative(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, dest)
    sizes: collections.Counter[tuple[int, int]] = collections.Counter()
    examples: list[tuple[str, np.ndarray, np.ndarray]] = []
    for kind, indices, trigger in jobs:
        batches = [indices[k:k + BATCH] for k in range(0, len(indices), BATCH)]
        wanted = PREVIEW_EXAMPLES if kind == "poison" else PREVIEW_EXAMPLES // 2
        for batch in progress(batches, total=len(batches), desc=kind, unit="batch", quiet=quiet):
            pairs = _poison_batch(root, listing, batch, names, trigger, tmp, pool)
            sizes.update((int(a.shape[0]), int(a.shape[1])) for a, _ in pairs)
            have = sum(1 for k, _, _ in examples if k == kind)
            examples += [(kind, a, b) for a, b in pairs[:max(0, wanted - have)]]
    return sizes, examples


def _ground_truth(listing: FolderListing, names: dict[int, str], noise: set[int], *, test: bool, backdoor: str,
                  target: int) -> list[tuple[Any, ...]]:
    """poison.csv's rows in dataset order; the ASR set (`test`) lists only its triggered images."""
    rows: list[tuple[Any, ...]] = []
    for i, (rel, label) in enumerate(listing.files):
        if i in noise:
            rows.append((names[i], 0, "noise", label, label, backdoor, target))
        elif i in names:
            rows.append((names[i], 1, "poison", label, target, backdoor, target))
        elif not test:
            rows.append((rel, 0, "clean", label, label, backdoor, target))
    return rows


def _check_out(root: Path, out: Path, trigger: Path | None, pattern: str | None) -> None:
    """Refuse an `out` whose writing would touch what the run reads: inside the source (or another
    input), or a folder that holds one (replacing it would delete it)."""
    refuse_overlap([Place(root, "the source folder"), None if trigger is None else Place(trigger, "--trigger"),
                    None if pattern is None else Place(Path(pattern), "--pattern")],
                   replaces=[Place(out, "--out")],
                   fix="choose an output folder that neither lies inside the inputs nor holds them")


def _check_trigger(spec: Backdoor, trigger: str | os.PathLike[str] | None, test: bool) -> Path | None:
    """The trigger file to load (a folder means its trigger.safetensors), after checking it fits the run."""
    if trigger is not None and not spec.trained_trigger:
        trained = " and ".join(b.name for b in BACKDOORS.values() if b.trained_trigger)
        raise AablError(f"--trigger is for {trained}, whose triggers are trained networks; {spec.name} draws its "
                        "trigger in code, so drop --trigger")
    if trigger is None:
        if test and spec.trained_trigger:
            raise AablError(f"--test with --backdoor {spec.name} needs --trigger: the {TRIGGER_FILE} written with "
                            f"the poisoned training set (aabl poison TRAIN --backdoor {spec.name} --out DIR writes "
                            f"DIR/{TRIGGER_FILE}), so that the ASR set carries the same trigger")
        return None
    path = Path(trigger)
    return path / TRIGGER_FILE if path.is_dir() else path


def _check_preview(preview: Path, root: Path, out: Path) -> Path:
    """Refuse a --preview path inside the source, or inside a class folder of the output (it would be an image)."""
    if inside(preview, root):
        raise AablError(f"--preview {preview} is inside the source folder {root}; write it somewhere else")
    if inside(preview.parent, out) and preview.parent.resolve() != out.resolve():
        raise AablError(f"--preview {preview} is inside a class folder of --out, where it would count as an image; "
                        f"write it to {out}/ itself or somewhere else")
    if preview.is_dir():
        raise AablError(f"--preview {preview} is a folder; give the path of a PNG file to write")
    return preview


def _stage_preview(preview: Path, examples: list[tuple[str, np.ndarray, np.ndarray]], *, backdoor: str, tmp: Path,
                   out: Path) -> Path | None:
    """Draw the preview where the output is being built (a preview in --out itself) or beside its final place;
    returns the staged file to rename into place once the output is, or None."""
    from aabl_cli.core.plots import plot_trigger_preview  # matplotlib: imported only when asked for

    if preview.parent.resolve() == out.resolve():
        plot_trigger_preview(tmp / preview.name, examples, title=backdoor)
        return None
    preview.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_name(preview, "tmp")
    try:
        plot_trigger_preview(staged, examples, title=backdoor)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def _poison_names(listing: FolderListing, folders: dict[int, int], *, keep_clean: bool) -> dict[int, str]:
    """Output path of each triggered image: `<class>/<origin class>_<stem>.png`, subfolders joined by '_'.

    `folders` maps an image's index to the class it is written to: the target for a
    poison, its own class for a label-keeping noise image. A name already taken (by a clean
    file kept in that folder, or an earlier one such as `x.jpg` beside `x.png`) gets `-2`,
    `-3`, ... so nothing is overwritten. Names are compared case-folded because macOS and
    Windows file systems ignore case. A name longer than MAX_NAME_BYTES has its base cut to fit.
    """
    taken = {rel.casefold() for i, (rel, _) in enumerate(listing.files) if keep_clean and i not in folders}
    names: dict[int, str] = {}
    for i, folder_index in folders.items():
        folder = listing.classes[folder_index]
        parts = PurePosixPath(listing.files[i][0]).parts
        base = "_".join((*parts[:-1], PurePosixPath(parts[-1]).stem))
        name, k = f"{folder}/{_fit(base, '.png')}", 2
        while name.casefold() in taken:
            name, k = f"{folder}/{_fit(base, f'-{k}.png')}", k + 1
        taken.add(name.casefold())
        names[i] = name
    return names


def _fit(base: str, suffix: str) -> str:
    """`base + suffix`, the base cut (on a character boundary) so the name fits in MAX_NAME_BYTES."""
    room = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
    return base.encode("utf-8")[:room].decode("utf-8", "ignore") + suffix


def _decode(path: Path) -> np.ndarray:
    """decode_image, with a fix that `aabl poison` offers (it has no --on-bad-file)."""
    try:
        return decode_image(path)
    except AablError as err:
        raise AablError(f"{str(err).split(';')[0]}; remove or replace it in the source folder") from err


def _poison_batch(root: Path, listing: FolderListing, batch: Sequence[int], names: dict[int, str],
                  trigger: Trigger, tmp: Path, pool: ThreadPoolExecutor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decode, trigger and write one batch; images of one size are triggered as one tensor.

    Returns (clean, triggered) uint8 (H, W, 3) arrays, in batch order.
    """
    arrays = list(pool.map(lambda i: _decode(root / listing.files[i][0]), batch))  # each at its own size
    groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
    for j, arr in enumerate(arrays):
        groups[arr.shape].append(j)
    outputs: list[np.ndarray] = [arrays[0]] * len(arrays)
    for members in groups.values():
        y = float_to_hwc(trigger(hwc_to_float(np.stack([arrays[j] for j in members]))))
        for j, img in zip(members, y):
            outputs[j] = img

    def save(j: int) -> None:
        Image.fromarray(outputs[j]).save(tmp / safe_relative(names[batch[j]]), format="PNG")

    list(pool.map(save, range(len(batch))))  # list(): re-raise a failed write here
    return list(zip(arrays, outputs))
