"""One writer per stage of a work directory: `with workdir_lock(workdir, "scan"): ...`.

Two commands writing one stage at once would publish a mix of both (one run's scan.json
beside the other's model). A stage's writer holds an exclusive `flock` on
`WORKDIR/.STAGE.lock`, which records its PID, command line and start time; a second writer
fails at once (exit 2) and names the holder. The kernel drops a flock when its process
dies, so a killed holder never blocks anyone: its file is taken over (and said so). A
holder that finishes deletes the file.

Taking a stage's lock also deletes the temporaries (`.STAGE.tmp-*`, `.STAGE.old-*`) that
killed writers of the stage left: while the lock is held no other writer can own one.

The locks are reentrant within a process: `aabl run` takes its three stages once, and
the stage functions it calls find them held. Under torchrun only rank 0 writes, so only
rank 0 locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aabl_cli.core.errors import AablError, RuntimeFault
from aabl_cli.core.fsutil import pid_alive, remove_stale_temporaries
from aabl_cli.core.progress import log

# File systems without flock (some network mounts): the run goes on unlocked, as before locks existed.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@dataclass
class _Held:
    fd: int | None  # None: the file system has no locks
    depth: int


_HELD: dict[Path, _Held] = {}  # lock file (resolved) -> this process's hold on it


def lock_path(workdir: str | os.PathLike[str], stage: str) -> Path:
    """The lock file of `stage` in `workdir`."""
    return Path(workdir) / f".{stage}.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike[str], *stages: str, quiet: bool = False,
                 tidy: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of each of `stages` in `workdir` for the block; all or none.

    Raises AablError (exit 2) naming the holder when another process holds one of them.
    Reentrant: a stage this process already holds is not locked again. Creates `workdir`
    if needed and, with `tidy`, removes it again if it is still empty at the end (a
    command that failed early leaves no empty work directory behind).
    """
    from aabl_cli.core.distributed import launched_as_main

    if not launched_as_main():  # torchrun's other ranks write nothing
        yield
        return
    workdir = Path(workdir)
    created = tidy and not workdir.exists()
    try:
        with contextlib.ExitStack() as stack:
            for stage in stages:
                stack.enter_context(_stage_lock(lock_path(workdir, stage), quiet=quiet))
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                workdir.rmdir()  # nothing was written after all (e.g. the input was refused)


@contextlib.contextmanager
def _stage_lock(path: Path, *, quiet: bool) -> Iterator[None]:
    key = path.parent.resolve() / path.name
    held = _HELD.get(key)
    if held is not None:
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeFault(f"cannot create {path.parent}: {err.strerror}; choose a writable --workdir or --out") \
            from err
    fd = _acquire(path, quiet=quiet)
    _HELD[key] = _Held(fd=fd, depth=1)
    try:
        remove_stale_temporaries(path.parent / path.name[1:].removesuffix(".lock"), locked=True)  # killed writers
        yield
    finally:
        del _HELD[key]
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # before the unlock: a waiting process then sees another file (see _acquire)
            os.close(fd)


def _acquire(path: Path, *, quiet: bool) -> int | None:
    """Lock `path` (created if missing) and write this process's description into it; returns its fd."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RuntimeFault(f"cannot create the lock file {path}: {err.strerror}; choose a writable --workdir") \
                from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise AablError(_busy_message(path, holder)) from None
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_LOCKS:
                with contextlib.suppress(OSError):
                    path.unlink()  # a file that locks nothing would only mislead
                log(f"note: {path.parent} does not support file locks; nothing stops another aabl run from "
                    "writing there at the same time", quiet=quiet)
                return None
            raise RuntimeFault(f"cannot lock {path}: {err.strerror}; choose another --workdir") from err
        # A holder deletes its file before unlocking it: if we locked a deleted file, try the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read(fd)
    if previous.get("pid"):
        _report_takeover(path, previous, quiet=quiet)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _read(fd: int) -> dict[str, Any]:
    """The holder description in a lock file; {} when empty (its holder has not written it yet) or unreadable."""
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8", errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _busy_message(path: Path, holder: dict[str, Any]) -> str:
    stage = path.name[1:].removesuffix(".lock")
    who = "another process"
    if holder.get("pid"):
        where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
        who = f"PID {holder['pid']}{where} (`{holder.get('command', '?')}`, started {holder.get('started', '?')})"
    return (f"{who} is writing {path.parent / stage} (it holds {path}); wait for it to finish, or write "
            "elsewhere: another --workdir (or --out)")


def _report_takeover(path: Path, previous: dict[str, Any], *, quiet: bool) -> None:
    """Say that a lock file outlived its holder (a killed process leaves it; a finished one deletes it)."""
    pid = previous["pid"]
    if previous.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        log(f"note: a stale lock from PID {pid} (no longer running) was taken over: {path}", quiet=quiet)
    else:
        log(f"note: took over {path}, left by PID {pid} ({previous.get('command', '?')}), which no longer holds it",
            quiet=quiet)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("aabl", "__main__.py"):
        argv[0] = "aabl"
    return shlex.join(argv)
