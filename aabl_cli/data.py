"""Image folders in, one uint8 tensor out.

An image folder is torchvision's `ImageFolder` layout, `root/<class>/<file>`, classes
sorted by name. It is decoded once into a `uint8 (N, 3, H, W)` tensor with `int64`
labels and the files' relative paths, and cached in a memory-mappable file keyed by the
files' contents (sha256), so a second run does not decode again and a rewritten file is
never served from the cache, whatever its size and mtime.

Only the documented formats are decoded (`PIL_FORMATS`), and an image is refused from its
header when it holds more than `max_image_pixels` pixels, before its pixels are allocated.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from aabl_cli.errors import AablError
from aabl_cli.fsutil import inside, safe_relative
from aabl_cli.progress import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
# Pillow's names for those formats ("PPM" also reads PGM and PBM). Image.open tries these alone, so a
# PostScript or other file named .png never reaches Ghostscript or another decoder outside Pillow.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "WEBP")
FORMATS_READ = "PNG, JPEG, BMP, PPM/PGM/PBM and WebP"
LINK_MODES = ("copy", "hardlink", "symlink", "none")

# Pixels per image decoded at most, checked from the header before decoding: 40 M pixels is a
# 7,300 x 5,500 photo (120 MB as RGB); a 48-KB PNG can claim 400 M pixels (1.2 GB and more decoded).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The largest image size a checkpoint may record (evaluate resizes test images to it).
MAX_IMAGE_PIXELS = 16384 * 16384
# open_image's own check replaces Pillow's, whose warning does not name the file.
Image.MAX_IMAGE_PIXELS = None
CHUNK = 256  # files read per thread-pool task at most
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


def open_image(path: str | os.PathLike[str], *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               data: bytes | None = None) -> Image.Image:
    """Open an image file of a documented format, reading its header alone; every read of a
    user's image goes through here. Use it as `with open_image(path) as img:`.

    Pillow tries only `PIL_FORMATS`; an image of more than `max_image_pixels` pixels is refused
    before anything allocates its pixels. `data`: the file's bytes when the caller has read
    them (`path` then only names the file). Raises AablError naming the file.
    """
    try:
        img = Image.open(path if data is None else io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError as err:
        raise AablError(f"{path}: not a readable image (aabl reads {FORMATS_READ}); remove or replace it, "
                        "or pass --on-bad-file skip") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise AablError(f"{path}: unreadable ({err}); remove or replace it, or pass --on-bad-file skip") from err
    width, height = img.size
    if width * height > max_image_pixels:
        img.close()
        raise AablError(f"{path}: {width}x{height} px is {width * height} pixels, more than the cap of "
                        f"{max_image_pixels} pixels per image, so it was not decoded (a decompression bomb?); "
                        f"pass --max-image-pixels {width * height} to read it, remove it, "
                        "or pass --on-bad-file skip")
    return img


def decode_image(path: str | os.PathLike[str], size: tuple[int, int] | None = None, *,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data: bytes | None = None) -> np.ndarray:
    """Decode one file to an RGB uint8 array (H, W, 3), resized (bilinear) to `size` if given.

    `data`: the file's bytes when already read (see `open_image`). Raises AablError naming the
    file when it is not a readable image of a documented format or holds more than
    `max_image_pixels` pixels.
    """
    with open_image(path, max_image_pixels=max_image_pixels, data=data) as img:
        try:
            img.load()
            rgb = _to_rgb(img)
        except (OSError, SyntaxError, ValueError) as err:
            raise AablError(f"{path}: unreadable ({err}); remove or replace it, or pass --on-bad-file skip") from err
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


def _image_size(path: Path, max_image_pixels: int) -> tuple[int, int] | AablError:
    """(H, W) from the header, or why the file will not be decoded."""
    try:
        with open_image(path, max_image_pixels=max_image_pixels) as img:
            return img.height, img.width
    except AablError as err:
        return err


def dataset_fingerprint(root: Path, paths: Iterable[str]) -> str:
    """sha256 over the relative paths and the bytes of every file, in dataset order.

    Raises OSError for a path that is not a regular file: a pipe or /dev/zero never ends.
    """
    paths = list(paths)
    return _combine(paths, [_file_digest(root / rel) for rel in paths])


def _combine(paths: Sequence[str], digests: Sequence[bytes]) -> str:
    """The dataset fingerprint from each file's sha256 digest."""
    digest = hashlib.sha256()
    for rel, file_digest in zip(paths, digests, strict=True):
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(file_digest)
    return digest.hexdigest()


def _blocks(path: Path) -> Iterator[bytes]:
    """The bytes of the regular file `path` in blocks; OSError for anything else (a pipe or
    /dev/zero never ends). Plain file descriptors: a buffered file object costs more than
    reading a 2-KB image does. O_NONBLOCK: opening a pipe would wait for a writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        while block := os.read(fd, 1 << 20):
            yield block
    finally:
        os.close(fd)


def _file_digest(path: Path) -> bytes:
    file_digest = hashlib.sha256()
    for block in _blocks(path):
        file_digest.update(block)
    return file_digest.digest()


def _digests(root: Path, listing: FolderListing, *, quiet: bool) -> list[bytes | None]:
    """Each file's sha256, None for a file that cannot be read (decoding then names it)."""
    def digest(rel: str) -> bytes | None:
        try:
            return _file_digest(root / rel)
        except OSError:
            return None

    return _map_files(digest, [rel for rel, _ in listing.files], desc="hashing", quiet=quiet)


T = TypeVar("T")
R = TypeVar("R")


