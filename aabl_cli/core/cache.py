"""The decode cache: a decoded image folder as a memory-mappable .npy file and its .json listing.

Keyed by every file's content (sha256), never by sizes and mtimes (`cp -p` or `rsync -t` keep
both), so a rewritten file is never served from the cache. Best effort: a cache that cannot be
read or written costs time, never correctness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


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


def read_cache(cache: Path, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached images (uint8 (N, 3, H, W), memory-mapped copy-on-write) and their listing, or None."""
    meta_path, array_path = cache / f"{key}.json", cache / f"{key}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        # Copy-on-write mapping: pages load lazily and the tensor is writable without a copy.
        array = np.load(array_path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if array.shape[0] != len(meta["paths"]):
        return None
    return array, meta


def write_cache(cache: Path, key: str, images: np.ndarray, meta: dict[str, Any]) -> None:
    """Store `images` and their listing `meta` under `key`; a failure is a warning."""
    tmp, tmp_meta = cache / f".{key}.{os.getpid()}.npy", cache / f".{key}.{os.getpid()}.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(tmp, images)
        os.replace(tmp, cache / f"{key}.npy")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, cache / f"{key}.json")
    except OSError as err:
        print(f"warning: could not write the decode cache in {cache}: {err.strerror}", file=sys.stderr)
    finally:  # a full disk leaves no half-written file behind
        for leftover in (tmp, tmp_meta):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
