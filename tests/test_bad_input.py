"""Bad input through the real CLI: one table, one row per input a user (or an attacker) might hand us.

Every row runs `aabl ...` (click's CliRunner in-process, or a subprocess where a hang is
possible) and checks the same contract (SPEC "Bad input", "Nothing is lost"):

* the exit code: 2 for bad input, 1 for an environment fault (read-only or full disk),
  0 for input that must be accepted (odd image modes and sizes, links, hidden files);
* one output line that names the problem *and* the fix (both substrings on that line);
* no traceback;
* the input tree byte-identical afterwards (names, bytes, link targets, mtimes), and on
  failure no output folder, whole or half, in the work directory.

`CASES` is the single source of truth: its length is the number of inputs tried.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_folder, write_fake_scan
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aabl_cli.cli import cli
from aabl_cli.core.checkpoint import save_model
from aabl_cli.core.data import list_image_folder
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import safe_relative, write_image_folder
from aabl_cli.core.models import build_model

SKIP_HINT = "--on-bad-file skip"


@dataclass
class Env:
    """Where a case puts things. Everything a command reads lives below `inp` (snapshotted)."""

    inp: Path
    work: Path
    cache: Path
    tmp: Path


Build = Callable[[Env], list[str]]
Patch = Callable[[Env, pytest.MonkeyPatch], None]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build  # writes the inputs below env.inp, returns the aabl arguments
    code: int  # expected exit code
    expect: tuple[str, ...]  # substrings that must all appear on one output line (problem and fix)
    patch: Patch | None = None  # simulates an environment fault inside the in-process run
    subprocess: bool = False  # run `python -m aabl_cli` with a timeout (a case that could hang)
    absent: tuple[str, ...] = ()  # substrings the output must not hold (e.g. an option the command lacks)
    alternatives: tuple[tuple[str, ...], ...] = ()  # other acceptable lines, when an earlier check may refuse first
    check: Callable[[Env], None] | None = None  # on success: what the outputs must hold


# ---------------------------------------------------------------- helpers that build inputs


def data(env: Env, classes: int = 2, per_class: int = 3) -> Path:
    return make_folder(env.inp / "data", classes=classes, per_class=per_class)


def scan_args(env: Env, folder: Path, *extra: object) -> list[str]:
    return [str(a) for a in ("scan", folder, "--arch", "cnn", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                             "--quiet", "--workdir", env.work, "--cache-dir", env.cache, *extra)]


def train_args(env: Env, folder: Path, *extra: object) -> list[str]:
    return [str(a) for a in ("train", folder, "--arch", "cnn", "--epochs", "1", "--eps", "0", "--batch-size", "8",
                             "--device", "cpu", "--quiet", "--workdir", env.work, "--cache-dir", env.cache, *extra)]


def split_args(env: Env, scores: Path, *extra: object) -> list[str]:
    return [str(a) for a in ("split", scores, "--workdir", env.work, "--method", "quantile", "--fraction", "0.25",
                             *extra)]


def evaluate_args(env: Env, model: Path, folder: Path, *extra: object) -> list[str]:
    return [str(a) for a in ("evaluate", model, folder, "--eps", "0", "--device", "cpu", "--quiet", "--cache-dir",
                             env.cache, *extra)]


def poison_args(env: Env, src: Path, *extra: object) -> list[str]:
    return [str(a) for a in ("poison", src, "--backdoor", "badnets", "--out", env.work / "poisoned", "--quiet", *extra)]


def rgb(path: Path, size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def bomb_png(path: Path, side: int = 40_000) -> None:
    """A valid PNG header claiming `side` x `side` px (1.6 G pixels) with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def with_bad_file(name: str, write: Callable[[Path], None]) -> Build:
    """A 2 x 3 folder plus one bad file in class_1."""
    def build(env: Env) -> list[str]:
        root = data(env)
        write(root / "class_1" / name)
        return scan_args(env, root)
    return build


def _truncated(fmt: str) -> Callable[[Path], None]:
    """The first half of a valid 16 x 16 image file (an interrupted download)."""
    def write(path: Path) -> None:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, fmt)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return write


def mixed_modes(env: Env) -> list[str]:
    """Every mode PIL hands out for the accepted formats, at several sizes: all become RGB at 16 x 16."""
    root = env.inp / "data"
    a, b = root / "class_a", root / "class_b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    Image.new("L", (16, 16), 100).save(a / "gray.png")
    Image.new("LA", (16, 16), (100, 128)).save(a / "gray_alpha.png")
    Image.new("RGBA", (20, 12), (200, 10, 20, 255)).save(a / "rgba_wide.png")
    Image.new("1", (16, 16), 1).save(a / "bilevel.png")
    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).save(a / "sixteen_bit.png")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(b / "palette.png")
    palette.info["transparency"] = 0
    palette.save(b / "palette_transparent.png")
    Image.new("CMYK", (32, 32), (0, 128, 255, 0)).save(b / "cmyk.jpg")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(b / "plain.bmp")
    Image.new("RGB", (16, 16), (4, 5, 6)).save(b / "plain.ppm")
    Image.new("RGB", (64, 48), (7, 8, 9)).save(b / "plain.webp")
    rgb(b / "UPPER.PNG")
    assert Image.open(a / "sixteen_bit.png").mode == "I;16" and Image.open(b / "cmyk.jpg").mode == "CMYK"
    return scan_args(env, root)


