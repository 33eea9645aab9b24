"""Shared fixtures and helpers: tiny learnable image folders, a tree hash, a hand-made scan, a model whose
every answer is known, and hooks that stop or count the training loop."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import aabl_cli.core.loop as loop_mod
import aabl_cli.core.resume as resume_mod

# One intra-op thread: on a small, busy CPU two spinning threads make the tiny models here
# 10-30x slower, and a fixed thread count keeps the bit-for-bit checks meaningful.
torch.set_num_threads(1)

# A distinct colour and stripe direction per class, so a small CNN learns them in an epoch or two.
_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 220)]


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 image of class `label`: its colour, its stripes, plus noise."""
    img = np.zeros((size, size, 3), dtype=np.float64)
    img[:] = _COLOURS[label % len(_COLOURS)]
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((yy if label % 2 == 0 else xx) // 2 + label) % 2 == 0
    img[stripes] *= 0.5
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 16, seed: int = 0) -> Path:
    """Write a learnable ImageFolder `root/class_k/img_###.png` and return `root`."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, size, rng)).save(folder / f"img_{i:03d}.png")
    return root


def untrained_cnn(classes: int = 4) -> nn.Module:
    """A seeded, untrained conv net on 8x8 images, in eval mode: what the attack tests attack."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, classes)).eval()


@pytest.fixture
def attack_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """16 seeded 8x8 images, four all black and four all white (the clamp to [0, 1] must bite), and 4-class labels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    x[:4] = 0.0
    x[4:8] = 1.0
    return x, torch.randint(0, 4, (16,), generator=gen)


def tree_hash(path: Path) -> str:
    """sha256 over the relative paths and bytes of every file below `path`, following symlinks."""
    path = Path(path)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(path).as_posix()
        digest.update(f"D {rel_dir}\n".encode())
        for name in sorted(filenames):
            full = Path(dirpath) / name
            digest.update(f"F {rel_dir}/{name}\n".encode())
            digest.update(full.read_bytes())
    return digest.hexdigest()


def write_fake_scan(workdir: Path, data: Path, scores: list[float] | np.ndarray) -> Path:
    """Write `workdir/scan/{scores.csv, scan.json}` for `data` with the given scores, as `aabl scan`
    would, without training anything. Returns the scores.csv path."""
    from aabl_cli.core.data import dataset_fingerprint, list_image_folder

    listing = list_image_folder(data)
    paths = [rel for rel, _ in listing.files]
    assert len(scores) == len(paths)
    scan_dir = Path(workdir) / "scan"
    scan_dir.mkdir(parents=True, exist_ok=True)
    with open(scan_dir / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "path", "label", "class", "score", "ce_adv", "loss_clean", "pred_clean",
                         "pred_adv"])
        for i, ((rel, label), score) in enumerate(zip(listing.files, scores)):
            writer.writerow([i, rel, label, listing.classes[label], f"{float(score):.9g}", 0.0, 0.0, label, label])
    scan = {"stage": "scan", "data": str(Path(data).resolve()),
            "dataset_fingerprint": dataset_fingerprint(Path(data), paths), "classes": listing.classes,
            "samples": len(paths), "skipped": []}
    (scan_dir / "scan.json").write_text(json.dumps(scan))
    return scan_dir / "scores.csv"


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """3 classes x 12 learnable 16x16 PNGs in tmp_path/data."""
    return make_folder(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Belt and braces: a test that forgets --cache-dir still never writes to ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def invoke(*args: object):
    """The `aabl` command line, in-process, on arguments of any type (paths, numbers)."""
    from click.testing import CliRunner

    from aabl_cli.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """A CSV file's header and rows."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def read_rows(out: Path) -> list[dict[str, str]]:
    """The rows of a poisoned folder's `poison.csv`."""
    with open(out / "poison.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def pixels(path: Path) -> np.ndarray:
    """An image's RGB pixels as int16 (differences do not wrap)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


# The real CLI with every file copy slowed down, so that a signal reliably lands while outputs are
# being written (a tiny folder is otherwise copied in milliseconds).
SLOW_COPIES = """
import shutil, sys, time
real = shutil.copyfile
def slow(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)
shutil.copyfile = slow
from aabl_cli.cli import cli
cli(sys.argv[1:], prog_name="aabl")
"""


# ---------------------------------------------------------------- a model whose every answer is known


class Threshold(nn.Module):
    """Class 1 iff the first pixel's red value is above T; `linear` gives PGD a gradient to follow,
    otherwise the model is a step with zero gradient and only PGD's random start can fool it."""

    T = 127.5 / 255

    def __init__(self, linear: bool) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0, 0, 0]
        margin = 50 * (p - self.T) if self.linear else (p > self.T).float() * 2 - 1 + 0 * p
        return torch.stack([torch.zeros_like(margin), margin], dim=1)


def grey(values: list[int], side: int = 2) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, side, side).contiguous()


# ---------------------------------------------------------------- stopping and counting the training loop


def count_epochs(monkeypatch) -> list[int]:
    """Record every training epoch the loop runs from now on."""
    calls: list[int] = []
    real = loop_mod._train_epoch

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "_train_epoch", counting)
    return calls


@contextlib.contextmanager
def interrupted_after_first_epoch(monkeypatch):
    """Ctrl-C right after epoch 1's model, state and history are saved; the patch is undone on exit."""
    real = resume_mod.write_history

    def interrupt(path, rows):
        real(path, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume_mod, "write_history", interrupt)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(resume_mod, "write_history", real)
