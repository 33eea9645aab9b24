"""Poison a clean image folder for evaluation: `aabl poison SRC --attack A --out DST`.

Triggers are plain functions on float `(N, 3, H, W)` tensors in [0, 1], so the code that
poisons folders here can also trigger GPU batches elsewhere. `ATTACKS` maps each
`--attack` choice to one small `Attack`; the paper's other attacks plug in the same way.
"""

from __future__ import annotations

import collections
import csv
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from aabl_cli import __version__
from aabl_cli.data import FolderListing, decode_image, list_image_folder
from aabl_cli.errors import AablError
from aabl_cli.fsutil import atomic_output_dir, safe_relative, write_json
from aabl_cli.progress import log, progress

Trigger = Callable[[torch.Tensor], torch.Tensor]

BLEND_ALPHA = 0.1  # opacity of the blended pattern (Chen et al. 2017; the paper's value)
NOISE_SEED = 0  # fixed, not --seed: a train set and its --test set must carry the same noise trigger
PATTERNS = ("image", "noise")  # --pattern choices besides a file path
BATCH = 256  # images decoded, triggered and written per step
CSV_COLUMNS = ("path", "poisoned", "kind", "original_label", "label", "attack", "target")
MAX_NAME_BYTES = 255  # the longest file name ext4, APFS and most other file systems allow


def _scaled(pixels_at_32: int, side: int) -> int:
    # Round half up (not Python's banker's rounding) so 48 px gets a 5-px patch, not 4.
    return max(1, int(pixels_at_32 * side / 32 + 0.5))


def badnets_trigger(x: torch.Tensor) -> torch.Tensor:
    """BadNets: a white square flush in the bottom-right corner, 3x3 px on a 32-px image.

    x: float (N, 3, H, W) in [0, 1]; returns a new tensor, x is untouched. The patch has
    round(3 * H / 32) rows and round(3 * W / 32) columns (at least 1), so it covers the
    same share of any image size. Every other pixel is returned unchanged.
    """
    rows, cols = _scaled(3, x.shape[-2]), _scaled(3, x.shape[-1])
    out = x.clone()
    out[..., -rows:, -cols:] = 1.0
    return out


def blend_trigger(x: torch.Tensor, pattern: torch.Tensor, alpha: float = BLEND_ALPHA) -> torch.Tensor:
    """Blend: `(1 - alpha) * x + alpha * pattern` (Chen et al. 2017).

    x: float (N, 3, H, W) in [0, 1]; pattern: float (3, h, w) in [0, 1], resized bilinearly
    to (H, W) when its size differs. Each pixel moves by at most `alpha`.
    """
    if tuple(pattern.shape[-2:]) != tuple(x.shape[-2:]):
        pattern = resize_pattern(pattern, (int(x.shape[-2]), int(x.shape[-1])))
    pattern = pattern.to(device=x.device, dtype=x.dtype)
    return ((1 - alpha) * x + alpha * pattern).clamp(0, 1)


