"""data at the boundary: a content-keyed decode cache, the documented formats alone, and a pixel cap
checked from the header before anything is decoded."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_folder, tree_hash
from PIL import EpsImagePlugin, Image, ImageFile

import aabl_cli.core.data as data_mod
from aabl_cli.cli import cli
from aabl_cli.core.data import dataset_fingerprint, load_image_folder
from aabl_cli.core.errors import AablError
from aabl_cli.core.images import DEFAULT_MAX_IMAGE_PIXELS, open_image


def _load(root: Path, tmp_path: Path, **kwargs):
    return load_image_folder(root, cache_dir=tmp_path / "cache", quiet=True, **kwargs)


def _scan(data: Path, tmp_path: Path, *extra: object):
    """`aabl scan` without training (--epochs 0): the data boundary is all these tests need."""
    args = ["scan", data, "--arch", "cnn", "--epochs", "0", "--batch-size", "8", "--device", "cpu", "--quiet",
            "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c", *extra]
    return CliRunner().invoke(cli, [str(a) for a in args])


def _refused(result, *parts: str) -> str:
    """The single `error:` line of a command that exited 2 with every one of `parts` in it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- (2) the cache is keyed by content


def test_rewritten_file_with_same_size_and_mtime_is_decoded_anew(tiny_data, tmp_path):
    target = tiny_data / "class_0" / "same_size.bmp"  # BMP: the byte size depends on the image size alone
    Image.new("RGB", (16, 16), (10, 20, 30)).save(target)
    first = _load(tiny_data, tmp_path)
    before = target.stat()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(target)  # as `cp -p` or `rsync -t` would leave it
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    second = _load(tiny_data, tmp_path)
    i = second.paths.index("class_0/same_size.bmp")
    assert first.images[i, :, 3, 3].tolist() == [10, 20, 30]
    assert second.images[i, :, 3, 3].tolist() == [200, 100, 50]
    assert second.fingerprint != first.fingerprint
    assert second.fingerprint == dataset_fingerprint(tiny_data, second.paths)


def test_unchanged_folder_is_served_from_the_cache_reading_each_file_once(tiny_data, tmp_path, monkeypatch):
    opened: list[Path] = []
    real_blocks = data_mod._blocks

    def counting_blocks(path):
        opened.append(Path(path))
        return real_blocks(path)

    def no_second_fingerprint(*args, **kwargs):
        raise AssertionError("the fingerprint was computed again after hashing every file")

    monkeypatch.setattr(data_mod, "_blocks", counting_blocks)
    monkeypatch.setattr(data_mod, "dataset_fingerprint", no_second_fingerprint)
    first = _load(tiny_data, tmp_path)
    assert len(opened) == 2 * 36 and len(set(opened)) == 36  # hashed for the key, then read to be decoded
    assert first.fingerprint == dataset_fingerprint(tiny_data, first.paths)  # this module's unpatched one

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although no file changed")

    opened.clear()
    monkeypatch.setattr(data_mod, "decode_image", no_decode)
    second = _load(tiny_data, tmp_path)
    assert len(opened) == 36 and len(set(opened)) == 36  # each file read once, for its hash
    assert np.array_equal(first.images.numpy(), second.images.numpy())
    assert second.fingerprint == first.fingerprint and second.paths == first.paths


def test_cache_entry_of_one_cap_is_not_served_under_another(tiny_data, tmp_path):
    big = tiny_data / "class_1" / "big.png"
    Image.new("RGB", (32, 32), (250, 250, 250)).save(big)  # 1024 px; the others are 16 x 16 = 256 px
    small_cap = _load(tiny_data, tmp_path, on_bad_file="skip", max_image_pixels=300)
    assert "class_1/big.png" not in small_cap.paths
    assert [entry["path"] for entry in small_cap.skipped] == ["class_1/big.png"]
    assert "1024 pixels" in small_cap.skipped[0]["reason"]
    large_cap = _load(tiny_data, tmp_path, on_bad_file="skip", max_image_pixels=2000)
    assert "class_1/big.png" in large_cap.paths and not large_cap.skipped
    i = large_cap.paths.index("class_1/big.png")
    assert large_cap.images[i].min().item() == 250  # decoded (and resized to 16 x 16), not the cached refusal
    assert large_cap.fingerprint != small_cap.fingerprint


# ---------------------------------------------------------------- (3) the documented formats alone

POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\n%%EOF\n"


def _write_impostor(path: Path, kind: str) -> None:
    """A file of another format, named `.png`."""
    if kind == "postscript":
        path.write_bytes(POSTSCRIPT)
    else:
        Image.new("RGB", (16, 16), (5, 6, 7)).save(path, format=kind.upper())


@pytest.fixture
def no_ghostscript(monkeypatch):
    """Records every use of Pillow's EPS plugin, which hands the file to Ghostscript."""
    calls: list[str] = []
    real_open = EpsImagePlugin.EpsImageFile._open

    def eps_open(self):
        calls.append("EpsImageFile._open")
        return real_open(self)

    def ghostscript(*args, **kwargs):
        calls.append("Ghostscript")
        raise OSError("Ghostscript must not run on user data")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_open)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    return calls


def test_the_eps_probe_sees_an_unrestricted_open(tmp_path, no_ghostscript):
    # the probe works: Pillow left to itself does identify this file as EPS
    path = tmp_path / "evil.png"
    _write_impostor(path, "postscript")
    with Image.open(path) as img:
        assert img.format == "EPS"
    assert no_ghostscript == ["EpsImageFile._open"]


@pytest.mark.parametrize("kind", ["postscript", "gif", "tiff"])
def test_other_format_named_png_is_refused_naming_it(tmp_path, kind, no_ghostscript):
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    _write_impostor(data / "class_1" / "evil.png", kind)
    before = tree_hash(data)
    result = _scan(data, tmp_path)
    line = _refused(result, "evil.png", "not a readable image", "PNG, JPEG", "--on-bad-file skip")
    assert "Ghostscript" not in line
    assert no_ghostscript == []
    assert not (tmp_path / "w" / "scan").exists()
    assert tree_hash(data) == before


