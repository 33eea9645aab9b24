"""Image folders in, one uint8 tensor out.

An image folder is torchvision's `ImageFolder` layout, `root/<class>/<file>`, classes
sorted by name. It is decoded once into a `uint8 (N, 3, H, W)` tensor with `int64`
labels and the files' relative paths, and cached in a memory-mappable file keyed by the
files' contents (sha256), so a second run does not decode again and a rewritten file is
never served from the cache, whatever its size and mtime. A first decode writes each image
into the cache file as soon as it is decoded, so no run holds the whole set in memory; the
dataset's `images` map that file, and its `rows` read from it for the streamed data path
(`core.stream`).

Images are decoded by `core.images`; the cache is `core.cache`.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from aabl_cli.core.cache import CacheWriter, RowFile, cache_key, default_cache_dir, read_cache
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import inside
from aabl_cli.core.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MIN_SIDE,
    decode_image,
    header_size,
)
from aabl_cli.core.progress import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
CHUNK = 256  # files read per thread-pool task at most


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
    """A decoded image folder. `images` is uint8 (N, 3, H, W), memory-mapped from the decode cache
    (pages load when touched); `labels` int64 (N,). `rows` reads the same images from their file
    without mapping it (None for a set held in memory)."""

    root: Path
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    classes: list[str]
    fingerprint: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    rows: RowFile | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def row_bytes(self) -> int:
        """Bytes of one decoded image."""
        return int(np.prod(self.images.shape[1:]))

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
    key = cache_key(root, listing.classes, listing.files, _digests(root, listing, quiet=quiet), settings)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_in_data = inside(cache, root)
    if cache_in_data:
        warnings.warn(f"the cache folder {cache} is inside the data folder {root}, so nothing is cached; "
                      "choose a --cache-dir outside it", stacklevel=2)
    cached = _read_cached(cache, key, root)
    if cached is not None:
        cached.skipped = skipped + cached.skipped
        _check_classes(cached, min_classes)
        return cached

    if sizes is None:
        sizes = _most_common_size(root, listing, on_bad_file, max_image_pixels, quiet=quiet)
    # never write below an input folder: then an anonymous temporary file holds the rows
    writer = CacheWriter(None if cache_in_data else cache, key, (len(listing.files), 3, *sizes))
    try:
        keep, bad, digests = _decode_all(root, listing, sizes, on_bad_file, max_image_pixels, writer, quiet=quiet)
        paths = [rel for (rel, _), ok in zip(listing.files, keep) if ok]
        labels = [lab for (_, lab), ok in zip(listing.files, keep) if ok]
        fingerprint = _combine(paths, [d for d, ok in zip(digests, keep) if ok])
        meta = {"paths": paths, "labels": labels, "classes": listing.classes, "fingerprint": fingerprint,
                "skipped": bad}
        # keyed by the bytes decoded, which differ from the ones looked up if a file changed meanwhile
        images, rows = writer.commit(cache_key(root, listing.classes, listing.files, digests, settings), meta,
                                     np.asarray(keep, dtype=bool))
    except BaseException:  # an error or Ctrl-C: no half-written entry stays behind
        writer.discard()
        raise
    dataset = ImageDataset(root=root, images=torch.from_numpy(images), labels=torch.tensor(labels, dtype=torch.int64),
                           paths=paths, classes=listing.classes, fingerprint=fingerprint, skipped=skipped + bad,
                           rows=rows)
    _check_classes(dataset, min_classes)
    return dataset


def _read_cached(cache: Path, key: str, root: Path) -> ImageDataset | None:
    found = read_cache(cache, key)
    if found is None:
        return None
    array, meta, rows = found
    return ImageDataset(root=root, images=torch.from_numpy(array),
                        labels=torch.tensor(meta["labels"], dtype=torch.int64), paths=meta["paths"],
                        classes=meta["classes"], fingerprint=meta["fingerprint"], skipped=meta["skipped"], rows=rows)


def peek_image_folder(folder: str | os.PathLike[str], *, image_size: int | None = None,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, int, list[int]]:
    """The dataset fingerprint a stage would record for `folder`, its image count and the size [H, W] a
    stage would train at, from the listing and the image headers alone: nothing is decoded (so files an
    `--on-bad-file skip` run would leave out still count)."""
    listing = list_image_folder(folder)
    paths = [rel for rel, _ in listing.files]
    if image_size is not None:
        size = [image_size, image_size]
    else:
        counts = collections.Counter(hw for hw in (header_size(listing.root / rel, max_image_pixels) for rel in paths)
                                     if isinstance(hw, tuple))
        size = list(counts.most_common(1)[0][0]) if counts else []
    return dataset_fingerprint(listing.root, paths), len(paths), size


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
    sizes = _map_files(lambda rel: header_size(root / rel, max_image_pixels), [rel for rel, _ in listing.files],
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
    root: Path, listing: FolderListing, size: tuple[int, int], on_bad_file: str, max_image_pixels: int,
    writer: CacheWriter, *, quiet: bool
) -> tuple[list[bool], list[dict[str, str]], list[bytes | None]]:
    """Decode every file into its row of `writer`; returns which were kept, the bad files, and the
    sha256 of the bytes each was decoded from (None where the file could not be read)."""
    n = len(listing.files)
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
            writer.put(i, decode_image(path, size, max_image_pixels=max_image_pixels, data=data).transpose(2, 0, 1))
        except AablError as err:
            if on_bad_file != "skip":
                raise
            return str(err).split(";")[0]
        return None

    for i, reason in enumerate(_map_files(work, range(n), desc="decoding", quiet=quiet)):
        if reason is not None:
            keep[i] = False
            bad.append({"path": listing.files[i][0], "reason": reason})
    return keep, bad, digests


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