def tiny_image(env: Env) -> list[str]:
    root = data(env)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "class_0" / "one_pixel.png")
    return scan_args(env, root)


def all_tiny_images(env: Env) -> list[str]:
    root = env.inp / "data"
    for c in range(2):
        for i in range(3):
            (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (1, 1), (80 * c, 40 * i, 0)).save(root / f"class_{c}" / f"{i}.png")
    return scan_args(env, root)


def large_image(env: Env) -> list[str]:
    root = data(env)
    Image.new("RGB", (4000, 4000), (0, 0, 255)).save(root / "class_1" / "huge.png")
    return scan_args(env, root)


def non_utf8_file(env: Env) -> list[str]:
    root = data(env)
    rgb(Path(os.fsdecode(os.fsencode(root / "class_0") + b"/caf\xe9.png")))
    return scan_args(env, root)


def non_utf8_class(env: Env) -> list[str]:
    root = data(env)
    rgb(Path(os.fsdecode(os.fsencode(root) + b"/cl\xe4ss/img.png")))
    return scan_args(env, root)


LONG_NAME = "n" * 251 + ".png"  # 255 bytes, the most ext4 and most file systems allow


def long_name(env: Env) -> list[str]:
    root = data(env)
    rgb(root / "class_1" / LONG_NAME)
    return scan_args(env, root)


def long_name_poison(env: Env) -> list[str]:
    root = data(env)
    rgb(root / "class_1" / LONG_NAME)
    return poison_args(env, root, "--test")


def long_name_split(env: Env) -> list[str]:
    root = data(env)
    rgb(root / "class_1" / LONG_NAME)
    return split_args(env, write_fake_scan(env.inp / "prev", root, np.linspace(0, 1, 7)), "--method", "otsu")


def hidden_entries(env: Env) -> list[str]:
    root = data(env)
    (root / ".DS_Store").write_text("finder")
    (root / "class_0" / "._img_000.png").write_bytes(b"\0\5\26\7AppleDouble")
    (root / "class_1" / ".thumbs").mkdir()
    (root / "class_1" / ".thumbs" / "t.png").write_text("not an image")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".hidden_class").mkdir()
    rgb(root / ".hidden_class" / "x.png")
    return scan_args(env, root)


def nested(env: Env) -> list[str]:
    root = data(env)
    rgb(root / "class_0" / "2023" / "may" / "deep.png")
    rgb(root / "class_1" / "sub" / "a.jpg")
    return scan_args(env, root)


def symlinks(env: Env) -> list[str]:
    root = data(env)
    outside = make_folder(env.inp / "elsewhere", classes=2, per_class=2, seed=5)
    os.symlink(outside / "class_0" / "img_000.png", root / "class_0" / "file_link.png")  # file, outside the root
    os.symlink(outside / "class_1", root / "class_1" / "folder_link")  # folder, outside the root
    os.symlink("../class_0/img_001.png", root / "class_1" / "relative_link.png")  # inside the root
    os.symlink(outside / "class_0", root / "class_2")  # a whole class folder
    return scan_args(env, root)


def symlinks_split(env: Env) -> list[str]:
    """split --link copy reads through links: kept/ and isolated/ get the bytes, never a link into the source."""
    root = data(env)
    outside = make_folder(env.inp / "elsewhere", classes=1, per_class=2, seed=5)
    os.symlink(outside / "class_0", root / "class_1" / "linked")
    return split_args(env, write_fake_scan(env.inp / "prev", root, np.linspace(0, 1, 8)))


def dir_loop(env: Env) -> list[str]:
    root = data(env)
    os.symlink(root / "class_0", root / "class_0" / "again")
    return scan_args(env, root)


def loop_to_root(env: Env) -> list[str]:
    root = data(env)
    os.symlink("..", root / "class_1" / "up")
    return scan_args(env, root)


def mutual_loop(env: Env) -> list[str]:
    root = data(env)
    os.symlink("b", root / "class_0" / "a")
    os.symlink("a", root / "class_0" / "b")
    return scan_args(env, root)


def self_loop_file(env: Env) -> list[str]:
    root = data(env)
    os.symlink("me.png", root / "class_0" / "me.png")
    return scan_args(env, root)


def dangling(env: Env) -> list[str]:
    root = data(env)
    os.symlink(env.inp / "gone.png", root / "class_0" / "gone.png")
    return scan_args(env, root)


def fifo(env: Env) -> list[str]:
    root = data(env)
    os.mkfifo(root / "class_0" / "pipe.png")
    return scan_args(env, root)


def empty_root(env: Env) -> list[str]:
    (env.inp / "data").mkdir(parents=True)
    return scan_args(env, env.inp / "data")


def empty_classes(env: Env) -> list[str]:
    for name in ("cats", "dogs"):
        (env.inp / "data" / name).mkdir(parents=True)
    return scan_args(env, env.inp / "data")


def one_class(env: Env) -> list[str]:
    return scan_args(env, data(env, classes=1, per_class=4))


def one_class_train(env: Env) -> list[str]:
    return train_args(env, data(env, classes=1, per_class=4))


def single_image_class(env: Env) -> list[str]:
    root = data(env, classes=1, per_class=4)
    rgb(root / "class_z" / "only.png", seed=3)
    return scan_args(env, root)


def single_image_classes_train(env: Env) -> list[str]:
    root = data(env, classes=2, per_class=1)
    return train_args(env, root)


def data_is_a_file(env: Env) -> list[str]:
    return scan_args(env, rgb(env.inp / "picture.png"))


