"""The memory budget for the decoded set, and the data path it picks: resident or streamed.

A stage holds its decoded images whole (resident: on the GPU, or mapped into host memory on
the CPU) when they fit the budget, and streams them from the decode cache batch by batch
(`core.stream`) when they do not. `--data-memory SIZE` sets the budget; `auto` takes half of
what is free: of the GPU's memory on CUDA, and of the host's available memory (shared by the
processes torchrun started on this machine). The path changes no result, only where the bytes
wait, so it is recorded beside a stage's `settings` (`data_path`), never in them.

No torch at import: the command line parses SIZE without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from aabl_cli.core.errors import AablError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
HEADROOM = 0.5  # share of the free memory `auto` spends on the data: the rest is the model's and the activations'
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?")
SIZE_HELP = "a size such as 512M, 20G or 1.5G (binary units: 1M = 1024^2 bytes; a bare number is bytes), or auto"


def parse_size(text: str) -> int:
    """Bytes of a size written `512M`, `20G`, `1.5GiB` or `65536` (binary units). ValueError otherwise."""
    match = _SIZE.fullmatch(text.strip().upper())
    if match is None:
        raise ValueError(f"{text!r} is not a size; give {SIZE_HELP}")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def budget_bytes(data_memory: int | str) -> int | None:
    """A `--data-memory` value as bytes, None for auto; AablError (exit 2) for a bad one."""
    if isinstance(data_memory, int):
        if data_memory < 0:
            raise AablError(f"--data-memory {data_memory} is negative; give {SIZE_HELP}")
        return data_memory
    if data_memory.strip().lower() == AUTO:
        return None
    try:
        return parse_size(data_memory)
    except ValueError as err:
        raise AablError(f"--data-memory: {err}") from None


def human(nbytes: float) -> str:
    """1536 -> '1.5 KiB'; 400 * 2**20 -> '400 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" or nbytes >= 100 else f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def host_available() -> int | None:
    """The host's MemAvailable (/proc/meminfo) in bytes; None where there is no /proc (macOS)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_free(device: torch.device) -> int | None:
    """Free memory of a CUDA device in bytes; None for any other device."""
    if device.type != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def local_processes() -> int:
    """Processes torchrun started on this machine (they share its memory); 1 outside torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def auto_budget(device: torch.device) -> tuple[int | None, str]:
    """`auto`'s budget in bytes and how it was reached; None when nothing can be measured."""
    parts: list[tuple[int, str]] = []
    host = host_available()
    if host is not None:
        share = int(host * HEADROOM) // local_processes()
        per = f" / {local_processes()} processes" if local_processes() > 1 else ""
        parts.append((share, f"half of the host's {human(host)} available{per}"))
    gpu = device_free(device)
    if gpu is not None:
        parts.append((int(gpu * HEADROOM), f"half of {device}'s {human(gpu)} free"))
    if not parts:
        return None, "auto, with no memory figure on this system"
    return min(parts)


@dataclass(frozen=True)
class DataPath:
    """Which data path a stage runs and why; `as_record()` is what its JSON keeps as `data_path`."""

    mode: str  # "resident" or "streamed"
    reason: str
    budget_bytes: int | None
    decoded_bytes: int

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def choose_data_path(decoded_bytes: int, *, data_memory: int | str, device: torch.device) -> DataPath:
    """Resident when `decoded_bytes` (what this process would hold) fit the budget, else streamed."""
    budget = budget_bytes(data_memory)
    how = "--data-memory"
    if budget is None:
        budget, how = auto_budget(device)
        if budget is None:
            return DataPath("resident", how, None, decoded_bytes)
        how = f"auto: {how}"
    fits = decoded_bytes <= budget
    sign = "<=" if fits else ">"
    reason = f"decoded {human(decoded_bytes)} {sign} budget {human(budget)} ({how})"
    return DataPath("resident" if fits else "streamed", reason, budget, decoded_bytes)
