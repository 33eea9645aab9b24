"""Checkpoints: safetensors only (never pickle), with metadata that describes the model.

A model file holds the state dict and string metadata (`aabl_format, arch, num_classes,
image_size, channels, mean, std, classes, stage, eps, epochs, seed,
dataset_fingerprint, aabl_version`), JSON-encoded where not a plain string; `eps` is the
training budget (0: trained plainly; checkpoints of earlier versions call it `adv_eps`).
Loading checks it and refuses a mismatch with a message. Resume state (optimizer, epoch, RNG)
is a second safetensors file beside the model.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from aabl_cli import __version__
from aabl_cli.core.errors import AablError
from aabl_cli.core.models import ARCHS, Classifier, build_model

FORMAT = "aabl-1"
# The largest image size a checkpoint may record (evaluate resizes test images to it).
MAX_CHECKPOINT_PIXELS = 16384 * 16384
REQUIRED = ("aabl_format", "arch", "num_classes", "image_size", "classes")


def save_model(path: Path, model: Classifier, *, arch: str, classes: list[str], image_size: tuple[int, int],
               stage: str, eps: float, epochs: int, seed: int, dataset_fingerprint: str) -> None:
    """Write `model` and its description to `path` (through a temporary file and a rename)."""
    meta = {
        "aabl_format": FORMAT,
        "arch": arch,
        "num_classes": str(len(classes)),
        "image_size": json.dumps(list(image_size)),
        "channels": "3",
        "mean": json.dumps(model.normalize.mean.flatten().tolist()),
        "std": json.dumps(model.normalize.std.flatten().tolist()),
        "classes": json.dumps(classes),
        "stage": stage,
        "eps": repr(float(eps)),
        "epochs": str(epochs),
        "seed": str(seed),
        "dataset_fingerprint": dataset_fingerprint,
        "aabl_version": __version__,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save(path, state, meta)


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except SafetensorError as err:
        fault = _os_error(err, path)
        if fault is None:
            raise
        raise fault from err
    finally:
        tmp.unlink(missing_ok=True)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _os_error(err: SafetensorError, path: Path) -> OSError | None:
    """The OSError inside safetensors' "I/O error: No space left on device (os error 28)", naming `path`,
    so that the command names the fault and its fix (free some space) instead of a SafetensorError."""
    match = _OS_ERROR.search(str(err))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), str(path))


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a checkpoint, after checking it is a safetensors file written by aabl."""
    path = Path(path)
    if not path.is_file():
        raise AablError(f"checkpoint {path} does not exist; pass the model.safetensors that scan or train wrote")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AablError(f"{path} is not a safetensors file (aabl never reads pickle checkpoints); "
                        "pass a model.safetensors written by aabl") from err
    missing = [k for k in REQUIRED if k not in meta]
    if meta.get("aabl_format") != FORMAT or missing:
        raise AablError(f"{path} is not an aabl checkpoint (metadata {missing or 'aabl_format'} missing or "
                        "wrong); pass a model.safetensors written by aabl scan or train")
    return meta


