"""data: decoding image folders, the decode cache, fingerprints, bad input, writing folders."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder, tree_hash
from PIL import Image

import aabl_cli.core.data as data_mod
from aabl_cli.core.data import dataset_fingerprint, load_image_folder
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import write_image_folder


def _load(root: Path, tmp_path: Path, **kwargs):
    return load_image_folder(root, cache_dir=tmp_path / "cache", quiet=True, **kwargs)


def test_load_gives_uint8_tensor_labels_sorted_classes_and_relative_paths(tmp_path):
    root = tmp_path / "data"
    # Create classes out of order: the labels must follow the sorted names, not creation order.
    for name in ("zebra", "apple", "mango"):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 12), (10 * i, 50, 90)).save(folder / f"{i}.png")
    ds = _load(root, tmp_path)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (6, 3, 12, 20)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.paths == ["apple/0.png", "apple/1.png", "mango/0.png", "mango/1.png", "zebra/0.png", "zebra/1.png"]
    assert ds.image_size == (12, 20)
    assert ds.class_counts() == [2, 2, 2]
    # pixel values survive: (R, G, B) of apple/1.png is (10, 50, 90)
    assert ds.images[1, :, 0, 0].tolist() == [10, 50, 90]


def test_pixels_match_the_files(tiny_data, tmp_path):
    ds = _load(tiny_data, tmp_path)
    assert len(ds) == 36
    for i in (0, 17, 35):
        expected = np.asarray(Image.open(tiny_data / ds.paths[i]).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(ds.images[i].numpy(), expected)


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    Image.new("L", (16, 16), 100).save(root / "a" / "gray.png")
    Image.new("RGBA", (16, 16), (200, 10, 20, 255)).save(root / "a" / "rgba.png")
    Image.new("RGBA", (16, 16), (200, 100, 50, 0)).save(root / "a" / "transparent.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([30, 60, 90] + [0] * 765)
    pal.save(root / "b" / "palette.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "b" / "rgb.bmp")
    ds = _load(root, tmp_path)
    assert ds.images.shape == (5, 3, 16, 16)
    by_name = {Path(p).name: ds.images[i, :, 5, 5].tolist() for i, p in enumerate(ds.paths)}
    assert by_name == {"gray.png": [100, 100, 100], "rgba.png": [200, 10, 20], "transparent.png": [0, 0, 0],
                       "palette.png": [30, 60, 90], "rgb.bmp": [1, 2, 3]}


def test_mixed_sizes_resized_to_most_common(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i, i, i)).save(root / name / f"s{i}.png")
    Image.new("RGB", (24, 20), (255, 255, 255)).save(root / "a" / "big.png")
    ds = _load(root, tmp_path)
    assert tuple(ds.images.shape) == (7, 3, 16, 16)
    big = ds.paths.index("a/big.png")
    assert ds.images[big].min().item() == 255  # resized, not cropped or padded
    # an explicit --image-size wins
    ds32 = _load(root, tmp_path, image_size=32)
    assert tuple(ds32.images.shape) == (7, 3, 32, 32)


def test_cache_reused_without_decoding(tiny_data, tmp_path, monkeypatch):
    first = _load(tiny_data, tmp_path)
    assert any((tmp_path / "cache").glob("*.npy"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(data_mod, "decode_image", no_decode)
    second = _load(tiny_data, tmp_path)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.paths == second.paths and first.classes == second.classes
    assert first.fingerprint == second.fingerprint


def test_cached_load_emits_no_warning(tiny_data, tmp_path):
    # slow (~4 s, a fresh interpreter, since torch warns only once per process): the second, cached load must be
    # as quiet as the first; the CLI shows every Python warning to the user.
    code = ("import sys; from aabl_cli.core.data import load_image_folder as load\n"
            "for _ in range(2): load(sys.argv[1], cache_dir=sys.argv[2], quiet=True)")
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, str(tiny_data),
                             str(tmp_path / "cache")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-1500:]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_cache_invalidated_when_a_file_changes(tiny_data, tmp_path, monkeypatch):
    first = _load(tiny_data, tmp_path)
    target = tiny_data / "class_1" / "img_003.png"
    Image.new("RGB", (16, 16), (7, 8, 9)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a distinct mtime even on coarse clocks
    calls = []
    real = data_mod.decode_image

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "decode_image", counting)
    second = _load(tiny_data, tmp_path)
    assert calls, "a changed file must be decoded again"
    i = second.paths.index("class_1/img_003.png")
    assert second.images[i, :, 0, 0].tolist() == [7, 8, 9]
    assert second.fingerprint != first.fingerprint


def test_fingerprint_changes_when_one_byte_changes(tiny_data):
    paths = sorted(p.relative_to(tiny_data).as_posix() for p in tiny_data.rglob("*.png"))
    before = dataset_fingerprint(tiny_data, paths)
    assert before == dataset_fingerprint(tiny_data, paths)
    target = tiny_data / paths[5]
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01
    target.write_bytes(bytes(raw))
    assert dataset_fingerprint(tiny_data, paths) != before
    raw[-1] ^= 0x01
    target.write_bytes(bytes(raw))
    assert dataset_fingerprint(tiny_data, paths) == before
    # the order of the paths is part of the fingerprint
    assert dataset_fingerprint(tiny_data, paths[::-1]) != before


def test_fingerprint_is_what_load_reports(tiny_data, tmp_path):
    ds = _load(tiny_data, tmp_path)
    assert ds.fingerprint == dataset_fingerprint(tiny_data, ds.paths)
    assert len(ds.fingerprint) == 64


@pytest.mark.parametrize("kind", ["truncated", "text", "random_bytes"])
def test_bad_image_file_names_the_file(tiny_data, tmp_path, kind):
    bad = tiny_data / "class_2" / "bad.png"
    good = (tiny_data / "class_2" / "img_000.png").read_bytes()
    if kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        bad.write_text("this is not a picture\n")
    else:
        bad.write_bytes(os.urandom(200))
    with pytest.raises(AablError, match=r"class_2/bad\.png") as info:
        _load(tiny_data, tmp_path)
    assert "--on-bad-file skip" in str(info.value)


def test_non_image_file_in_class_folder_names_the_file(tiny_data, tmp_path):
    (tiny_data / "class_0" / "notes.txt").write_text("hello")
    with pytest.raises(AablError, match=r"class_0/notes\.txt.*not an image file"):
        _load(tiny_data, tmp_path)


def test_top_level_files_and_hidden_entries_are_ignored(tiny_data, tmp_path):
    (tiny_data / "poison.csv").write_text("path,poisoned\n")
    (tiny_data / ".DS_Store").write_text("x")
    (tiny_data / "class_0" / ".hidden.png").write_text("not an image")
    (tiny_data / ".git").mkdir()
    ds = _load(tiny_data, tmp_path)
    assert len(ds) == 36 and ds.classes == ["class_0", "class_1", "class_2"]


def test_skip_lists_skipped_files(tiny_data, tmp_path):
    (tiny_data / "class_0" / "broken.png").write_text("not an image")
    (tiny_data / "class_1" / "readme.txt").write_text("hello")
    ds = _load(tiny_data, tmp_path, on_bad_file="skip")
    assert len(ds) == 36
    assert "class_0/broken.png" not in ds.paths
    skipped = {entry["path"] for entry in ds.skipped}
    assert skipped == {"class_0/broken.png", "class_1/readme.txt"}
    assert all(entry["reason"] for entry in ds.skipped)
    # the cached second load reports the same skipped files
    again = _load(tiny_data, tmp_path, on_bad_file="skip")
    assert {entry["path"] for entry in again.skipped} == skipped
    assert again.paths == ds.paths


def test_dangling_symlink_is_named_and_skippable(tiny_data, tmp_path):
    os.symlink(tmp_path / "gone.png", tiny_data / "class_0" / "dangling.png")
    with pytest.raises(AablError, match=r"class_0/dangling\.png"):
        _load(tiny_data, tmp_path)
    # --on-bad-file skip: an unreadable file is skipped and listed like any other bad file
    ds = _load(tiny_data, tmp_path, on_bad_file="skip")
    assert len(ds) == 36
    assert [entry["path"] for entry in ds.skipped] == ["class_0/dangling.png"]


def test_unwritable_cache_costs_time_not_correctness(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    ds = load_image_folder(tiny_data, cache_dir=tmp_path / "file" / "cache", quiet=True)
    assert len(ds) == 36 and ds.images.shape == (36, 3, 16, 16)
    assert "could not write the decode cache" in capsys.readouterr().err


def test_no_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "lonely.png")
    with pytest.raises(AablError, match="no class folders"):
        _load(root, tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(AablError, match="does not exist"):
        _load(tmp_path / "nope", tmp_path)


def test_single_class_refused(tmp_path):
    root = make_folder(tmp_path / "one", classes=1, per_class=3)
    with pytest.raises(AablError, match=r"1 non-empty class folder.*at least 2"):
        _load(root, tmp_path)
    # a caller that needs only one class (an ASR test set) may load it
    assert len(_load(root, tmp_path, min_classes=1)) == 3


def test_empty_class_folder_stays_a_class_with_a_warning(tiny_data, tmp_path):
    (tiny_data / "class_1b").mkdir()  # sorts between class_1 and class_2
    with pytest.warns(UserWarning, match="class_1b.*empty"):
        ds = _load(tiny_data, tmp_path)
    assert ds.classes == ["class_0", "class_1", "class_1b", "class_2"]
    assert ds.class_counts() == [12, 12, 0, 12]
    assert ds.labels.max().item() == 3


def test_symlink_loop_refused(tiny_data, tmp_path):
    os.symlink(tiny_data / "class_0", tiny_data / "class_0" / "again")
    with pytest.raises(AablError, match="symlink loop"):
        _load(tiny_data, tmp_path)


def test_two_links_to_one_folder_are_not_a_loop(tiny_data, tmp_path):
    # A folder reached twice through two links is a diamond, not a cycle: nothing loops.
    extra = make_folder(tmp_path / "extra", classes=1, per_class=2, seed=3) / "class_0"
    os.symlink(extra, tiny_data / "class_0" / "link_a")
    os.symlink(extra, tiny_data / "class_0" / "link_b")
    ds = _load(tiny_data, tmp_path)
    assert len(ds) == 40
    assert {"class_0/link_a/img_000.png", "class_0/link_b/img_000.png"} <= set(ds.paths)


def test_symlinked_files_and_folders_are_followed(tiny_data, tmp_path):
    extra = make_folder(tmp_path / "extra", classes=1, per_class=2, seed=3) / "class_0"
    os.symlink(extra, tiny_data / "class_2" / "linked")
    os.symlink(extra / "img_000.png", tiny_data / "class_1" / "zz_link.png")
    ds = _load(tiny_data, tmp_path)
    assert len(ds) == 39
    assert "class_2/linked/img_001.png" in ds.paths and "class_1/zz_link.png" in ds.paths


def test_loading_never_modifies_the_source(tiny_data, tmp_path):
    before = tree_hash(tiny_data)
    _load(tiny_data, tmp_path)
    _load(tiny_data, tmp_path)
    assert tree_hash(tiny_data) == before
    assert not list(tiny_data.rglob("*.npy"))


@pytest.mark.parametrize("link", ["copy", "hardlink", "symlink"])
def test_write_image_folder_places_files_and_keeps_the_source(tiny_data, tmp_path, link):
    before = tree_hash(tiny_data)
    rels = ["class_0/img_000.png", "class_2/img_011.png"]
    out = tmp_path / "out"
    assert write_image_folder(out, tiny_data, rels, link=link) == 2
    for rel in rels:
        assert (out / rel).read_bytes() == (tiny_data / rel).read_bytes()
        assert (out / rel).is_symlink() == (link == "symlink")
        assert os.path.samefile(out / rel, tiny_data / rel) == (link != "copy")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == rels
    assert tree_hash(tiny_data) == before


def test_write_image_folder_none_writes_nothing(tiny_data, tmp_path):
    assert write_image_folder(tmp_path / "out", tiny_data, ["class_0/img_000.png"], link="none") == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rel", ["../escape.png", "class_0/../../escape.png", "/abs/escape.png"])
def test_write_image_folder_refuses_paths_leaving_the_output(tiny_data, tmp_path, rel):
    (tmp_path / "escape.png").write_bytes(b"")
    before = tree_hash(tiny_data)
    out = tmp_path / "deep" / "out"
    with pytest.raises(AablError, match="leave the output folder"):
        write_image_folder(out, tiny_data, [rel])
    assert (tmp_path / "escape.png").read_bytes() == b""
    assert not (tmp_path / "deep" / "escape.png").exists()
    assert tree_hash(tiny_data) == before


def test_empty_class_warning_is_a_warning_not_an_error(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=2)
    (root / "class_9").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _load(root, tmp_path)
    assert len(ds) == 4 and len(ds.classes) == 3
    assert any("class_9" in str(w.message) for w in caught)