def workdir_is_data(env: Env) -> list[str]:
    root = data(env)
    return scan_args(env, root)[:-4] + ["--workdir", str(root), "--cache-dir", str(env.cache)]


def workdir_collides_with_a_class(env: Env) -> list[str]:
    """The data has a class named `train`: writing WORKDIR/train would replace (delete) it."""
    root = data(env)
    rgb(root / "train" / "x.png")
    return train_args(env, root)[:-4] + ["--workdir", str(root), "--cache-dir", str(env.cache)]


def data_inside_output(env: Env) -> list[str]:
    """DATA lives inside WORKDIR/scan: promoting the new scan/ would delete the data."""
    work = env.inp / "w"
    root = make_folder(work / "scan" / "data", classes=2, per_class=3)
    return scan_args(env, root)[:-4] + ["--workdir", str(work), "--cache-dir", str(env.cache)]


def cache_inside_data(env: Env) -> list[str]:
    root = data(env)
    return scan_args(env, root)[:-2] + ["--cache-dir", str(root)]


def evaluate_out_inside_test(env: Env) -> list[str]:
    root = data(env)
    return evaluate_args(env, checkpoint(env, root), root, "--out", root / "class_0" / "img_000.png")


def poison_out_inside_src(env: Env) -> list[str]:
    root = data(env)
    return [str(a) for a in ("poison", root, "--backdoor", "badnets", "--out", root / "class_0" / "p", "--quiet")]


def poison_bad_image(env: Env) -> list[str]:
    root = data(env)
    (root / "class_1" / "broken.png").write_text("not a picture")
    return poison_args(env, root, "--test")


def poison_non_utf8(env: Env) -> list[str]:
    root = data(env)
    rgb(Path(os.fsdecode(os.fsencode(root / "class_1") + b"/na\xefve.png")))
    return poison_args(env, root, "--test")


def option(*args: str) -> Build:
    def build(env: Env) -> list[str]:
        return scan_args(env, data(env), *args)
    return build


def train_option(*args: str) -> Build:
    def build(env: Env) -> list[str]:
        return train_args(env, data(env), *args)
    return build


# ---------------------------------------------------------------- scores.csv


def scores(edit: Callable[[list[list[str]]], list[list[str]]] | None = None, *, text: str | None = None) -> Build:
    """A hand-made scan of a 2 x 4 folder, scores.csv edited row-wise (header first) or replaced by `text`."""
    def build(env: Env) -> list[str]:
        root = data(env, classes=2, per_class=4)
        path = write_fake_scan(env.inp / "prev", root, np.linspace(0.1, 2.0, 8))
        if text is not None:
            path.write_text(text)
        elif edit is not None:
            rows = [line.split(",") for line in path.read_text().splitlines()]
            path.write_text("\n".join(",".join(r) for r in edit(rows)) + "\n")
        return split_args(env, path)
    return build


def set_score(row: int, value: str) -> Callable[[list[list[str]]], list[list[str]]]:
    def edit(rows: list[list[str]]) -> list[list[str]]:
        rows[1 + row][4] = value
        return rows
    return edit


def renumber(rows: list[list[str]]) -> list[list[str]]:
    for i, r in enumerate(rows[1:]):
        r[0] = str(i)
    return rows


def scores_from_another_dataset(env: Env) -> list[str]:
    """scores.csv of dataset B beside the scan.json of dataset A (same size, other files)."""
    a = make_folder(env.inp / "a", classes=2, per_class=4)
    b = make_folder(env.inp / "b", classes=2, per_class=4, seed=7)
    for p in sorted(b.rglob("*.png")):
        p.rename(p.with_name("b_" + p.name))
    path = write_fake_scan(env.inp / "prev_a", a, np.linspace(0.1, 2.0, 8))
    other = write_fake_scan(env.inp / "prev_b", b, np.linspace(0.1, 2.0, 8))
    shutil.copyfile(other, path)
    return split_args(env, path)


def no_scan_json(env: Env) -> list[str]:
    args = scores()(env)
    (env.inp / "prev" / "scan" / "scan.json").unlink()
    return args


def dataset_changed(env: Env) -> list[str]:
    root = data(env, classes=2, per_class=4)
    path = write_fake_scan(env.inp / "prev", root, np.linspace(0.1, 2.0, 8))
    rgb(root / "class_0" / "img_001.png", seed=99)  # replaced after the scan
    return split_args(env, path)


def device_path(env: Env) -> list[str]:
    """A row naming /dev/zero (through its class folder): reading it for the fingerprint would never end."""
    zero = "class_0/" + "../" * 64 + "dev/zero"
    return scores(lambda rows: [*rows[:3], [rows[3][0], zero, *rows[3][2:]], *rows[4:]])(env)


def short_ground_truth_row(env: Env) -> list[str]:
    """A poison.csv beside the classes with a row that lacks its `poisoned` field: ground truth is
    optional, so a malformed one is ignored, never fatal."""
    root = data(env)
    (root / "poison.csv").write_text("path,poisoned\nclass_0/img_000.png\nclass_1/img_000.png,1\n")
    return scan_args(env, root)