def load_model(path: Path, *, device: torch.device | str = "cpu", arch: str | None = None,
               classes: list[str] | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model in `path`. With `arch` / `classes`, refuse a checkpoint for others.

    Returns the model in eval mode and the decoded metadata.
    """
    raw = read_metadata(path)
    try:
        meta: dict[str, Any] = dict(raw)
        meta["num_classes"] = int(raw["num_classes"])
        meta["image_size"] = [int(v) for v in json.loads(raw["image_size"])]
        meta["classes"] = [str(c) for c in json.loads(raw["classes"])]
        meta["mean"] = [float(v) for v in json.loads(raw.get("mean", "[0.5, 0.5, 0.5]"))]
        meta["std"] = [float(v) for v in json.loads(raw.get("std", "[0.5, 0.5, 0.5]"))]
        meta["eps"] = float(raw.get("eps", raw.get("adv_eps", "0")))  # adv_eps: an earlier version's name
        meta.pop("adv_eps", None)
        if len(meta["classes"]) != meta["num_classes"] or len(meta["image_size"]) != 2:
            raise ValueError("inconsistent class count or image size")
        height, width = meta["image_size"]
        if min(height, width) < 1 or height * width > MAX_CHECKPOINT_PIXELS:  # evaluate resizes test images to it
            raise ValueError(f"image size {height}x{width} px is outside what aabl reads")
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise AablError(f"{path}: checkpoint metadata is malformed ({err}); re-create it with aabl") from err
    if meta["arch"] not in ARCHS:
        raise AablError(f"{path}: unknown architecture {meta['arch']!r} in the checkpoint; "
                        f"known: {', '.join(ARCHS)}")
    if arch is not None and arch != meta["arch"]:
        raise AablError(f"{path} holds a {meta['arch']} model but --arch is {arch}; "
                        f"pass --arch {meta['arch']} or another checkpoint")
    if classes is not None and classes != meta["classes"]:
        raise AablError(f"{path} was trained on classes {meta['classes']} but the data has {classes}; "
                        "use a checkpoint trained on this dataset's classes")
    model = build_model(meta["arch"], num_classes=meta["num_classes"], image_size=meta["image_size"],
                        mean=meta["mean"], std=meta["std"])
    try:
        state = load_file(str(path))
        _check_tensors(model, state)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, ValueError) as err:
        raise AablError(f"{path}: the tensors do not match a {meta['arch']} model with {meta['num_classes']} "
                        f"classes ({str(err).splitlines()[0]}); the file is damaged or was edited") from err
    _check_statistics(path, state)
    model = model.to(device).eval()
    _check_outputs(path, model, meta["image_size"])
    return model, meta


def _check_statistics(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse finite tensors that still make every output NaN: the normalization divides by its std,
    batch norm takes the square root of its running variance."""
    std = state.get("normalize.std")
    if std is not None and not bool((std > 0).all()):
        raise AablError(f"{path}: normalize.std holds {std.flatten().tolist()}, but a standard deviation must be "
                        "positive (every pixel is divided by it); the checkpoint is corrupt or was edited: use "
                        "another one or train again")
    for key, tensor in state.items():
        if key.endswith("running_var") and bool((tensor < 0).any()):
            raise AablError(f"{path}: {key} holds negative variances; the checkpoint is corrupt or was edited: use "
                            "another one or train again")


def _check_outputs(path: Path, model: nn.Module, image_size: list[int]) -> None:
    """One forward pass on two fixed images (mid grey, a ramp) at the model's size: a checkpoint
    whose logits are NaN or infinite would be scored, evaluated and reported as if it worked."""
    height, width = image_size
    device = next(model.parameters()).device
    ramp = torch.linspace(0, 1, 3 * height * width, device=device).view(1, 3, height, width)
    with torch.no_grad():
        logits = model(torch.cat([torch.full_like(ramp, 0.5), ramp]))
    if not bool(torch.isfinite(logits).all()):
        raise AablError(f"{path}: the checkpoint produces non-finite outputs (NaN/inf) on a plain test image; it "
                        "is corrupt or was saved from a diverged run: use another checkpoint or train again")


def _check_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    if set(state) != set(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise ValueError(f"unexpected {extra[:3]} / missing {missing[:3]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)} {tensor.dtype}, "
                             f"expected {tuple(expected[key].shape)} {expected[key].dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{key} holds non-finite values")


class Stateful(Protocol):
    """What a resume state holds besides the optimizer: a model, its moving average, a kept epoch."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any: ...


def save_state(path: Path, *, optimizer: torch.optim.Optimizer, epoch: int, rng: torch.Tensor,
               generator: torch.Tensor, meta: dict[str, str], parts: Mapping[str, Stateful] | None = None) -> None:
    """Resume state: optimizer tensors, the last finished epoch, both RNG states and each of `parts`'
    tensors under its name (`model.` + the model's keys). One file is one atomic commit, so a kill at
    any moment leaves a consistent state."""
    tensors: dict[str, torch.Tensor] = {"rng": rng.clone(), "generator": generator.clone()}
    for name, part in (parts or {}).items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in part.state_dict().items()})
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    info = {"epoch": str(epoch), "param_groups": json.dumps(opt["param_groups"]), **meta}
    _save(path, tensors, info)


def load_state(path: Path, optimizer: torch.optim.Optimizer,
               parts: Mapping[str, Stateful] | None = None) -> tuple[int, torch.Tensor, torch.Tensor, dict[str, str]]:
    """Restore the optimizer and each of `parts` from `path`; returns (epochs done, torch RNG state,
    generator state, metadata)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        for part_name, part in (parts or {}).items():
            prefix = f"{part_name}."
            part.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
        return int(meta["epoch"]), tensors["rng"], tensors["generator"], meta
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise AablError(f"{path}: the resume state is damaged ({err}); delete it and start without --resume") from err


TRIGGER_FORMAT = "aabl-trigger-1"
TRIGGER_KEY = "aabl_trigger"  # one metadata entry: safetensors writes several in no fixed order, and a
# trigger file must come out byte-identical for the same seed


def save_trigger(path: Path, tensors: dict[str, torch.Tensor], *, backdoor: str, settings: dict[str, Any]) -> None:
    """Write a trained trigger's networks (`aabl poison` iab / ssba) with the settings that trained them."""
    meta = {"aabl_format": TRIGGER_FORMAT, "backdoor": backdoor, "settings": settings, "aabl_version": __version__}
    _save(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
          {TRIGGER_KEY: json.dumps(meta, sort_keys=True)})


def load_trigger(path: Path, *, backdoor: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and training settings in a trigger file; refuses anything but a trigger of `backdoor`."""
    path = Path(path)
    fix = (f"pass the trigger.safetensors that `aabl poison --backdoor {backdoor}` wrote beside the poisoned "
           "training set")
    if not path.is_file():
        raise AablError(f"--trigger {path} does not exist; {fix}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(TRIGGER_KEY, "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AablError(f"--trigger {path} is not a readable safetensors trigger file; {fix}") from err
    if not isinstance(meta, dict) or meta.get("aabl_format") != TRIGGER_FORMAT or not isinstance(
            meta.get("settings"), dict):
        raise AablError(f"--trigger {path} is not an aabl trigger file; {fix}")
    written = meta.get("backdoor", meta.get("attack"))  # attack: an earlier version's name
    if written != backdoor:
        raise AablError(f"--trigger {path} holds a {written} trigger, not {backdoor}; {fix}")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AablError(f"--trigger {path}: {key} holds non-finite values; the file is damaged, re-create it")
    return tensors, meta["settings"]
