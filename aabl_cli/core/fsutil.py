"""Atomic output folders: an interrupted command leaves the old output or the new one."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aabl_cli.core.errors import AablError, RuntimeFault
from aabl_cli.core.text import json_text


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
    remove_stale_temporaries(final)
    tmp = temporary_name(final, "tmp")
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
    old = temporary_name(final, "old")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON through a temporary file and a rename (creating the folder).
    NaN and infinities become null (`text.json_text`): JSON has no such numbers."""
    write_text(path, json_text(data, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 `text` through a temporary file and a rename (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path, "tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:  # a full disk leaves neither a half-written file nor a temporary one
        tmp.unlink(missing_ok=True)


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when `path` is `folder` or lies below it, after resolving links."""
    path_real, folder_real = Path(path).resolve(), Path(folder).resolve()
    return path_real == folder_real or folder_real in path_real.parents


# Why an output may not hold the scanned data: the usual way to run into it.
SECOND_ROUND = ("a second cleaning round of WORKDIR/split/kept needs a work directory of its own, "
                "e.g. --workdir aabl-out-2")


@dataclass(frozen=True)
class Place:
    """A path a command reads or writes, and how its messages name it ("the data folder", "--out")."""

    path: Path
    what: str


def refuse_overlap(reads: Sequence[Place | None], *, replaces: Sequence[Place] = (),
                   writes_into: Sequence[Place] = (), fix: str) -> None:
    """Refuse a command whose outputs touch its inputs, before anything is written.

    `reads`: every folder and file the run reads (None entries are skipped), including those
    named indirectly (the dataset a scan.json records, a split's kept/). `replaces`: folders
    and files the run replaces whole (its outputs, resume folders). `writes_into`: folders it
    only adds files to (the work directory: lock files, temporaries). Writing inside an input
    would modify it; replacing a folder that holds an input would delete it. Links and `..`
    are resolved first. Raises AablError whose message ends with `fix`.
    """
    inputs = [place for place in reads if place is not None]
    for out in writes_into:
        for source in inputs:
            if inside(out.path, source.path):
                raise AablError(_inside_message(out, source, fix))
    for out in replaces:
        for source in inputs:
            if inside(source.path, out.path):
                same = Path(source.path).resolve() == Path(out.path).resolve()
                holds = f"is {source.what} itself" if same else f"contains {source.what} {source.path}"
                raise AablError(f"{out.what} {out.path} {holds}, and writing it would replace {source.what}; {fix}")
            if inside(out.path, source.path):
                raise AablError(_inside_message(out, source, fix))


def _inside_message(out: Place, source: Place, fix: str) -> str:
    return f"{out.what} {out.path} is inside {source.what} {source.path}; {fix} (aabl never writes into its input)"


def temporary_name(final: Path, kind: str) -> Path:
    """A hidden sibling of `final` for work in progress: `.NAME.KIND-PID-HEX`. The PID tells a later
    run whether the process that made it still runs (`remove_stale_temporaries`)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temporaries(final: Path, *, locked: bool = False) -> list[Path]:
    """Delete the temporaries (`.NAME.tmp-*`, `.NAME.old-*`) that killed runs left beside `final`.

    One counts as stale when the PID in its name no longer runs, or when its name holds no PID
    (an older aabl's); with `locked` (the caller holds the lock of `final`'s writers, so no other
    process can be writing one) every one not of this process. Returns what was removed.
    """
    final = Path(final)
    removed = []
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*"):
            pid_text = path.name[len(final.name) + len(kind) + 3:].partition("-")[0]
            if pid_text.isdigit() and (int(pid_text) == os.getpid() or (not locked and pid_alive(int(pid_text)))):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """True when a process `pid` exists on this machine (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def safe_relative(rel: str) -> Path:
    """Return `rel` as a relative path that cannot leave the folder it is joined to.

    Raises AablError for absolute paths, `..` parts or empty names: a crafted dataset
    must not make a writer escape its output folder.
    """
    p = Path(rel)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts):
        raise AablError(f"refusing to write {rel!r}: the path would leave the output folder")
    return p


LINK_MODES = ("copy", "hardlink", "symlink", "none")  # how write_image_folder places a file


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