def _map_files(func: Callable[[T], R], items: Sequence[T], *, desc: str, quiet: bool) -> list[R]:
    """`[func(x) for x in items]` on a thread pool, in order, in chunks: the pool's cost per task is
    many times that of reading one small image. Fewer per chunk for few items, so that a few
    big photos still spread over the threads."""
    workers = _workers()
    chunk = max(1, min(CHUNK, len(items) // (8 * workers)))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        parts = pool.map(lambda start: [func(x) for x in items[start:start + chunk]], range(0, len(items), chunk))
        return list(progress((r for part in parts for r in part), total=len(items), desc=desc, unit="img",
                             quiet=quiet))
    finally:  # an error (a bad file) is reported now, not after the chunks still queued have run
        pool.shutdown(cancel_futures=True)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aabl"


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    image_size: int | tuple[int, int] | None = None,
    on_bad_file: str = "error",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    cache_dir: str | os.PathLike[str] | None = None,
    min_classes: int = 2,
    warn_empty: bool = True,
    quiet: bool = False,
) -> ImageDataset:
    """Decode an image folder into an `ImageDataset`, from the cache when no file's bytes changed.

    `image_size`: N or (H, W) to resize to; default the most common size in the folder.
    `on_bad_file`: "error" stops at the first unreadable file, "skip" lists it in
    `skipped`; a file over `max_image_pixels` pixels is such a file. `min_classes`: how many
    non-empty classes the caller needs; `warn_empty`: warn about empty class folders (a
    triggered test set has only the target's). Every file is read once for its sha256 (the
    cache key and the fingerprint), and once more to be decoded when the cache misses.
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
    sizes = None if image_size is None else _as_hw(image_size)
    settings = (sizes, on_bad_file, max_image_pixels)
    key = _cache_key(root, listing, _digests(root, listing, quiet=quiet), settings)
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
        sizes = _most_common_size(root, listing, on_bad_file, max_image_pixels, quiet=quiet)
    images, keep, bad, digests = _decode_all(root, listing, sizes, on_bad_file, max_image_pixels, quiet=quiet)
    paths = [rel for (rel, _), ok in zip(listing.files, keep) if ok]
    labels = torch.tensor([lab for (_, lab), ok in zip(listing.files, keep) if ok], dtype=torch.int64)
    dataset = ImageDataset(
        root=root,
        images=torch.from_numpy(images),
        labels=labels,
        paths=paths,
        classes=listing.classes,
        fingerprint=_combine(paths, [d for d, ok in zip(digests, keep) if ok]),
        skipped=bad,
    )
    if not cache_in_data:  # never write below an input folder
        # keyed by the bytes decoded, which differ from the ones looked up if a file changed meanwhile
        _write_cache(cache, _cache_key(root, listing, digests, settings), dataset)
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


def _most_common_size(root: Path, listing: FolderListing, on_bad_file: str, max_image_pixels: int, *,
                      quiet: bool) -> tuple[int, int]:
    sizes = _map_files(lambda rel: _image_size(root / rel, max_image_pixels), [rel for rel, _ in listing.files],
                       desc="sizing", quiet=quiet)
    counts = collections.Counter(size for size in sizes if isinstance(size, tuple))
    if not counts:
        errors = [err for err in sizes if isinstance(err, AablError)]
        if not errors:
            raise AablError(f"{root} holds no readable images; add images under {root}/<class>/")
        if on_bad_file != "skip":  # the first file's own reason and fix
            raise errors[0]
        raise AablError(f"{root} holds no readable images: all {len(errors)} image files are bad, the first: "
                        f"{errors[0]}")
    return counts.most_common(1)[0][0]


def _decode_all(
    root: Path, listing: FolderListing, size: tuple[int, int], on_bad_file: str, max_image_pixels: int, *,
    quiet: bool
) -> tuple[np.ndarray, list[bool], list[dict[str, str]], list[bytes | None]]:
    """The images, which were kept, the bad files, and the sha256 of the bytes each was decoded
    from (None where the file could not be read)."""
    n = len(listing.files)
    out = np.empty((n, 3, size[0], size[1]), dtype=np.uint8)
    keep = [True] * n
    bad: list[dict[str, str]] = []
    digests: list[bytes | None] = [None] * n

    def work(i: int) -> str | None:
        path = root / listing.files[i][0]
        try:
            try:
                data = b"".join(_blocks(path))
            except OSError as err:
                raise AablError(f"cannot read {path}: {err.strerror}; check its permissions, remove it, "
                                "or pass --on-bad-file skip") from err
            digests[i] = hashlib.sha256(data).digest()
            out[i] = decode_image(path, size, max_image_pixels=max_image_pixels, data=data).transpose(2, 0, 1)
        except AablError as err:
            if on_bad_file != "skip":
                raise
            return str(err).split(";")[0]
        return None

    for i, reason in enumerate(_map_files(work, range(n), desc="decoding", quiet=quiet)):
        if reason is not None:
            keep[i] = False
            bad.append({"path": listing.files[i][0], "reason": reason})
    if not all(keep):
        out = out[np.asarray(keep)]
    return out, keep, bad, digests


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _cache_key(root: Path, listing: FolderListing, digests: list[bytes | None],
               settings: tuple[tuple[int, int] | None, str, int]) -> str:
    """Keyed by every file's content, never by sizes and mtimes (`cp -p` or `rsync -t` keep both), and
    by the settings that change what is decoded: size, on_bad_file and max_image_pixels."""
    digest = hashlib.sha256()
    digest.update(f"v2|{os.path.realpath(root)}|{settings}|{listing.classes}".encode())
    for (rel, label), file_digest in zip(listing.files, digests, strict=True):
        content = "unreadable" if file_digest is None else file_digest.hex()
        digest.update(f"{rel}|{label}|{content}\n".encode("utf-8", "surrogateescape"))
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
