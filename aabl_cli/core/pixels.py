"""Pixels between their stored form (uint8) and the float form models and triggers take.

Two layouts meet here: the dataset tensor is uint8 (N, C, H, W) and is converted per batch
on its way to the device (`batch_to_float`); images decoded with PIL are numpy uint8
(N, H, W, C), which the backdoor triggers take as float (N, C, H, W) (`hwc_to_float`) and
give back (`float_to_hwc`).
"""

from __future__ import annotations

import numpy as np
import torch

from aabl_cli.core.device import channels_last


def batch_to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1] on `device` (converted per batch, never the whole set).
    A host batch bound for a GPU goes through pinned memory, so the copy runs asynchronously."""
    if device.type == "cuda" and batch.device.type == "cpu":
        batch = batch.pin_memory()
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last(device) else x


def hwc_to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> float (N, 3, H, W) in [0, 1], on the CPU."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def float_to_hwc(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), rounded to the nearest level."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
