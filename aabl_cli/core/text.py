"""How text leaves aabl: names from the user's data never reach a terminal raw, and JSON never
holds NaN or Infinity.

A class or file name may hold escape sequences (`\\x1b[2J` clears the screen, `\\x1b]0;...\\x07`
retitles the terminal, `\\r` rewrites the line). Every line aabl prints (results, errors,
warnings, log lines, progress bars) passes through `printable` where it is printed, so no
caller can forget it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# C0 controls, DEL, C1 controls (which some terminals also obey), the Unicode line and paragraph
# separators, and the bidirectional overrides that reorder what a line shows ("Trojan Source").
_OTHERS = "\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE_LINE = re.compile(f"[\x00-\x1f{_OTHERS}]")
_UNSAFE_TEXT = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHERS}]")  # keeps tab and newline


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # '\x1b' -> \x1b, '\r' -> \r, '\u202e' -> \u202e


def printable(text: object, *, multiline: bool = False) -> str:
    """`str(text)` with every control character written as its Python escape (`\\x1b`, `\\r`).

    One line by default: a newline in a name is shown as `\\n`, so it cannot forge an output line.
    `multiline=True` keeps newlines and tabs, for a report aabl composes of several lines (whose
    user-derived parts are made printable one line each where they are composed).
    """
    pattern = _UNSAFE_TEXT if multiline else _UNSAFE_LINE
    return pattern.sub(_escape, str(text))


def finite_json(data: Any) -> Any:
    """`data` with every NaN and infinity replaced by None: JSON has no such numbers (Python writes
    `NaN`, which strict parsers refuse). A value that is undefined, e.g. the recall of a set
    without poison, is written as null."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def json_text(data: Any, **kwargs: Any) -> str:
    """`json.dumps` with non-finite floats as null (see `finite_json`) and every non-ASCII or
    control character escaped (`\\u001b`), so JSON on a terminal is as safe as text."""
    return json.dumps(finite_json(data), allow_nan=False, ensure_ascii=True, **kwargs)


def in_255ths(budget: float) -> int | None:
    """`budget` (pixel units) as a whole number of 255ths, the x/255 the command line takes; None when it is not one."""
    units = budget * 255
    return round(units) if abs(units - round(units)) < 1e-6 else None
