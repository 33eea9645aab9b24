"""The decode cache: a decoded image folder as a memory-mappable .npy file and its .json listing.

Keyed by every file's content (sha256), never by sizes and mtimes (`cp -p` or `rsync -t` keep
both), so a rewritten file is never served from the cache. Best effort: a cache that cannot be
read or written costs time, never correctness.

A first decode writes its rows into `.KEY.PID.npy` chunk by chunk (`CacheWriter`), so the host
never holds the whole set, and renames it to `KEY.npy` once every row is in: an interrupted
decode leaves no entry a later run would trust, and the next writer removes the temporaries a
killed one left. `RowFile` reads rows back with positioned reads, for the streamed data path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MOVE_BYTES = 4 << 20  # rows moved at a time when skipped files leave gaps


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aabl"


def cache_key(root: Path, classes: Sequence[str], files: Sequence[tuple[str, int]],
              digests: Sequence[bytes | None], settings: tuple[tuple[int, int] | None, str, int]) -> str:
    """The key of a folder's decoded form: its files' contents and labels, and the settings that change
    what is decoded (size, on_bad_file and max_image_pixels)."""
    digest = hashlib.sha256()
    digest.update(f"v2|{os.path.realpath(root)}|{settings}|{list(classes)}".encode())
    for (rel, label), file_digest in zip(files, digests, strict=True):
        content = "unreadable" if file_digest is None else file_digest.hex()
        digest.update(f"{rel}|{label}|{content}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


class RowFile:
    """uint8 rows of `row_shape`, `count` of them, stored from byte `offset` of the open file `handle`.

    `read_into` copies rows with positioned reads: unlike pages of a memory map, the page cache
    they come through does not count as the process's memory, so streaming a set larger than
    memory keeps the process small. Safe from several threads (no file position is shared)."""

    def __init__(self, handle: BinaryIO, offset: int, count: int, row_shape: tuple[int, ...]) -> None:
        self.handle, self.offset, self.count, self.row_shape = handle, offset, count, tuple(row_shape)
        self.row_bytes = int(np.prod(row_shape))

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """`out[j] = row rows[j]` for uint8 `out` of shape (len(rows), *row_shape); runs of consecutive
        rows are read in one call."""
        if len(rows) == 0:
            return
        flat = out.reshape(len(rows), self.row_bytes)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            _pread_into(self.handle.fileno(), memoryview(flat[start:stop]).cast("B"),
                        self.offset + int(rows[start]) * self.row_bytes)

    def array(self) -> np.ndarray:
        """All rows as a copy-on-write memory map (N, *row_shape): pages load when touched."""
        return np.memmap(self.handle, dtype=np.uint8, mode="c", offset=self.offset,
                         shape=(self.count, *self.row_shape))


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view], offset)
        else:  # no preadv (older macOS): one copy more
            data = os.pread(fd, len(view), offset)
            got = len(data)
            view[:got] = data
        if got == 0:
            raise OSError(f"the decode cache file ends early (at byte {offset}); delete it to decode again")
        view, offset = view[got:], offset + got


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def read_cache(cache: Path, key: str) -> tuple[np.ndarray, dict[str, Any], RowFile] | None:
    """The cached images (uint8 (N, 3, H, W), memory-mapped copy-on-write), their listing and the rows'
    file, or None."""
    meta_path, array_path = cache / f"{key}.json", cache / f"{key}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        # Copy-on-write mapping: pages load lazily and the tensor is writable without a copy.
        array = np.load(array_path, mmap_mode="c")
        handle = open(array_path, "rb")  # noqa: SIM115 - lives as long as the dataset that streams from it
    except (OSError, ValueError):
        return None
    if array.shape[0] != len(meta["paths"]):
        handle.close()
        return None
    return array, meta, RowFile(handle, int(array.offset), array.shape[0], array.shape[1:])


def _header(shape: tuple[int, ...], length: int | None = None) -> bytes:
    """A .npy (version 1.0) header of uint8 `shape`, space-padded to `length` bytes (default: the
    next multiple of 64), so a header of fewer rows fits in the place reserved for more."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    length = length or -(-(len(text) + 11) // 64) * 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length - 10) + (text.ljust(length - 11) + "\n").encode("latin1")


_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.(\d+)\.(npy|json)")


