"""Image folders in, one uint8 tensor out.

An image folder is torchvision's `ImageFolder` layout, `root/<class>/<file>`, classes
sorted by name. It is decoded once into a `uint8 (N, 3, H, W)` tensor with `int64`
labels and the files' relative paths, and cached in a memory-mappable file keyed by
paths, sizes and mtimes, so a second run does not decode again.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import sys
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from aabl_cli.errors import AablError
from aabl_cli.fsutil import inside, safe_relative
from aabl_cli.progress import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
LINK_MODES = ("copy", "hardlink", "symlink", "none")

# Refuse absurd images before PIL allocates them (a 1-GB decompression bomb is input too).
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
MIN_SIDE = 16  # px: the smallest input every --arch takes (the small CNN pools three times)


@dataclass
class FolderListing:
    """What an image folder holds, before any image is decoded."""

    root: Path
    classes: list[str]
    files: list[tuple[str, int]]  # (relative posix path, label), in dataset order
    empty_classes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-image files inside class folders


@dataclass
class ImageDataset:
    """A decoded image folder. `images` is uint8 (N, 3, H, W); `labels` int64 (N,)."""

    root: Path
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    classes: list[str]
    fingerprint: str
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def list_image_folder(root: str | os.PathLike[str]) -> FolderListing:
    """List `root/<class>/**/<image>` in torchvision's order without decoding anything.

    Hidden files and folders are ignored, files at the top level are ignored (that is
    where `poison.csv` lives), symlinks are followed and symlink loops refused, as are
    names that are not UTF-8. Pipes and devices count as non-image files.
    """
    root = Path(root)
    if not root.exists():
        raise AablError(f"{root} does not exist; pass an image folder laid out as ROOT/<class>/<image>")
    if not root.is_dir():
        raise AablError(f"{root} is not a folder; pass an image folder laid out as ROOT/<class>/<image>")
    try:
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    except OSError as err:
        raise AablError(f"cannot read {root}: {err.strerror}; check its permissions") from err
    classes = [e for e in entries if (root / e).is_dir()]
    for name in classes:
        _check_name(root / name)
    if not classes:
        raise AablError(f"{root} has no class folders; lay images out as {root}/<class>/<image>")
    files: list[tuple[str, int]] = []
    ignored: list[str] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = _walk_class(root, root / name, ignored)
        if not found:
            empty.append(name)
        files.extend((rel, label) for rel in found)
    return FolderListing(root=root, classes=classes, files=files, empty_classes=empty, ignored=ignored)


def _walk_class(root: Path, folder: Path, ignored: list[str]) -> list[str]:
    """Relative paths of the images below `folder`, sorted, following symlinks once."""
    found: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if _is_ancestor_loop(current, real):
            raise AablError(f"symlink loop at {current}; remove the link or point it elsewhere")
        try:
            names = sorted(os.listdir(current))
        except OSError as err:
            raise AablError(f"cannot read {current}: {err.strerror}; check its permissions") from err
        for name in names:
            if name.startswith("."):
                continue
            path = current / name
            _check_name(path)
            try:
                mode: int | None = os.stat(path).st_mode
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise AablError(f"symlink loop at {path}; remove the link or point it elsewhere") from err
                mode = None  # a dangling link or a vanished file: reported by name when it is read
            if mode is not None and stat.S_ISDIR(mode):
                stack.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS and (mode is None or stat.S_ISREG(mode)):
                found.append(path.relative_to(root).as_posix())
            else:  # other files, and pipes or devices, which would block or never end when read
                ignored.append(path.relative_to(root).as_posix())
    return sorted(found)


def _check_name(path: Path) -> None:
    """Refuse a file name that is not UTF-8: it could not be written to scores.csv or poison.csv."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise AablError(f"{shown}: the file name is not valid UTF-8; rename it to UTF-8 "
                        "(e.g. convmv -f latin1 -t utf-8 --notest -r DATA)") from None


def _is_ancestor_loop(path: Path, real: str) -> bool:
    """True when a folder's real path is one of its own ancestors (a link back up)."""
    parent = path.parent
    for _ in range(len(path.parts)):
        if os.path.realpath(parent) == real and parent != path:
            return True
        if parent == parent.parent:
            break
        parent = parent.parent
    return False


