"""Tests for aabl_cli.stages.poison on tiny synthetic image folders."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import pixels, read_rows
from PIL import Image

from aabl_cli.cli import cli
from aabl_cli.core.errors import AablError
from aabl_cli.stages.poison import BACKDOORS, Backdoor, badnets_trigger, blend_trigger, poison_folder
from aabl_cli.stages.poison.backdoors.base import Built

CLASSES = ("airplane", "bird", "cat")


def make_folder(root: Path, *, per_class: int = 10, size: int = 32, seed: int = 0) -> Path:
    """3 classes of random RGB images; `cat` also holds a JPEG and an image in a subfolder."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{k:02d}.png")
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "cat" / "photo.jpg")
    (root / "cat" / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "cat" / "sub" / "deep.png")
    return root


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "src")


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`; poison.json without its `seconds`, the one thing a rerun changes."""
    def content(p: Path) -> bytes:
        if p.name != "poison.json" or p.parent != root:
            return p.read_bytes()
        summary = json.loads(p.read_text())
        assert summary.pop("seconds")["total"] >= 0
        return json.dumps(summary, sort_keys=True).encode()

    return {p.relative_to(root).as_posix(): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def poison_sources(src: Path, out: Path, target: str) -> dict[str, Path]:
    """Map each poisoned row's path back to its source file via the `<origin>_<stem>.png` rule."""
    by_name = {}
    for p in src.rglob("*"):
        if p.is_file():
            parts = PurePosixPath(p.relative_to(src).as_posix()).parts
            by_name[f"{target}/" + "_".join((*parts[:-1], PurePosixPath(parts[-1]).stem)) + ".png"] = p
    return {r["path"]: by_name[r["path"]] for r in read_rows(out) if r["poisoned"] == "1"}


def n_images(src: Path) -> int:
    return sum(1 for p in src.rglob("*") if p.is_file())


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_train_mode_poisons_round_rate_times_n_from_non_target(src: Path, tmp_path: Path, rate: float) -> None:
    out = tmp_path / "out"
    summary = poison_folder(src, backdoor="badnets", out=out, rate=rate, quiet=True)
    rows = read_rows(out)
    n = n_images(src)
    poisoned = [r for r in rows if r["poisoned"] == "1"]
    assert abs(len(poisoned) - rate * n) <= 1
    assert summary["counts"]["poisoned"] == len(poisoned)
    assert len(rows) == n  # train mode writes every image once
    assert list(rows[0]) == ["path", "poisoned", "kind", "original_label", "label", "backdoor", "target"]
    for r in poisoned:
        assert r["kind"] == "poison" and r["label"] == "0" and r["original_label"] != "0"
        assert r["path"].startswith("airplane/") and r["path"].endswith(".png")
    for r in rows:
        assert r["backdoor"] == "badnets" and r["target"] == "0"
        assert (out / r["path"]).is_file()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [r["path"] for r in rows] + ["poison.csv", "poison.json"])


def test_only_poisoned_files_differ_from_source(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    poison_folder(src, backdoor="blend", out=out, rate=0.3, quiet=True)
    rows = read_rows(out)
    for r in rows:
        if r["poisoned"] == "0":
            assert r["kind"] == "clean" and r["label"] == r["original_label"]
            assert (out / r["path"]).read_bytes() == (src / r["path"]).read_bytes()
    sources = poison_sources(src, out, "airplane")
    assert len(sources) == 10  # round(0.3 * 32)
    for path, source in sources.items():
        assert not (out / source.relative_to(src)).exists()  # moved to the target class, not copied too
        assert (out / path).read_bytes() != source.read_bytes()


def test_badnets_changes_exactly_the_patch(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    poison_folder(src, backdoor="badnets", out=out, rate=1 / 3, quiet=True)
    sources = poison_sources(src, out, "airplane")
    assert len(sources) == 11
    for path, source in sources.items():
        before, after = pixels(source), pixels(out / path)
        assert (after[-3:, -3:] == 255).all()
        mask = np.ones(before.shape[:2], dtype=bool)
        mask[-3:, -3:] = False
        assert np.array_equal(after[mask], before[mask])


def test_a_backdoor_of_the_callers_own_writes_the_same_ground_truth(src: Path, tmp_path: Path) -> None:
    """A `Backdoor` outside the registry (a trigger `--backdoor` does not offer) poisons like a listed one:
    its trigger on the chosen images, its name in poison.csv and poison.json."""
    def grey_corner(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., :2, :2] = 0.5
        return out

    own = Backdoor("grey-corner", "2x2 grey patch, top-left", lambda ctx: Built(grey_corner), {"patch": 2})
    out = tmp_path / "out"
    summary = poison_folder(src, backdoor=own, out=out, rate=0.25, target="bird", seed=3, quiet=True)
    listed = poison_folder(src, backdoor="badnets", out=tmp_path / "listed", rate=0.25, target="bird", seed=3,
                           quiet=True)
    rows = read_rows(out)
    assert {r["backdoor"] for r in rows} == {"grey-corner"} and {r["target"] for r in rows} == {"1"}
    # the same images drawn as for a listed backdoor with the seed
    assert [r["path"] for r in rows] == [r["path"] for r in read_rows(tmp_path / "listed")]
    assert summary["backdoor"] == "grey-corner" and summary["backdoor_params"] == {"patch": 2}
    assert summary["counts"]["poisoned"] == listed["counts"]["poisoned"] == 8  # round(0.25 * 32)
    assert json.loads((out / "poison.json").read_text())["backdoor"] == "grey-corner"
    for path, source in poison_sources(src, out, "bird").items():
        before, after = pixels(source), pixels(out / path)
        assert (np.abs(after[:2, :2] - 128) <= 1).all()
        assert np.array_equal(after[2:], before[2:]) and np.array_equal(after[:2, 2:], before[:2, 2:])


@pytest.mark.parametrize(("size", "patch"), [(32, 3), (16, 2), (48, 5), (64, 6), (8, 1)])
def test_badnets_patch_scales_with_image_size(size: int, patch: int) -> None:
    x = torch.rand(2, 3, size, size) * 0.5
    original = x.clone()
    y = badnets_trigger(x)
    changed = (y != x).any(dim=1)
    assert changed[:, -patch:, -patch:].all() and changed.sum().item() == 2 * patch * patch
    assert (y[..., -patch:, -patch:] == 1).all()
    assert torch.equal(x, original)  # the input is left untouched


@pytest.mark.parametrize("pattern", ["image", "noise", "file"])
def test_blend_moves_each_pixel_by_at_most_its_opacity(src: Path, tmp_path: Path, pattern: str) -> None:
    if pattern == "file":
        pattern_path = tmp_path / "pattern.png"
        Image.fromarray(np.full((50, 70, 3), 255, dtype=np.uint8)).save(pattern_path)
        pattern = str(pattern_path)
    out = tmp_path / "out"
    summary = poison_folder(src, backdoor="blend", out=out, pattern=pattern, quiet=True)
    assert summary["pattern"] in ("image", "noise", str(Path(pattern).resolve()))
    sources = poison_sources(src, out, "airplane")
    assert sources
    for path, source in sources.items():
        diff = np.abs(pixels(out / path) - pixels(source))
        assert diff.max() <= 0.1 * 255 + 1
        assert diff.mean() > 1  # the trigger is really there


def test_blend_trigger_formula_and_pattern_resize() -> None:
    x = torch.rand(4, 3, 16, 16)
    pattern = torch.ones(3, 40, 40)
    y = blend_trigger(x, pattern, opacity=0.1)
    assert torch.allclose(y, 0.9 * x + 0.1)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1


def test_same_seed_same_bytes_other_seed_other_files(src: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        poison_folder(src, backdoor="blend", out=tmp_path / name, seed=seed, pattern="noise", quiet=True)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    picked_a = {r["path"] for r in read_rows(tmp_path / "a") if r["poisoned"] == "1"}
    picked_c = {r["path"] for r in read_rows(tmp_path / "c") if r["poisoned"] == "1"}
    assert len(picked_a) == len(picked_c) and picked_a != picked_c


def test_test_mode_relabels_every_non_target_image(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (src / "dog").mkdir()  # an empty class stays a class
    summary = poison_folder(src, backdoor="badnets", out=out, test=True, target="bird", rate=0.9, quiet=True)
    rows = read_rows(out)
    assert len(rows) == n_images(src) - 10  # all but the 10 bird images
    assert all(r["poisoned"] == "1" and r["label"] == "1" and r["target"] == "1" for r in rows)
    assert {r["original_label"] for r in rows} == {"0", "2"}
    assert all(r["path"].startswith("bird/") for r in rows)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["airplane", "bird", "cat", "dog"]
    assert not any((out / "airplane").iterdir()) and not any((out / "cat").iterdir())
    assert summary["test"] is True and summary["rate"] is None and summary["target_name"] == "bird"


def test_summary_json_records_the_settings(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = poison_folder(src, backdoor="badnets", out=out, rate=0.2, target="cat", seed=7, quiet=True)
    on_disk = json.loads((out / "poison.json").read_text())
    assert on_disk == summary
    assert summary["backdoor"] == "badnets" and summary["pattern"] is None
    assert summary["target"] == 2 and summary["target_name"] == "cat" and summary["seed"] == 7
    assert summary["rate"] == 0.2 and summary["image_size"] == [32, 32]
    assert summary["counts"]["poisoned"] == round(0.2 * 32) and summary["counts"]["poisoned_per_class"][2] == 0
    assert summary["data"] == str(src.resolve()) and summary["aabl_version"]


def test_target_by_name_or_index_string(src: Path, tmp_path: Path) -> None:
    poison_folder(src, backdoor="badnets", out=tmp_path / "a", target="bird", quiet=True)
    poison_folder(src, backdoor="badnets", out=tmp_path / "b", target="1", quiet=True)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert {r["target"] for r in read_rows(tmp_path / "a")} == {"1"}


@pytest.mark.parametrize("target", ["dog", 3, -1, "7", True])
def test_bad_target_names_the_classes(src: Path, tmp_path: Path, target: object) -> None:
    with pytest.raises(AablError, match="airplane, bird, cat"):
        poison_folder(src, backdoor="badnets", out=tmp_path / "out", target=target, quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, math.nan, 1.0, 0.01])
def test_bad_rate_is_refused(src: Path, tmp_path: Path, rate: float) -> None:
    with pytest.raises(AablError, match="--rate"):
        poison_folder(src, backdoor="badnets", out=tmp_path / "out", rate=rate, quiet=True)
    assert not (tmp_path / "out").exists()


def test_bad_backdoor_pattern_and_out_are_refused(src: Path, tmp_path: Path) -> None:
    with pytest.raises(AablError, match="badnets, blend"):
        poison_folder(src, backdoor="nope", out=tmp_path / "out")
    with pytest.raises(AablError, match="--pattern"):
        poison_folder(src, backdoor="blend", out=tmp_path / "out", pattern=str(tmp_path / "missing.png"))
    with pytest.raises(AablError, match="inside the source"):
        poison_folder(src, backdoor="badnets", out=src / "out")
    with pytest.raises(AablError, match="contains the source"):
        poison_folder(src, backdoor="badnets", out=tmp_path)
    assert not (tmp_path / "out").exists() and not (src / "out").exists()


def test_name_collisions_get_a_suffix(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a" / "b_x.png")  # clean file named like a poison
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "b" / "x.png")
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(src / "b" / "x.bmp")
    poison_folder(src, backdoor="badnets", out=tmp_path / "out", rate=2 / 3, quiet=True)
    paths = sorted(r["path"] for r in read_rows(tmp_path / "out"))
    assert paths == ["a/b_x-2.png", "a/b_x-3.png", "a/b_x.png"]
    assert (tmp_path / "out" / "a" / "b_x.png").read_bytes() == (src / "a" / "b_x.png").read_bytes()


@pytest.mark.parametrize("backdoor", sorted(a for a, spec in BACKDOORS.items() if spec.default_epochs is None))
def test_source_tree_is_untouched(src: Path, tmp_path: Path, backdoor: str) -> None:
    before = tree_hash(src)
    poison_folder(src, backdoor=backdoor, out=tmp_path / "out", quiet=True)
    poison_folder(src, backdoor=backdoor, out=tmp_path / "out", test=True, quiet=True)  # replaces the old output
    assert tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("where", ["copy", "trigger", "summary"])
def test_failure_midway_leaves_no_output(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         where: str) -> None:
    calls = []

    def boom(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if where != "copy" or len(calls) > 5:
            raise RuntimeError("disk on fire")
        return real_copy(*args, **kwargs)

    real_copy = shutil.copyfile
    target = {"copy": "aabl_cli.stages.poison.folder.shutil.copyfile",
              "trigger": "aabl_cli.stages.poison.backdoors.badnets_trigger",
              "summary": "aabl_cli.stages.poison.folder.write_json"}[where]
    monkeypatch.setattr(target, boom)
    before = tree_hash(src)
    with pytest.raises(RuntimeError, match="disk on fire"):
        poison_folder(src, backdoor="badnets", out=tmp_path / "out", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no temporary sibling
    assert tree_hash(src) == before


def test_the_cli_takes_the_backdoor_under_its_earlier_name_too(src: Path, tmp_path: Path) -> None:
    """`--backdoor` is the flag; `--attack`, its earlier name, still works (hidden from --help), and the two
    write the same bytes."""
    def poison_cli(*args: str):
        return CliRunner().invoke(cli, ["poison", str(src), *args, "--quiet", "--json"])

    new = poison_cli("--backdoor", "badnets", "--out", str(tmp_path / "new"))
    old = poison_cli("--attack", "badnets", "--out", str(tmp_path / "old"))
    assert new.exit_code == 0 and old.exit_code == 0, new.output + old.output
    assert json.loads(old.stdout)["backdoor"] == "badnets"
    assert tree_hash(tmp_path / "new") == tree_hash(tmp_path / "old")
    assert "--backdoor" in (help_text := CliRunner().invoke(cli, ["poison", "--help"]).output)
    assert "--attack" not in help_text
    both = poison_cli("--backdoor", "badnets", "--attack", "blend", "--out", str(tmp_path / "both"))
    assert both.exit_code == 2 and "disagree" in both.output
    neither = poison_cli("--out", str(tmp_path / "neither"))
    assert neither.exit_code == 2 and "Missing option '--backdoor'" in neither.output
    assert not (tmp_path / "both").exists() and not (tmp_path / "neither").exists()