def escaping_paths(rel: str) -> Build:
    """A crafted scan whose rows name `rel` (leaving the dataset) with a matching fingerprint: the
    writer of kept/ and isolated/ must refuse it rather than write outside its output folder."""
    def build(env: Env) -> list[str]:
        from aabl_cli.core.data import dataset_fingerprint

        root = data(env, classes=2, per_class=2)
        rgb(env.inp / "outside.png", seed=4)
        listing = list_image_folder(root)
        paths = [p for p, _ in listing.files]
        paths[1] = rel if rel != "ABS" else str(env.inp / "outside.png")
        path = write_fake_scan(env.inp / "prev", root, np.linspace(0.1, 2.0, 4))
        rows = [line.split(",") for line in path.read_text().splitlines()]
        rows[2][1] = paths[1]
        path.write_text("\n".join(",".join(r) for r in rows) + "\n")
        scan = json.loads(path.with_name("scan.json").read_text())
        scan["dataset_fingerprint"] = dataset_fingerprint(root, paths)
        path.with_name("scan.json").write_text(json.dumps(scan))
        return split_args(env, path, "--method", "fixed", "--threshold", "100")
    return build


# ---------------------------------------------------------------- checkpoints


def checkpoint(env: Env, root: Path, **overrides: object) -> Path:
    """A freshly initialised cnn checkpoint for the classes of `root` (no training needed to test loading)."""
    classes = list_image_folder(root).classes
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=len(classes), image_size=16)
    path = env.inp / "model.safetensors"
    kwargs: dict = dict(arch="cnn", classes=classes, image_size=(16, 16), stage="scan", eps=0.0, epochs=0,
                        seed=0, dataset_fingerprint="0" * 64)
    kwargs.update(overrides)
    save_model(path, model, **kwargs)
    return path


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in `path`, copied out of the file's memory map so the file can be overwritten."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def tamper(path: Path, *, meta: dict[str, str | None] | None = None,
           tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> None:
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata())
    state = tensors_of(path)
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    if tensors is not None:
        tensors(state)
    save_file(state, str(path), metadata=metadata)


def _shape(state: dict[str, torch.Tensor]) -> None:
    state["net.head.1.weight"] = torch.zeros(5, state["net.head.1.weight"].shape[1])


def _nan(state: dict[str, torch.Tensor]) -> None:
    state["net.head.1.bias"] = torch.full_like(state["net.head.1.bias"], float("nan"))


def _extra(state: dict[str, torch.Tensor]) -> None:
    state["net.trojan"] = torch.ones(3)


OTHER_CLASSES = {"scan": ("trained on classes", "use a checkpoint trained on this dataset's classes"),
                 "evaluate": ("that the model does not know", "use a folder with the training class names")}

CHECKPOINTS: dict[str, tuple[Callable[[Path, Path], None], int, tuple[str, ...] | dict[str, tuple[str, ...]]]] = {
    # name: (damage(path, data root), exit code, expected line, or one per command)
    "valid": (lambda p, root: None, 0, {"scan": ("scanned 6 images",), "evaluate": ('"acc":',)}),
    "other_classes": (lambda p, root: tamper(p, meta={"classes": json.dumps(["x", "y"])}), 2, OTHER_CLASSES),
    "other_class_count": (lambda p, root: save_model(p, build_model("cnn", num_classes=3, image_size=16),
                                                     arch="cnn", classes=["a", "b", "c"], image_size=(16, 16),
                                                     stage="train", eps=0.0, epochs=1, seed=0,
                                                     dataset_fingerprint="0" * 64), 2, OTHER_CLASSES),
    "class_count_disagrees_with_tensors": (
        lambda p, root: tamper(p, meta={"num_classes": "3", "classes": '["class_0", "class_1", "class_2"]'}), 2,
        {"scan": OTHER_CLASSES["scan"], "evaluate": ("tensors do not match", "damaged or was edited")}),
    "no_aabl_metadata": (lambda p, root: save_file(tensors_of(p), str(p)), 2,
                         ("not an aabl checkpoint", "pass a model.safetensors written by aabl")),
    "missing_arch": (lambda p, root: tamper(p, meta={"arch": None}), 2, ("not an aabl checkpoint", "pass a")),
    "unknown_arch": (lambda p, root: tamper(p, meta={"arch": "vit_h14"}), 2, ("unknown architecture", "known:")),
    "other_arch": (lambda p, root: tamper(p, meta={"arch": "resnet18"}), 2, ("tensors do not match", "damaged")),
    "classes_not_json": (lambda p, root: tamper(p, meta={"classes": "class_0,class_1"}), 2,
                         ("metadata is malformed", "re-create it with aabl")),
    "image_size_malformed": (lambda p, root: tamper(p, meta={"image_size": "[16]"}), 2,
                             ("metadata is malformed", "re-create it")),
    "image_size_negative": (lambda p, root: tamper(p, meta={"image_size": "[-16, 16]"}), 2,
                            ("metadata is malformed", "re-create it")),
    "image_size_huge": (lambda p, root: tamper(p, meta={"image_size": "[100000, 100000]"}), 2,
                        ("metadata is malformed", "re-create it")),
    "tensor_shape": (lambda p, root: tamper(p, tensors=_shape), 2, ("tensors do not match", "damaged or was edited")),
    "tensor_nan": (lambda p, root: tamper(p, tensors=_nan), 2, ("non-finite", "damaged or was edited")),
    "tensor_extra": (lambda p, root: tamper(p, tensors=_extra), 2, ("tensors do not match", "damaged or was edited")),
    "truncated": (lambda p, root: p.write_bytes(p.read_bytes()[:5000]), 2,
                  ("not a safetensors file", "pass a model.safetensors")),
    "pickle_renamed": (lambda p, root: torch.save(tensors_of(p), p), 2,
                       ("not a safetensors file", "never reads pickle")),
    "empty_file": (lambda p, root: p.write_bytes(b""), 2, ("not a safetensors file", "pass a model.safetensors")),
    "missing": (lambda p, root: p.unlink(), 2, ("does not exist", "pass the model.safetensors")),
}