def decode_image(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one file to an RGB uint8 array (H, W, 3), resized (bilinear) to `size` if given.

    Raises AablError naming the file when it is not a readable image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "not a readable image" if isinstance(err, UnidentifiedImageError) else f"unreadable ({err})"
        raise AablError(f"{path}: {reason}; remove or replace it, or pass --on-bad-file skip") from err
    if size is not None and (rgb.height, rgb.width) != tuple(size):
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the top 8 bits rather than PIL's clipping conversion.
        arr = np.asarray(img, dtype=np.int64)
        scale = 257 if arr.max() > 255 else 1
        img = Image.fromarray(np.clip(arr // scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def dataset_fingerprint(root: Path, paths: Iterable[str]) -> str:
    """sha256 over the relative paths and the bytes of every file, in dataset order.

    Raises OSError for a path that is not a regular file: a pipe or /dev/zero never ends.
    """
    digest = hashlib.sha256()
    for rel in paths:
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        path = root / rel
        if not stat.S_ISREG(os.stat(path).st_mode):  # checked before open(): opening a pipe blocks
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        file_digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                file_digest.update(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aabl"


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    image_size: int | tuple[int, int] | None = None,
    on_bad_file: str = "error",
    cache_dir: str | os.PathLike[str] | None = None,
    min_classes: int = 2,
    warn_empty: bool = True,
    quiet: bool = False,
) -> ImageDataset:
    """Decode an image folder into an `ImageDataset`, from the cache when nothing changed.

    `image_size`: N or (H, W) to resize to; default the most common size in the folder.
    `on_bad_file`: "error" stops at the first unreadable file, "skip" lists it in
    `skipped`. `min_classes`: how many non-empty classes the caller needs; `warn_empty`:
    warn about empty class folders (a triggered test set has only the target's).
    """
    listing = list_image_folder(root)
    root = listing.root
    if listing.ignored:
        if on_bad_file == "skip":
            skipped = [{"path": p, "reason": "not an image file"} for p in listing.ignored]
        else:
            raise AablError(f"{root / listing.ignored[0]}: not an image file (expected regular files named "
                            f"{', '.join(IMAGE_EXTENSIONS)}); move it out of the class folder "
                            "or pass --on-bad-file skip")
    else:
        skipped = []
    for name in listing.empty_classes if warn_empty else []:
        warnings.warn(f"class folder {name!r} is empty; it stays a class so labels line up", stacklevel=2)

    unreadable = [rel for rel, _ in listing.files if not os.path.exists(root / rel)]
    if unreadable:
        if on_bad_file != "skip":
            raise AablError(f"cannot read {root / unreadable[0]} (a dangling link or a vanished file); fix or "
                            "remove it, or pass --on-bad-file skip")
        skipped += [{"path": rel, "reason": "cannot read"} for rel in unreadable]
        gone = set(unreadable)
        listing.files = [(rel, lab) for rel, lab in listing.files if rel not in gone]
    stats = [_stat(root / rel) for rel, _ in listing.files]
    sizes = None if image_size is None else _as_hw(image_size)
    key = _cache_key(root, listing, stats, sizes, on_bad_file)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_in_data = inside(cache, root)
    if cache_in_data:
        warnings.warn(f"the cache folder {cache} is inside the data folder {root}, so nothing is cached; "
                      "choose a --cache-dir outside it", stacklevel=2)
    cached = _read_cache(cache, key, root)
    if cached is not None:
        cached.skipped = skipped + cached.skipped
        _check_classes(cached, min_classes)
        return cached

    if sizes is None:
        sizes = _most_common_size(root, listing, quiet=quiet)
    images, keep, bad = _decode_all(root, listing, sizes, on_bad_file, quiet=quiet)
    paths = [rel for (rel, _), ok in zip(listing.files, keep) if ok]
    labels = torch.tensor([lab for (_, lab), ok in zip(listing.files, keep) if ok], dtype=torch.int64)
    dataset = ImageDataset(
        root=root,
        images=torch.from_numpy(images),
        labels=labels,
        paths=paths,
        classes=listing.classes,
        fingerprint=dataset_fingerprint(root, paths),
        skipped=bad,
    )
    if not cache_in_data:  # never write below an input folder
        _write_cache(cache, key, dataset)
    dataset.skipped = skipped + bad
    _check_classes(dataset, min_classes)
    return dataset


def _check_classes(dataset: ImageDataset, min_classes: int) -> None:
    if len(dataset) == 0:
        raise AablError(f"{dataset.root} holds no readable images; add images under {dataset.root}/<class>/")
    nonempty = sum(1 for c in dataset.class_counts() if c > 0)
    if nonempty < min_classes:
        raise AablError(f"{dataset.root} has {nonempty} non-empty class folder(s); training needs at least "
                        f"{min_classes}: add images of another class under {dataset.root}/<class>/")


def check_image_size(dataset: ImageDataset) -> None:
    """Refuse images smaller than the models take, naming the option that enlarges them."""
    h, w = dataset.image_size
    if min(h, w) < MIN_SIDE:
        raise AablError(f"{dataset.root}: the images are {w}x{h} px, smaller than the {MIN_SIDE} px the models need; "
                        f"pass --image-size {MIN_SIDE} (or more) to enlarge them")


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as err:
        raise AablError(f"cannot read {path}: {err.strerror}; check the file or its link") from err
    return st.st_size, st.st_mtime_ns


def _most_common_size(root: Path, listing: FolderListing, *, quiet: bool) -> tuple[int, int]:
    counts: collections.Counter[tuple[int, int]] = collections.Counter()
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for size in pool.map(_image_size, (root / rel for rel, _ in listing.files)):
            if size is not None:
                counts[size] += 1
    if not counts:
        raise AablError(f"{root} holds no readable images; add images under {root}/<class>/")
    return counts.most_common(1)[0][0]


def _decode_all(
    root: Path, listing: FolderListing, size: tuple[int, int], on_bad_file: str, *, quiet: bool
) -> tuple[np.ndarray, list[bool], list[dict[str, str]]]:
    n = len(listing.files)
    out = np.empty((n, 3, size[0], size[1]), dtype=np.uint8)
    keep = [True] * n
    bad: list[dict[str, str]] = []

    def work(i: int) -> str | None:
        rel = listing.files[i][0]
        try:
            out[i] = decode_image(root / rel, size).transpose(2, 0, 1)
        except AablError as err:
            if on_bad_file != "skip":
                raise
            return str(err).split(";")[0]
        return None

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        results = pool.map(work, range(n))
        for i, reason in enumerate(progress(results, total=n, desc="decoding", unit="img", quiet=quiet)):
            if reason is not None:
                keep[i] = False
                bad.append({"path": listing.files[i][0], "reason": reason})
    if not all(keep):
        out = out[np.asarray(keep)]
    return out, keep, bad


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _cache_key(root: Path, listing: FolderListing, stats: list[tuple[int, int]],
               size: tuple[int, int] | None, on_bad_file: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"v1|{os.path.realpath(root)}|{size}|{on_bad_file}|{listing.classes}".encode())
    for (rel, label), (nbytes, mtime) in zip(listing.files, stats):
        digest.update(f"{rel}|{label}|{nbytes}|{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _read_cache(cache: Path, key: str, root: Path) -> ImageDataset | None:
    meta_path, array_path = cache / f"{key}.json", cache / f"{key}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        # Copy-on-write mapping: pages load lazily and the tensor is writable without a copy.
        array = np.load(array_path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if array.shape[0] != len(meta["paths"]):
        return None
    return ImageDataset(
        root=root,
        images=torch.from_numpy(array),
        labels=torch.tensor(meta["labels"], dtype=torch.int64),
        paths=meta["paths"],
        classes=meta["classes"],
        fingerprint=meta["fingerprint"],
        skipped=meta["skipped"],
    )


def _write_cache(cache: Path, key: str, dataset: ImageDataset) -> None:
    """Best effort: a cache that cannot be written costs time, never correctness."""
    tmp, tmp_meta = cache / f".{key}.{os.getpid()}.npy", cache / f".{key}.{os.getpid()}.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(tmp, dataset.images.numpy())
        os.replace(tmp, cache / f"{key}.npy")
        meta = {"paths": dataset.paths, "labels": dataset.labels.tolist(), "classes": dataset.classes,
                "fingerprint": dataset.fingerprint, "skipped": dataset.skipped}
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, cache / f"{key}.json")
    except OSError as err:
        print(f"warning: could not write the decode cache in {cache}: {err.strerror}", file=sys.stderr)
    finally:  # a full disk leaves no half-written file behind
        for leftover in (tmp, tmp_meta):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)


def write_image_folder(
    out: Path, root: Path, paths: Iterable[str], *, link: str = "copy"
) -> int:
    """Place each file `root/rel` at `out/rel` by copy, hard link or symlink; never touches `root`.

    Returns how many files were written. `link="none"` writes nothing.
    """
    if link == "none":
        return 0
    count = 0
    for rel in paths:
        target = out / safe_relative(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = root / rel
        if link == "copy":
            shutil.copyfile(source, target)
        elif link == "hardlink":
            os.link(os.path.realpath(source), target)
        else:
            os.symlink(os.path.realpath(source), target)
        count += 1
    return count