def resize_pattern(pattern: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (3, h, w) pattern to `size` = (H, W); antialiased so shrinking a photo stays smooth."""
    resized = F.interpolate(pattern[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp(0, 1)


def load_pattern(pattern: str, size: tuple[int, int]) -> torch.Tensor:
    """The blend pattern as float (3, H, W) in [0, 1] for images of `size` = (H, W).

    `image`: scikit-image's bundled `coffee` photo (smooth, natural, no download);
    `noise`: uniform noise from a fixed seed; anything else: the path of an image file.
    Raises AablError for a path that is not a readable image.
    """
    if pattern == "noise":
        rng = np.random.default_rng(NOISE_SEED)
        return torch.from_numpy(rng.random((3, *size), dtype=np.float32))
    if pattern == "image":
        from skimage import data  # imported here: only blend needs it, and it is slow to import

        pixels = data.coffee()
    else:
        path = Path(pattern)
        if not path.is_file():
            raise AablError(f"--pattern {pattern}: no such file; give {' or '.join(PATTERNS)} or the path of an image")
        try:
            pixels = decode_image(path)
        except AablError as err:
            raise AablError(f"--pattern {pattern}: not a readable image; give {' or '.join(PATTERNS)} "
                            "or the path of a PNG/JPEG file") from err
    photo = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255  # np.array: a writable copy
    return resize_pattern(photo, size)


def _build_badnets(*, pattern: str) -> Trigger:
    return badnets_trigger


def _build_blend(*, pattern: str) -> Trigger:
    load_pattern(pattern, (32, 32))  # fail on a bad --pattern before any output is written
    patterns: dict[tuple[int, int], torch.Tensor] = {}  # one resize per image size, not per batch

    def trigger(x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in patterns:
            patterns[size] = load_pattern(pattern, size)
        return blend_trigger(x, patterns[size])

    return trigger


@dataclass(frozen=True)
class Attack:
    """One `--attack` choice: `build(pattern=...)` returns its trigger on (N, 3, H, W) floats in [0, 1].

    `params` are the attack's fixed settings, recorded in poison.json; `uses_pattern` says
    whether `--pattern` means anything to it.
    """

    name: str
    help: str
    build: Callable[..., Trigger]
    params: dict[str, Any] = field(default_factory=dict)
    uses_pattern: bool = False


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("badnets", "3x3 white patch flush in the bottom-right corner (at 32 px; scales with image size)",
           _build_badnets, {"patch_at_32px": 3, "position": "bottom-right, flush", "color": "white"}),
    Attack("blend", f"blend a fixed pattern (--pattern) over the whole image at opacity {BLEND_ALPHA}",
           _build_blend, {"alpha": BLEND_ALPHA}, uses_pattern=True),
)}


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


def select_poisoned(n: int, candidates: Sequence[int], *, rate: float, seed: int) -> list[int]:
    """Draw round(rate * n) of `candidates` uniformly without replacement; sorted indices.

    `rate` is a share of the whole set (n images), as in the paper, drawn from the
    candidates (the non-target images for dirty-label attacks).
    """
    if not 0 < rate <= 1:  # also refuses NaN
        raise AablError(f"--rate {rate} is out of range; give the poisoned share of the whole set in (0, 1], e.g. 0.1")
    count = int(rate * n + 0.5)
    if count == 0:
        raise AablError(f"--rate {rate} of {n} images poisons no image; raise --rate or add images")
    if count > len(candidates):
        raise AablError(f"--rate {rate} asks for {count} poisoned images but only {len(candidates)} are outside the "
                        "target class; lower --rate or choose another --target")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.asarray(candidates), size=count, replace=False).tolist())


def poison_folder(
    src: str | os.PathLike[str],
    *,
    attack: str,
    out: str | os.PathLike[str],
    rate: float = 0.1,
    target: int | str = 0,
    test: bool = False,
    seed: int = 0,
    pattern: str = "image",
    quiet: bool = False,
) -> dict[str, Any]:
    """Write a poisoned copy of the image folder `src` to `out`, with ground truth; returns the summary.

    Train mode: round(rate * N) images (N = the whole set) drawn with `seed` from the
    non-target classes carry the trigger and move to the target class (dirty label); all
    others are copied byte for byte to the same relative path. `test=True` writes the ASR
    set: every non-target image triggered and relabelled; target images are left out and
    `rate` is ignored. Poisoned images are PNGs named `<target>/<origin class>_<stem>.png`.
    `out` also gets `poison.csv` (one row per written image, labels as class indices) and
    `poison.json` (the settings and counts, the returned dict). `src` is never modified;
    `out` appears whole or not at all. The same seed gives the same bytes.
    """
    if attack not in ATTACKS:
        raise AablError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    spec = ATTACKS[attack]
    listing = list_image_folder(src)
    root, out = listing.root, Path(out)
    _check_out(root, out)
    n = len(listing.files)
    if n == 0:
        raise AablError(f"{root} holds no images; add images under {root}/<class>/")
    target_index = resolve_target(target, listing.classes)
    candidates = [i for i, (_, label) in enumerate(listing.files) if label != target_index]
    if test:
        chosen = candidates
        if not chosen:
            raise AablError(f"every image of {root} is in the target class; a --test set needs images of other classes")
    else:
        chosen = select_poisoned(n, candidates, rate=rate, seed=seed)
    trigger = spec.build(pattern=pattern)
    names = _poison_names(listing, chosen, target_index, keep_clean=not test)
    if listing.ignored:
        log(f"not copied: {len(listing.ignored)} non-image file(s), e.g. {listing.ignored[0]}", quiet=quiet)

    sizes: collections.Counter[tuple[int, int]] = collections.Counter()
    with atomic_output_dir(out) as tmp, ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for name in listing.classes:  # every class folder, even empty, so labels line up
            (tmp / safe_relative(name)).mkdir()
        clean = [] if test else [i for i in range(n) if i not in names]
        for i in progress(clean, total=len(clean), desc="copying", unit="img", quiet=quiet):
            rel = listing.files[i][0]
            dest = tmp / safe_relative(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)
        batches = [chosen[k:k + BATCH] for k in range(0, len(chosen), BATCH)]
        for batch in progress(batches, total=len(batches), desc="poisoning", unit="batch", quiet=quiet):
            sizes.update(_poison_batch(root, listing, batch, names, trigger, tmp, pool))

        rows = []
        for i, (rel, label) in enumerate(listing.files):
            if i in names:
                rows.append((names[i], 1, "poison", label, target_index, attack, target_index))
            elif not test:
                rows.append((rel, 0, "clean", label, label, attack, target_index))
        with open(tmp / "poison.csv", "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([CSV_COLUMNS, *rows])

        per_class = collections.Counter(listing.files[i][1] for i in chosen)
        summary = {
            "attack": attack,
            "attack_params": spec.params,
            "pattern": (pattern if pattern in PATTERNS else str(Path(pattern).resolve())) if spec.uses_pattern
            else None,
            "test": test,
            "rate": None if test else rate,
            "target": target_index,
            "target_name": listing.classes[target_index],
            "seed": seed,
            "source": str(root.resolve()),
            "classes": listing.classes,
            "image_size": list(sizes.most_common(1)[0][0]),  # (H, W) of most poisoned images
            "counts": {"source_images": n, "written": len(rows), "poisoned": len(chosen),
                       "clean": len(rows) - len(chosen),
                       "poisoned_per_class": [per_class.get(c, 0) for c in range(len(listing.classes))]},
            "ignored": listing.ignored,
            "aabl_version": __version__,
        }
        write_json(tmp / "poison.json", summary)
    log(f"{attack}: {len(chosen)} of {len(rows)} written images poisoned -> {out}", quiet=quiet)
    return summary


def _check_out(root: Path, out: Path) -> None:
    """Refuse an `out` whose writing would touch `src`: inside it, or a folder that holds it."""
    src_real, out_real = root.resolve(), out.resolve()
    if out_real == src_real or src_real in out_real.parents:
        raise AablError(f"--out {out} is inside the source folder {root}; choose an output folder outside it")
    if out_real in src_real.parents:
        raise AablError(f"--out {out} contains the source folder {root} and would replace it; "
                        "choose another output folder")


def _poison_names(listing: FolderListing, chosen: Sequence[int], target: int, *, keep_clean: bool) -> dict[int, str]:
    """Output path of each poisoned image: `<target>/<origin class>_<stem>.png`, subfolders joined by '_'.

    A name already taken (by a clean file kept in the target folder, or an earlier poison
    such as `x.jpg` beside `x.png`) gets `-2`, `-3`, ... so nothing is overwritten. Names
    are compared case-folded because macOS and Windows file systems ignore case. A name
    longer than MAX_NAME_BYTES has its base cut to fit.
    """
    chosen_set = set(chosen)
    taken = {rel.casefold() for i, (rel, _) in enumerate(listing.files) if keep_clean and i not in chosen_set}
    folder = listing.classes[target]
    names: dict[int, str] = {}
    for i in chosen:
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
                  trigger: Trigger, tmp: Path, pool: ThreadPoolExecutor) -> list[tuple[int, int]]:
    """Decode, trigger and write one batch; images of one size are triggered as one tensor. Returns their sizes."""
    arrays = list(pool.map(lambda i: _decode(root / listing.files[i][0]), batch))  # each at its own size
    groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
    for j, arr in enumerate(arrays):
        groups[arr.shape].append(j)
    outputs: list[np.ndarray] = [arrays[0]] * len(arrays)
    for members in groups.values():
        x = torch.from_numpy(np.stack([arrays[j] for j in members])).permute(0, 3, 1, 2).float() / 255
        y = (trigger(x) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j, img in zip(members, y):
            outputs[j] = img

    def save(j: int) -> None:
        Image.fromarray(outputs[j]).save(tmp / safe_relative(names[batch[j]]), format="PNG")

    list(pool.map(save, range(len(batch))))  # list(): re-raise a failed write here
    return [(int(a.shape[0]), int(a.shape[1])) for a in arrays]