def checkpoint_case(name: str, command: str) -> Case:
    damage, code, expected = CHECKPOINTS[name]
    expect = expected[command] if isinstance(expected, dict) else expected

    def build(env: Env) -> list[str]:
        root = data(env)
        path = checkpoint(env, root)
        damage(path, root)
        if command == "scan":
            return scan_args(env, root, "--model", path)
        return evaluate_args(env, path, root)

    return Case(f"checkpoint-{name.replace('_', '-')}-{command}", build, code, expect)


# ---------------------------------------------------------------- environment faults


def read_only(env: Env, mp: pytest.MonkeyPatch) -> None:
    """A read-only work directory: chmod 555, and as root (who ignores modes) refuse mkdir below it too."""
    env.work.mkdir(parents=True, exist_ok=True)
    env.work.chmod(0o555)
    if os.geteuid() != 0:
        return
    real = os.mkdir
    guarded = str(env.work)

    def mkdir(path: object, mode: int = 0o777, *args: object, **kwargs: object) -> None:
        text = os.fsdecode(path)
        if text.startswith(guarded + os.sep):
            if os.path.exists(text):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), text)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), text)
        real(path, mode, *args, **kwargs)

    mp.setattr(os, "mkdir", mkdir)


def unreadable_class(env: Env, mp: pytest.MonkeyPatch) -> None:
    folder = env.inp / "data" / "class_1"
    real = os.listdir

    def listdir(path: object = ".") -> list:
        if os.path.realpath(os.fsdecode(path)) == os.path.realpath(folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real(path)

    mp.setattr(os, "listdir", listdir)


def full_disk(target: str) -> Patch:
    """Make `target` (a dotted name of a write function) write a little, then fail with ENOSPC."""
    def patch(env: Env, mp: pytest.MonkeyPatch) -> None:
        def no_space(*args: object, **kwargs: object) -> None:
            for arg in args:
                if isinstance(arg, (str, os.PathLike)) and not os.path.exists(arg):
                    Path(arg).write_bytes(b"\0" * 10)  # a half-written file, as a real full disk leaves
                    break
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        mp.setattr(target, no_space)
    return patch


def write_text_full(env: Env, mp: pytest.MonkeyPatch) -> None:
    def no_space(self: Path, *args: object, **kwargs: object) -> int:
        with open(self, "wb") as fh:
            fh.write(b'{"acc": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(Path, "write_text", no_space)


def trained_scan(env: Env) -> list[str]:
    return scan_args(env, data(env))


def split_of(env: Env) -> list[str]:
    root = data(env, classes=2, per_class=4)
    return split_args(env, write_fake_scan(env.inp / "prev", root, np.linspace(0.1, 2.0, 8)))


def evaluate_out_new_folder(env: Env) -> list[str]:
    root = data(env)
    return evaluate_args(env, checkpoint(env, root), root, "--out", env.work / "new" / "folder" / "result.json")


def evaluate_out(env: Env) -> list[str]:
    root = data(env)
    return evaluate_args(env, checkpoint(env, root), root, "--out", env.work / "result.json")


def poison_train(env: Env) -> list[str]:
    return poison_args(env, data(env, classes=2, per_class=5), "--rate", "0.2")


# ---------------------------------------------------------------- what accepted input must produce


def scan_rows(n: int, image_size: int = 16) -> Callable[[Env], None]:
    """scores.csv has one row per image, and the model was built for `image_size` px RGB."""
    def check(env: Env) -> None:
        with open(env.work / "scan" / "scores.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["index"]) for r in rows] == list(range(n))
        assert all(math.isfinite(float(r["score"])) for r in rows)
        scan = json.loads((env.work / "scan" / "scan.json").read_text())
        assert scan["settings"]["image_size"] == [image_size, image_size] and scan["samples"] == n
    return check


def split_copies(env: Env) -> None:
    """kept/ and isolated/ hold regular files with the source bytes (links followed), each file once."""
    trees = [env.work / "split" / t for t in ("kept", "isolated")]
    files = [p for tree in trees for p in tree.rglob("*") if not p.is_dir()]
    assert files and not any(p.is_symlink() for p in files)
    rels = sorted(p.relative_to(tree).as_posix() for tree in trees for p in tree.rglob("*") if not p.is_dir())
    scan = json.loads((env.inp / "prev" / "scan" / "scan.json").read_text())
    assert rels == sorted(list_image_folder(scan["data"]).files[i][0] for i in range(scan["samples"]))
    for tree in trees:
        for p in tree.rglob("*"):
            if p.is_file():
                assert p.read_bytes() == (Path(scan["data"]) / p.relative_to(tree)).read_bytes()


def poisoned_long_name(env: Env) -> None:
    names = [p.name for p in (env.work / "poisoned" / "class_0").iterdir()]
    assert any(name.startswith("class_1_nnnn") for name in names)
    assert all(len(name.encode()) <= 255 for name in names)


def result_json(env: Env) -> None:
    result = json.loads((env.work / "new" / "folder" / "result.json").read_text())
    assert 0 <= result["acc"] <= 1 and result["samples"] == 6


def no_cache_files(env: Env) -> None:
    assert not env.cache.exists() or not any(env.cache.glob(".*"))  # no half-written cache file left


# ---------------------------------------------------------------- the table

NO_SPACE = ("No space left on device", "free some space")
SAVE_FILE = "aabl_cli.core.checkpoint.save_file"  # what writes every checkpoint

CASES: list[Case] = [
    # images
    Case("zero-byte-png", with_bad_file("zero.png", lambda p: p.write_bytes(b"")), 2, ("zero.png", SKIP_HINT)),
    Case("truncated-png", with_bad_file("cut.png", _truncated("PNG")), 2, ("cut.png", SKIP_HINT)),
    Case("truncated-jpeg", with_bad_file("cut.jpg", _truncated("JPEG")), 2, ("cut.jpg", SKIP_HINT)),
    Case("text-file-named-png", with_bad_file("notes.png", lambda p: p.write_text("hello\n")), 2,
         ("notes.png", "not a readable image", SKIP_HINT)),
    Case("random-bytes-jpg", with_bad_file("noise.jpg", lambda p: p.write_bytes(os.urandom(300))), 2,
         ("noise.jpg", SKIP_HINT)),
    Case("html-named-webp", with_bad_file("page.webp", lambda p: p.write_text("<html></html>")), 2,
         ("page.webp", SKIP_HINT)),
    Case("decompression-bomb-header", with_bad_file("bomb.png", bomb_png), 2, ("bomb.png", SKIP_HINT)),
    Case("non-image-extension", with_bad_file("labels.txt", lambda p: p.write_text("x")), 2,
         ("labels.txt", "not an image file", SKIP_HINT)),
    Case("mixed-modes-and-sizes-accepted", mixed_modes, 0, ("scanned 12 images",), check=scan_rows(12)),
    Case("one-1x1-image-accepted", tiny_image, 0, ("scanned 7 images",), check=scan_rows(7)),
    Case("all-images-1x1", all_tiny_images, 2, ("1x1 px", "--image-size")),
    Case("4000px-image-accepted", large_image, 0, ("scanned 7 images",), check=scan_rows(7)),
    Case("non-utf8-file-name", non_utf8_file, 2, ("not valid UTF-8", "rename")),
    Case("non-utf8-class-folder", non_utf8_class, 2, ("not valid UTF-8", "rename")),
    Case("255-byte-file-name-accepted", long_name, 0, ("scanned 7 images",), check=scan_rows(7)),
    Case("255-byte-file-name-split-accepted", long_name_split, 0, ("verdict:",), check=split_copies),
    Case("255-byte-file-name-poison-accepted", long_name_poison, 0, ("images poisoned",), check=poisoned_long_name),
    Case("hidden-files-and-folders-ignored", hidden_entries, 0, ("scanned 6 images",), check=scan_rows(6)),
    Case("nested-sub-folders-accepted", nested, 0, ("scanned 8 images",), check=scan_rows(8)),
    Case("symlinks-followed", symlinks, 0, ("scanned 12 images",), check=scan_rows(12)),
    Case("symlinks-followed-by-split", symlinks_split, 0, ("verdict:",), check=split_copies),
    Case("symlink-loop-folder", dir_loop, 2, ("symlink loop", "remove the link")),
    Case("symlink-loop-to-root", loop_to_root, 2, ("symlink loop", "remove the link")),
    Case("symlink-loop-mutual", mutual_loop, 2, ("symlink loop", "remove the link")),
    Case("symlink-loop-file", self_loop_file, 2, ("symlink loop", "remove the link")),
    Case("dangling-symlink", dangling, 2, ("gone.png", SKIP_HINT)),
    Case("fifo-named-png", fifo, 2, ("pipe.png", SKIP_HINT), subprocess=True),
    Case("unreadable-class-folder", trained_scan, 2, ("cannot read", "check its permissions"),
         patch=unreadable_class),
    Case("empty-dataset", empty_root, 2, ("no class folders", "lay images out as")),
    Case("only-empty-class-folders", empty_classes, 2, ("no readable images", "add images under")),
    Case("one-class-scan", one_class, 2, ("1 non-empty class folder", "add images of another class")),
    Case("one-class-train", one_class_train, 2, ("1 non-empty class folder", "add images of another class")),
    Case("class-with-one-image-accepted", single_image_class, 0, ("scanned 5 images",), check=scan_rows(5)),
    Case("two-single-image-classes-train-accepted", single_image_classes_train, 0, ("trained 1 epochs on 2",)),
    Case("data-is-a-file", data_is_a_file, 2, ("is a file", "DATA")),
    Case("malformed-ground-truth-ignored", short_ground_truth_row, 0, ("scanned 6 images",)),
    # where outputs go
    Case("workdir-is-the-data", workdir_is_data, 2, ("inside the data folder", "choose a --workdir outside")),
    Case("workdir-output-would-replace-a-class", workdir_collides_with_a_class, 2,
         ("inside the data folder", "choose a --workdir outside")),
    Case("data-inside-the-output-folder", data_inside_output, 2, ("would replace the data folder", "--workdir")),
    Case("cache-dir-inside-data-accepted", cache_inside_data, 0, ("inside the data folder", "choose a --cache-dir"),
         check=scan_rows(6)),
    Case("evaluate-out-inside-test", evaluate_out_inside_test, 2, ("inside the input folder", "choose an --out")),
    Case("poison-out-inside-src", poison_out_inside_src, 2, ("inside the source folder", "choose an output folder")),
    Case("poison-bad-image", poison_bad_image, 2, ("broken.png", "remove or replace it"), absent=("--on-bad-file",)),
    Case("poison-non-utf8-file-name", poison_non_utf8, 2, ("not valid UTF-8", "rename")),
    # options
    Case("eps-abc", option("--eps", "abc"), 2, ("'abc' is not a number or fraction", "write it like 8/255")),
    Case("eps-1/0", option("--eps", "1/0"), 2, ("'1/0' is not a number or fraction", "write it like")),
    Case("eps-negative", option("--eps", "-1/255"), 2, ("negative", "at least 0")),
    Case("eps-2", option("--eps", "2"), 2, ("above 1", "did you mean 2/255?")),
    Case("eps-nan", option("--eps", "nan"), 2, ("not a number or fraction", "write it like")),
    Case("eps-python-expression", option("--eps", "__import__('os').getcwd()"), 2, ("not a number", "write it like")),
    Case("train-eps-8", train_option("--eps", "8"), 2, ("above 1", "did you mean 8/255?")),
    Case("image-size-too-small", option("--image-size", "4"), 2, ("--image-size", "16<=x<=1024")),
    Case("eps-huge-exponent", option("--eps", "1e999999999"), 2, ("not a number or fraction", "write it like"),
         subprocess=True),
    Case("fraction-huge-exponent", lambda env: [*scores()(env), "--fraction", "1e-999999999"], 2,
         ("not a fraction", "write it like 0.1"), subprocess=True),
    # scores.csv
    Case("scores-edited-values-accepted", scores(set_score(2, "123.5")), 0, ("verdict:",), check=split_copies),
    Case("scores-truncated", scores(lambda r: r[:-1]), 2, ("has 7 rows", "re-create it with `aabl scan`")),
    Case("scores-cut-mid-row", scores(lambda r: r[:-1] + [r[-1][:2]]), 2, ("line 9", "re-create")),
    Case("scores-missing-row", scores(lambda r: renumber(r[:3] + r[4:])), 2, ("has 7 rows", "re-create it")),
    Case("scores-duplicate-row", scores(lambda r: r + [r[3]]), 2, ("index 2 where 8", "restore the rows")),
    Case("scores-reordered-rows", scores(lambda r: [r[0], r[2], r[1], *r[3:]]), 2,
         ("index 1 where 0", "restore the rows in dataset order")),
    Case("scores-reordered-renumbered", scores(lambda r: renumber([r[0], r[2], r[1], *r[3:]])), 2,
         ("does not match", "scan the dataset again")),
    Case("scores-non-numeric", scores(set_score(4, "high")), 2, ("unreadable row", "re-create the file")),
    Case("scores-nan", scores(set_score(4, "nan")), 2, ("not a finite number", "give every sample a finite score")),
    Case("scores-inf", scores(set_score(4, "-inf")), 2, ("not a finite number", "give every sample")),
    Case("scores-empty-file", scores(text=""), 2, ("lacks the column", "use the scores.csv that scan wrote")),
    Case("scores-header-only", scores(lambda r: r[:1]), 2, ("has 0 rows", "re-create it")),
    # a spreadsheet's byte-order mark is read past: 2 of the 8 isolated, as from the original file
    Case("scores-excel-bom", scores(lambda r: [["\ufeffindex", *r[0][1:]], *r[1:]]), 0, ("isolated", "2 (25.0%)")),
    Case("scores-from-another-dataset", scores_from_another_dataset, 2, ("cannot be read from", "scan it again")),
    Case("dataset-changed-since-scan", dataset_changed, 2, ("does not match the images", "scan the dataset again")),
    Case("scores-without-scan-json", no_scan_json, 2, ("scan.json", "keep the scan.json")),
    Case("scores-path-to-a-device", device_path, 2, ("not a regular file", "scan it again"), subprocess=True),
    Case("scores-path-with-dotdot", escaping_paths("class_0/../../outside.png"), 2,
         ("refusing to write", "would leave the output folder")),
    Case("scores-absolute-path", escaping_paths("ABS"), 2, ("refusing to write", "would leave the output folder"),
         alternatives=(("does not match the class folder", "re-create the file"),)),
    # environment faults
    Case("read-only-workdir-scan", trained_scan, 1, ("Permission denied", "writable"), patch=read_only),
    Case("read-only-workdir-split", split_of, 1, ("Permission denied", "writable"), patch=read_only),
    Case("full-disk-scan-checkpoint", trained_scan, 1, NO_SPACE, patch=full_disk(SAVE_FILE)),
    Case("full-disk-train-checkpoint", train_option(), 1, NO_SPACE, patch=full_disk(SAVE_FILE)),
    Case("full-disk-split-copy", split_of, 1, NO_SPACE, patch=full_disk("shutil.copyfile")),
    Case("full-disk-poison-copy", poison_train, 1, NO_SPACE, patch=full_disk("shutil.copyfile")),
    Case("full-disk-evaluate-out", evaluate_out, 1, NO_SPACE, patch=write_text_full),
    Case("evaluate-out-in-a-new-folder-accepted", evaluate_out_new_folder, 0, ('"acc":',), check=result_json),
    Case("full-disk-decode-cache-accepted", trained_scan, 0, ("could not write the decode cache",),
         patch=full_disk("aabl_cli.core.cache._pwrite_all"), check=no_cache_files),
]
for _name in CHECKPOINTS:
    CASES += [checkpoint_case(_name, "scan"), checkpoint_case(_name, "evaluate")]


# ---------------------------------------------------------------- running a case


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Every entry below `root` without following links: kind, mode, mtime, and bytes or link target.

    Unlike conftest.tree_hash this survives symlink loops and file names that are not UTF-8.
    """
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, base)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    out[rel] = ("file", st.st_mode, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
            else:
                out[rel] = ("other", st.st_mode, st.st_mtime_ns)
    return out


def run_cli(args: list[str], env: Env, *, in_subprocess: bool) -> tuple[int, str]:
    if in_subprocess:
        proc_env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(env.tmp / "xdg")}
        try:
            proc = subprocess.run([sys.executable, "-m", "aabl_cli", *args], capture_output=True, text=True,
                                  timeout=90, env=proc_env, errors="replace")
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"aabl hung on this input: {err}")
        return proc.returncode, proc.stdout + proc.stderr
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def _one_line_with_all(output: str, parts: tuple[str, ...]) -> bool:
    return any(all(p in line for p in parts) for line in output.splitlines())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(inp=tmp_path / "in", work=tmp_path / "work", cache=tmp_path / "cache", tmp=tmp_path)
    env.inp.mkdir()
    args = case.build(env)
    before = snapshot(env.inp)
    assert before, "the case built no input"
    try:
        with monkeypatch.context() as mp:
            if case.patch is not None:
                case.patch(env, mp)
            code, output = run_cli(args, env, in_subprocess=case.subprocess)
    finally:
        if env.work.exists():
            env.work.chmod(0o755)  # undo read_only
    assert code == case.code, output
    assert "Traceback" not in output, output
    assert any(_one_line_with_all(output, e) for e in (case.expect, *case.alternatives)), \
        f"no line holds all of {case.expect}:\n{output}"
    assert not any(a in output for a in case.absent), output
    if case.code != 0:
        error_lines = [line for line in output.splitlines() if line.startswith(("error: ", "Error: "))]
        assert len(error_lines) == 1, output
    assert snapshot(env.inp) == before, "the command changed its input"
    if case.code == 0 and case.check is not None:
        case.check(env)
    if case.code != 0 and env.work.exists():
        # no output, whole or half: at most the stage's own hidden resume folder
        left = sorted(p.name for p in env.work.iterdir())
        assert all(name in (".scan.partial", ".train.partial") for name in left), left
        assert not list(env.work.rglob("*.tmp-*")) and not list(env.work.rglob(".*.tmp*")), left


def test_the_table_covers_the_brief() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    for needle in ("zero-byte", "truncated-png", "truncated-jpeg", "text-file", "mixed-modes", "1x1", "4000px",
                   "non-utf8", "255-byte", "hidden", "nested", "symlinks-followed", "symlink-loop", "empty-dataset",
                   "one-class", "one-image", "read-only", "full-disk", "eps-abc", "eps-1/0", "eps-negative", "eps-2",
                   "scores-truncated", "scores-missing-row", "scores-duplicate-row", "scores-reordered",
                   "scores-non-numeric", "scores-nan", "another-dataset", "edited-values", "checkpoint-pickle",
                   "checkpoint-tensor", "checkpoint-other-classes", "dotdot", "absolute"):
        assert any(needle in n for n in names), needle
    assert sum(c.code == 0 for c in CASES) >= 10 and sum(c.code == 1 for c in CASES) >= 5
    assert len(CASES) >= 100


# ---------------------------------------------------------------- writers never leave their output folder


# ABS stands for the absolute path of the test's own tmp_path/escape.png
ESCAPES = ["../escape.png", "class_0/../../escape.png", "ABS", "a/../../../escape.png", "class_0/./../../escape.png",
           "..", "", "."]


@pytest.mark.parametrize("rel", ESCAPES)
def test_safe_relative_refuses_escapes(rel: str, tmp_path: Path) -> None:
    with pytest.raises(AablError, match="would leave the output folder"):
        safe_relative(rel.replace("ABS", str(tmp_path / "escape.png")))


@pytest.mark.parametrize("rel", ["class_0/img.png", "a/b/c.png", "./a.png", "n" * 255, "caf\udce9.png"])
def test_safe_relative_keeps_plain_relative_paths(rel: str) -> None:
    assert safe_relative(rel) == Path(rel)
    assert not safe_relative(rel).is_absolute() and ".." not in safe_relative(rel).parts


@pytest.mark.parametrize("rel", ESCAPES[:5])
@pytest.mark.parametrize("link", ["copy", "hardlink", "symlink"])
def test_write_image_folder_refuses_escapes_for_every_link_mode(tmp_path: Path, rel: str, link: str) -> None:
    root = make_folder(tmp_path / "deep" / "src", classes=1, per_class=1)
    target = tmp_path / "escape.png"
    target.write_bytes(b"original")
    (tmp_path / "deep" / "escape.png").write_bytes(b"original")
    out = tmp_path / "deep" / "out"
    before = snapshot(root)
    with pytest.raises(AablError, match="would leave the output folder"):
        write_image_folder(out, root, ["class_0/img_000.png", rel.replace("ABS", str(target))], link=link)
    assert snapshot(root) == before
    assert target.read_bytes() == b"original" and (tmp_path / "deep" / "escape.png").read_bytes() == b"original"
    # nothing outside out/ appeared: only the row before the bad one was written, inside out/
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"escape.png", "deep/escape.png", "deep/src/class_0/img_000.png", "deep/out/class_0/img_000.png"}
