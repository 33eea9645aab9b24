"""What the benchmark scripts share: running the real CLI, naming the machine it ran on, printing a table."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def aabl(*args: object, threads: int | None = None) -> str:
    """Run `python -m aabl_cli ARGS` (with `threads` torch threads when given); its stdout, or
    exit with its stderr's tail."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "aabl_cli", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def device_name(device: str) -> str:
    """The GPU's name when `device` may use one and one is there, else the CPU's architecture and cores."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def publish(lines: list[str], md: Path | None) -> None:
    """Print a Markdown table (its lines) and, with `md`, append it to that file."""
    table = "\n".join(lines) + "\n"
    print(table)
    if md:
        with open(md, "a") as fh:
            fh.write("\n" + table)
