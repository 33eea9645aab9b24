"""Device choice, seeding and mixed precision in one place.

Precision is a stage-wide setting: a stage enters `use_precision(name)` for its duration, and
`autocast`, `channels_last` (thus `prepare_model` and `pixels.batch_to_float`) read it, so
the training loop, the attacks and the evaluation passes take it without an argument each.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import platform
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from aabl_cli.core.errors import AablError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise AablError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AablError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AablError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); pick another index")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AablError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise AablError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches; with the same thread count a CPU run repeats bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


PRECISIONS = ("auto", "bf16", "fp32")
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("aabl_precision", default="auto")


@contextlib.contextmanager
def use_precision(name: str) -> Iterator[None]:
    """Run the block's forward passes in `name` (one of PRECISIONS): auto is bf16 autocast on
    CUDA and float32 elsewhere; bf16 is bf16 autocast on CUDA and on the CPU; fp32 never autocasts."""
    if name not in PRECISIONS:
        raise AablError(f"unknown --precision {name!r}; use one of {', '.join(PRECISIONS)}")
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def uses_bf16(device: torch.device) -> bool:
    """Whether forward passes on `device` autocast to bf16 under the current `use_precision`."""
    name = _PRECISION.get()
    if name == "bf16" and device.type not in ("cuda", "cpu"):
        raise AablError(f"--precision bf16 runs on CUDA or the CPU, not on {device.type}; use --precision auto "
                        "or fp32 there")
    return device.type == "cuda" if name == "auto" else name == "bf16"


def channels_last(device: torch.device) -> bool:
    """Models and batches in channels_last: always on CUDA, and on the CPU under bf16 (oneDNN's fast layout)."""
    return device.type == "cuda" or (device.type == "cpu" and uses_bf16(device))


def autocast(device: torch.device, *, cache_enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast where `uses_bf16` (float32 master weights); plain float32 elsewhere."""
    if uses_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


# /proc/cpuinfo flags of a CPU that computes bf16 itself: AMX or AVX512-BF16 (x86-64), BF16 (Arm)
NATIVE_BF16_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bf16 natively; None where the system does not say (no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}
    return bool(flags & NATIVE_BF16_FLAGS)


def warn_if_emulated_bf16(device: torch.device) -> None:
    """Warn when bf16 runs on a CPU that has no bf16 instructions: it is emulated there, many times
    slower than float32 (measured 10-35x for --arch cnn on an AVX2-only CPU)."""
    if device.type == "cpu" and uses_bf16(device) and cpu_has_native_bf16() is False:
        warnings.warn(f"--precision bf16 on this CPU ({platform.machine()}, no AMX or AVX512-BF16) is emulated and "
                      "many times slower than float32 (10-35x measured for --arch cnn); use --precision auto or fp32",
                      stacklevel=2)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; channels_last where `channels_last` says; cuDNN autotuning on CUDA. Warns
    where bf16 would run emulated (`warn_if_emulated_bf16`)."""
    warn_if_emulated_bf16(device)
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model