def _skipped(data, tmp_path) -> dict:
    """`scan --on-bad-file skip` of a 2 x 3-image folder plus one bad file: the six are scanned, and the bad
    file is the one entry of `skipped`, which this returns."""
    result = _scan(data, tmp_path, "--on-bad-file", "skip", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 6 and len(summary["skipped"]) == 1
    return summary["skipped"][0]


@pytest.mark.parametrize("kind", ["postscript", "gif", "tiff"])
def test_other_format_named_png_is_skipped_and_listed(tmp_path, kind, no_ghostscript):
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    _write_impostor(data / "class_1" / "evil.png", kind)
    entry = _skipped(data, tmp_path)
    assert entry["path"] == "class_1/evil.png" and "not a readable image" in entry["reason"]
    assert no_ghostscript == []


def test_every_documented_format_still_decodes(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    colour = (40, 90, 160)
    Image.new("RGB", (16, 16), colour).save(root / "a" / "x.png")
    Image.new("RGB", (16, 16), colour).save(root / "a" / "x.bmp")
    Image.new("RGB", (16, 16), colour).save(root / "a" / "x.ppm")
    Image.new("L", (16, 16), 77).save(root / "a" / "grey.ppm", format="PPM")  # a PGM, read by the PPM plugin
    Image.new("RGB", (16, 16), colour).save(root / "b" / "x.webp", lossless=True)
    Image.new("RGB", (16, 16), colour).save(root / "b" / "x.jpg", quality=95)
    ds = _load(root, tmp_path)
    by_name = {p: ds.images[i, :, 8, 8].tolist() for i, p in enumerate(ds.paths)}
    exact = {p: v for p, v in by_name.items() if not p.endswith(".jpg")}
    assert exact == {"a/grey.ppm": [77, 77, 77], "a/x.bmp": list(colour), "a/x.png": list(colour),
                     "a/x.ppm": list(colour), "b/x.webp": list(colour)}
    assert np.abs(np.array(by_name["b/x.jpg"]) - np.array(colour)).max() <= 3  # JPEG is lossy


# ---------------------------------------------------------------- (7) a pixel cap checked from the header


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> None:
    """A tiny valid 1 x 1 greyscale PNG whose header is patched to claim `width` x `height` px."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0"))
                     + chunk(b"IEND", b""))


@pytest.fixture
def loaded_sizes(monkeypatch):
    """The (width, height) of every image whose pixels Pillow decodes."""
    sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_bomb_is_refused_from_its_header_without_decoding(tmp_path, loaded_sizes):
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    bomb_png(data / "class_1" / "bomb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own warning, which names no file, must not fire either
        result = _scan(data, tmp_path)
    _refused(result, "bomb.png", "20000x20000", "400000000 pixels", f"{DEFAULT_MAX_IMAGE_PIXELS} pixels",
             "--max-image-pixels 400000000", "--on-bad-file skip")
    assert "DecompressionBomb" not in result.output
    assert (20_000, 20_000) not in loaded_sizes
    assert all(w * h <= DEFAULT_MAX_IMAGE_PIXELS for w, h in loaded_sizes)


def test_the_load_probe_sees_decoding(tmp_path, loaded_sizes):
    # the probe works: a decoded image is recorded
    data = make_folder(tmp_path / "data", classes=2, per_class=1)
    _load(data, tmp_path)
    assert len(loaded_sizes) >= 2 and set(loaded_sizes) == {(16, 16)}  # load() runs more than once per image


def test_bomb_is_skipped_and_listed(tmp_path, loaded_sizes):
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    bomb_png(data / "class_1" / "bomb.png")
    entry = _skipped(data, tmp_path)
    assert entry["path"] == "class_1/bomb.png" and "400000000 pixels" in entry["reason"]
    assert (20_000, 20_000) not in loaded_sizes


def test_a_raised_cap_opens_a_big_header_without_any_warning(tmp_path):
    path = tmp_path / "big.png"
    bomb_png(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_image(path, max_image_pixels=500_000_000) as img:  # Pillow alone warns past 89 M pixels
            assert img.size == (20_000, 20_000)
    with pytest.raises(AablError, match=r"big\.png: 20000x20000 px"):
        open_image(path)


@pytest.mark.parametrize(("cap", "code"), [(100, 2), (255, 2), (256, 0), (1000, 0)])
def test_max_image_pixels_option_sets_the_cap(tmp_path, cap, code):
    data = make_folder(tmp_path / "data", classes=2, per_class=2)  # 16 x 16 = 256 px each
    result = _scan(data, tmp_path, "--max-image-pixels", cap)
    if code == 0:
        assert result.exit_code == 0, result.output
        assert (tmp_path / "w" / "scan" / "scores.csv").exists()
    else:
        _refused(result, "class_0/img_000.png", "256 pixels", f"cap of {cap} pixels", "--max-image-pixels 256")


def test_max_image_pixels_reaches_train_and_its_val_folder(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=2)
    val = make_folder(tmp_path / "val", classes=2, per_class=1)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(val / "class_1" / "big.png")
    args = ["train", data, "--val", val, "--arch", "cnn", "--epochs", "1", "--eps", "0", "--batch-size", "2",
            "--device", "cpu", "--quiet", "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c",
            "--max-image-pixels", "300"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    _refused(result, "big.png", "1024 pixels", "cap of 300 pixels")


def test_max_image_pixels_reaches_run(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=2)
    args = ["run", data, "--arch", "cnn", "--scan-epochs", "1", "--train-epochs", "1", "--device", "cpu", "--quiet",
            "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c", "--max-image-pixels", "100"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    _refused(result, "img_000.png", "256 pixels", "cap of 100 pixels")


def test_max_image_pixels_must_be_positive(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=1)
    result = _scan(data, tmp_path, "--max-image-pixels", "0")
    assert result.exit_code == 2, result.output
    assert "--max-image-pixels" in result.output and "Traceback" not in result.output


def test_every_image_over_the_cap_names_the_first_one(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=2)
    with pytest.raises(AablError, match=r"class_0/img_000\.png: 16x16 px is 256 pixels.*--max-image-pixels 256"):
        _load(data, tmp_path, max_image_pixels=100)
    with pytest.raises(AablError, match=r"no readable images: all 4 image files are bad, the first: .*img_000\.png"):
        _load(data, tmp_path, max_image_pixels=100, on_bad_file="skip")


def test_run_dry_run_reads_headers_through_the_same_gate(tmp_path, loaded_sizes):
    data = make_folder(tmp_path / "data", classes=2, per_class=2)
    bomb_png(data / "class_1" / "zz_bomb.png")
    args = ["run", data, "--dry-run", "--arch", "cnn", "--batch-size", "8", "--device", "cpu", "--quiet",
            "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "5 images" in result.output and "DecompressionBomb" not in result.output
    assert (20_000, 20_000) not in loaded_sizes
