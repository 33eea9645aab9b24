"""Settings decide freshness: a stage's JSON records the settings that produced its output, and a
stage whose recorded settings match the wanted ones (and whose data has not changed) is done.

Each stage computes its settings in one function (`scan_settings`, `split_settings`,
`train_settings`), records exactly that, and `aabl run` and benchmarks/reproduce.py call the
same function for the settings they want and compare with `stale_reason`.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any


def same(recorded: Any, wanted: Any) -> bool:
    """Whether a recorded setting is the wanted one: floats up to rounding; for a dict, the keys
    `wanted` names (the record may hold more, e.g. the process layout's backend)."""
    if isinstance(wanted, dict):
        return isinstance(recorded, dict) and all(same(recorded.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, float) or isinstance(recorded, float):
        try:
            return math.isclose(float(recorded), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return recorded == wanted


def changed(recorded: dict[str, Any], wanted: dict[str, Any], *, ignore: Collection[str] = ()) -> list[str]:
    """The settings that differ, in order: every recorded one counts (a recorded setting `wanted`
    lacks is changed: this run cannot reproduce it), then every wanted one the record lacks."""
    keys = [k for k in recorded if k not in ignore] + [k for k in wanted if k not in recorded and k not in ignore]
    return [k for k in keys if k not in wanted or not same(recorded.get(k), wanted[k])]


def stale_reason(summary: Path, wanted: dict[str, Any], fingerprint: str | None, *,
                 ignore: Collection[str] = ()) -> str | None:
    """None when the stage JSON `summary` records the `wanted` settings (but `ignore`) and, unless
    None, the dataset `fingerprint`; else why the stage has to run."""
    if not summary.exists():
        return "to run"
    try:
        recorded = json.loads(summary.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"to redo ({summary.name} is unreadable)"
    settings = recorded.get("settings") if isinstance(recorded, dict) else None
    if not isinstance(settings, dict):
        return f"to redo ({summary.name} records no settings)"
    differ = changed(settings, wanted, ignore=ignore)
    if "data" in differ:
        return "to redo (another data folder)"
    if differ:
        return f"to redo (other {', '.join(differ)})"
    if fingerprint is not None and recorded.get("dataset_fingerprint") != fingerprint:
        return "to redo (the data changed)"
    return None


def settings_for(stage: Callable[..., Any], settings_of: Callable[..., dict[str, Any]], options: dict[str, Any],
                 **known: Any) -> dict[str, Any]:
    """What `stage(**options)` will record: its settings function `settings_of` called with `options`,
    the stage's own defaults for the options not given, and `known` (what the data decides, e.g.
    `image_size`)."""
    given = {**_defaults(stage), **options, **known}
    names = inspect.signature(settings_of).parameters
    return settings_of(**{k: v for k, v in given.items() if k in names})


def _defaults(func: Callable[..., Any]) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(func).parameters.items() if p.default is not p.empty}
