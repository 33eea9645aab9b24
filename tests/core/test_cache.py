"""cache: a first decode writes each row into a temporary file renamed into place at the end, so an
interrupted decode leaves nothing a later run trusts; rows read back by position equal the mapped ones."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_folder

import aabl_cli.core.data as data_mod
from aabl_cli.core.cache import CacheWriter, _header
from aabl_cli.core.data import load_image_folder


def _entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_an_interrupted_first_decode_leaves_no_entry_and_the_next_run_decodes_all(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real, calls = data_mod.decode_image, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_image_folder(tiny_data, cache_dir=cache, quiet=True)
    assert not [name for name in _entries(cache) if name.endswith((".npy", ".json"))]  # no entry, no temporary

    monkeypatch.setattr(data_mod, "decode_image", real)
    first = load_image_folder(tiny_data, cache_dir=cache, quiet=True)
    again = load_image_folder(tiny_data, cache_dir=tmp_path / "other", quiet=True)
    assert torch.equal(first.images, again.images) and first.fingerprint == again.fingerprint
    assert len([n for n in _entries(cache) if n.endswith(".npy")]) == 1


def test_a_killed_writers_temporary_is_never_read_and_is_swept(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    leftover = cache / f".{'0' * 32}.{dead}.npy"
    leftover.write_bytes(b"half-written")
    ds = load_image_folder(tiny_data, cache_dir=cache, quiet=True)
    assert len(ds) == 36
    assert not leftover.exists()
    assert not [n for n in _entries(cache) if n.startswith(".")]


def test_skipped_files_leave_no_gap_in_the_rows(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=10)
    clean = load_image_folder(data, cache_dir=tmp_path / "clean", quiet=True)
    for name in ("class_0/img_003.png", "class_1/img_000.png", "class_1/img_009.png"):
        (data / name).write_bytes(b"not an image")
    ds = load_image_folder(data, cache_dir=tmp_path / "c", on_bad_file="skip", quiet=True)
    assert len(ds) == 17 and ds.images.shape == (17, 3, 16, 16)
    for i, rel in enumerate(ds.paths):  # each row holds its own file's pixels
        assert torch.equal(ds.images[i], clean.images[clean.paths.index(rel)])
    out = np.empty((17, 3, 16, 16), dtype=np.uint8)
    ds.rows.read_into(np.arange(17), out)
    assert np.array_equal(out, ds.images.numpy())
    cached = load_image_folder(data, cache_dir=tmp_path / "c", on_bad_file="skip", quiet=True)
    assert torch.equal(cached.images, ds.images)


def test_rows_read_by_position_equal_the_mapped_ones(tiny_data, tmp_path):
    ds = load_image_folder(tiny_data, cache_dir=tmp_path / "c", quiet=True)
    rows = np.array([5, 6, 7, 0, 35, 12, 13])  # runs and jumps
    out = np.empty((len(rows), 3, 16, 16), dtype=np.uint8)
    ds.rows.read_into(rows, out)
    assert np.array_equal(out, ds.images.numpy()[rows])


def test_a_cache_inside_the_data_folder_still_streams_from_a_temporary_file(tiny_data, tmp_path):
    with pytest.warns(UserWarning, match="nothing is cached"):
        ds = load_image_folder(tiny_data, cache_dir=tiny_data / ".cache", quiet=True)
    assert ds.rows is not None and not (tiny_data / ".cache").exists()
    out = np.empty((1, 3, 16, 16), dtype=np.uint8)
    ds.rows.read_into(np.array([3]), out)
    assert np.array_equal(out[0], ds.images.numpy()[3])


def test_a_failed_write_midway_carries_on_in_memory(tmp_path, capsys, monkeypatch):
    writer = CacheWriter(tmp_path / "c", "k" * 32, (4, 3, 2, 2))
    writer.put(0, np.full((3, 2, 2), 1, np.uint8))
    real = os.pwrite

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    for i in range(1, 4):
        writer.put(i, np.full((3, 2, 2), i + 1, np.uint8))
    monkeypatch.setattr(os, "pwrite", real)
    images, rows = writer.commit("k" * 32, {}, np.array([True, False, True, True]))
    assert rows is None and images[:, 0, 0, 0].tolist() == [1, 3, 4]
    assert "could not write the decode cache" in capsys.readouterr().err
    assert not list((tmp_path / "c").iterdir())


def test_a_header_of_fewer_rows_fits_the_place_reserved_for_more(tmp_path):
    big = _header((123456, 3, 32, 32))
    small = _header((7, 3, 32, 32), len(big))
    assert len(small) == len(big) and len(big) % 64 == 0
    path = tmp_path / "a.npy"
    path.write_bytes(small + bytes(7 * 3 * 32 * 32))
    assert np.load(path, mmap_mode="r").shape == (7, 3, 32, 32)