def _sweep(cache: Path) -> None:
    """Remove the temporaries of writers that died (`.KEY.PID.npy`, `.KEY.PID.json`, PID gone)."""
    with contextlib.suppress(OSError):
        for path in cache.iterdir():
            found = _TEMPORARY.fullmatch(path.name)
            if found is None or int(found.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(found.group(1)), 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except OSError:  # alive under another user, or no permission to ask: leave it
                pass


class CacheWriter:
    """A decoded set of `shape[0]` rows, each written to its place in `cache/.KEY.PID.npy` as soon as
    it is decoded (`put`, from any thread), then renamed to `cache/KEY.npy` by `commit`. With `cache`
    None (the cache would lie inside the data folder) or a cache folder that cannot be written, an
    anonymous temporary file holds the rows instead (nothing is cached); should writing fail midway
    (a full disk), host memory does. Failures are warnings: they cost time, never correctness.
    `discard` removes the temporary."""

    def __init__(self, cache: Path | None, key: str, shape: tuple[int, ...]) -> None:
        self.cache, self.shape = cache, tuple(shape)
        self.row_bytes = int(np.prod(shape[1:]))
        self.head = _header(self.shape)
        self.tmp: Path | None = None
        self.memory: np.ndarray | None = None
        self.handle: BinaryIO | None = None
        self.lock = threading.Lock()  # a switch to memory must see every row written before it
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                _sweep(cache)
                self.tmp = cache / f".{key}.{os.getpid()}.npy"
                self.handle = open(self.tmp, "w+b")  # noqa: SIM115 - closed by discard, or lives with the rows
            except OSError as err:
                self._warn(err)
                self.tmp = None
        if self.handle is None:
            try:
                self.handle = tempfile.TemporaryFile()  # noqa: SIM115 - unlinked already; lives with the rows
            except OSError:
                self.memory = np.zeros(self.shape, dtype=np.uint8)
                return
        try:
            _pwrite_all(self.handle.fileno(), memoryview(self.head), 0)
        except OSError as err:
            self._to_memory(err)

    def _warn(self, err: OSError) -> None:
        print(f"warning: could not write the decode cache in {self.cache}: {err.strerror}", file=sys.stderr)

    def _offset(self, i: int) -> int:
        return len(self.head) + i * self.row_bytes

    def put(self, i: int, row: np.ndarray) -> None:
        """Row `i`: uint8 of shape `shape[1:]`."""
        with self.lock:
            if self.memory is None:
                assert self.handle is not None
                try:
                    data = memoryview(np.ascontiguousarray(row).reshape(-1))
                    _pwrite_all(self.handle.fileno(), data, self._offset(i))
                    return
                except OSError as err:
                    self._to_memory(err)
            assert self.memory is not None
            self.memory[i] = row

    def _to_memory(self, err: OSError) -> None:
        """Writing failed: carry on in host memory with the rows written so far."""
        if self.tmp is not None:
            self._warn(err)
        assert self.handle is not None
        self.memory = np.zeros(self.shape, dtype=np.uint8)
        size = os.fstat(self.handle.fileno()).st_size
        written = max(0, min(self.shape[0], (size - len(self.head)) // self.row_bytes))
        RowFile(self.handle, len(self.head), written, self.shape[1:]).read_into(np.arange(written),
                                                                                self.memory[:written])
        self.discard()

    def commit(self, key: str, meta: dict[str, Any], keep: np.ndarray) -> tuple[np.ndarray, RowFile | None]:
        """Finish with the rows `keep` (a boolean mask) says: moved together, their header, the rename
        to `KEY.npy` and the listing `meta` beside it. Returns the rows (memory-mapped, or in memory) and
        their file (None in memory)."""
        count, row_shape = int(keep.sum()), self.shape[1:]
        if self.memory is None:
            assert self.handle is not None
            fd = self.handle.fileno()
            try:
                if count < self.shape[0]:
                    self._compact(np.flatnonzero(keep))
                _pwrite_all(fd, memoryview(_header((count, *row_shape), len(self.head))), 0)
                os.ftruncate(fd, self._offset(count))
            except OSError as err:
                self._to_memory(err)
        if self.memory is not None:
            return (self.memory if count == self.shape[0] else self.memory[keep]), None
        if self.tmp is not None:
            self._publish(key, meta)
        assert self.handle is not None
        rows = RowFile(self.handle, len(self.head), count, row_shape)
        return rows.array(), rows

    def _compact(self, kept: np.ndarray) -> None:
        """Move the kept rows to the front, in order, a few MB at a time (a row only moves down, so
        no row is overwritten before it is read)."""
        assert self.handle is not None
        source = RowFile(self.handle, len(self.head), self.shape[0], self.shape[1:])
        step = max(1, MOVE_BYTES // self.row_bytes)
        for start in range(0, len(kept), step):
            part = kept[start:start + step]
            buffer = np.empty((len(part), *self.shape[1:]), dtype=np.uint8)
            source.read_into(part, buffer)
            _pwrite_all(self.handle.fileno(), memoryview(buffer.reshape(-1)), self._offset(start))

    def _publish(self, key: str, meta: dict[str, Any]) -> None:
        assert self.cache is not None and self.tmp is not None
        tmp_meta = self.cache / f".{key}.{os.getpid()}.json"
        try:
            os.replace(self.tmp, self.cache / f"{key}.npy")
            self.tmp = None  # the handle now reads KEY.npy
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, self.cache / f"{key}.json")
        except OSError as err:  # the rows stay readable through the open handle
            self._warn(err)
        finally:
            tmp_meta.unlink(missing_ok=True)

    def discard(self) -> None:
        """Drop the temporary file: nothing of this decode is left for a later run to trust."""
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink(missing_ok=True)
            self.tmp = None
