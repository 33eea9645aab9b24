"""Atomic output folders: an interrupted command leaves the old output or the new one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aabl_cli.errors import AablError, RuntimeFault


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` in one rename.

    On any exception the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeFault(f"cannot create output folder {parent}: {err.strerror}; "
                           "choose a writable --workdir or --out") from err
    tmp = parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as err:
        raise RuntimeFault(f"cannot write to {parent}: {err.strerror}; "
                           "choose a writable --workdir or --out") from err
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS):
            raise RuntimeFault(f"writing {final} failed: {err.strerror}; "
                               "free some space or choose another output folder") from err
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap `tmp` into `final`; the old folder is kept under a sibling name until the swap is done."""
    if final.is_symlink() or final.is_file():
        raise AablError(f"{final} exists and is not a folder; remove it or choose another output path")
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON through a temporary file and a rename (creating the folder)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 `text` through a temporary file and a rename (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:  # a full disk leaves neither a half-written file nor a temporary one
        tmp.unlink(missing_ok=True)


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when `path` is `folder` or lies below it, after resolving links."""
    path_real, folder_real = Path(path).resolve(), Path(folder).resolve()
    return path_real == folder_real or folder_real in path_real.parents


def refuse_overlap(inputs: list[Path], *, workdir: Path, outputs: list[Path]) -> None:
    """Refuse a work directory inside an input folder, or an output folder that holds one: writing
    there would modify the input, and promoting the output would delete it."""
    for data in inputs:
        if inside(workdir, data):
            raise AablError(f"--workdir {workdir} is inside the data folder {data}; choose a --workdir outside it "
                            "(aabl never writes into its input)")
        for out in outputs:
            if inside(data, out):
                raise AablError(f"writing {out} would replace the data folder {data} inside it; move the data or "
                                "choose another --workdir")


def safe_relative(rel: str) -> Path:
    """Return `rel` as a relative path that cannot leave the folder it is joined to.

    Raises AablError for absolute paths, `..` parts or empty names: a crafted dataset
    must not make a writer escape its output folder.
    """
    p = Path(rel)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts):
        raise AablError(f"refusing to write {rel!r}: the path would leave the output folder")
    return p
