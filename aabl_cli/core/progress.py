"""Progress display: a tqdm bar on a terminal, one log line per epoch elsewhere (CI logs)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

from aabl_cli.core.text import printable

T = TypeVar("T")


def is_tty() -> bool:
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             quiet: bool = False, leave: bool = False) -> Iterator[T]:
    """Wrap a loop in a progress bar, shown only on a terminal and never when `quiet`."""
    return iter(tqdm(iterable, total=total, desc=printable(desc), unit=unit, leave=leave,
                     disable=quiet or not is_tty(), dynamic_ncols=True, mininterval=0.5))


def log(message: str, *, quiet: bool = False) -> None:
    """One status line on stderr (stdout is kept for results and --json), its control characters
    escaped: it may quote a file or class name."""
    if not quiet:
        tqdm.write(printable(message), file=sys.stderr)
