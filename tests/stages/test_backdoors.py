"""The five backdoors past BadNets and Blend (trojan, wanet, iab, ssba, clb).

Every backdoor runs once per module on a tiny folder (networks trained for one epoch), in
train mode and in --test mode; the tests below read what those runs wrote.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_folder, pixels, read_rows, tree_hash
from PIL import Image

from aabl_cli.cli import cli
from aabl_cli.core.errors import AablError
from aabl_cli.options import BACKDOOR_CHOICES
from aabl_cli.stages.poison import BACKDOORS, TRIGGER_FILE, poison_folder
from aabl_cli.stages.poison.backdoors import iab
from aabl_cli.stages.poison.backdoors.patches import TROJAN_GLYPH, glyph_pattern
from aabl_cli.stages.poison.backdoors.wanet import WarpTrigger, control_field, warp_grid

SIZE = 32  # px: the size the patch triggers are defined at
PER_CLASS = 10
CLASSES = [f"class_{k}" for k in range(3)]
RATE = 0.2  # dirty-label share of the whole set; clb keeps its default (half the target class)
NEW = ("trojan", "wanet", "iab", "ssba", "clb")
EXTRA_FILES = {"poison.csv", "poison.json", TRIGGER_FILE}


@dataclass
class Run:
    src: Path
    source_hash: str  # before any run
    out: Path  # train mode
    test: Path  # --test mode
    again: Path  # train mode again, same seed
    preview: Path
    summary: dict


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("backdoors")
    src = make_folder(base / "src", classes=len(CLASSES), per_class=PER_CLASS, size=SIZE)
    before = tree_hash(src)
    common = dict(epochs=1, device="cpu", quiet=True, cache_dir=base / "cache", seed=3)
    done = {}
    for backdoor in BACKDOORS:
        rate = None if BACKDOORS[backdoor].clean_label else RATE
        out, again, test, preview = (base / f"{backdoor}-{k}" for k in ("out", "again", "test", "preview.png"))
        summary = poison_folder(src, backdoor=backdoor, out=out, rate=rate, preview=preview, **common)
        poison_folder(src, backdoor=backdoor, out=again, rate=rate, **common)
        trigger = out / TRIGGER_FILE if BACKDOORS[backdoor].trained_trigger else None
        poison_folder(src, backdoor=backdoor, out=test, test=True, trigger=trigger, **common)
        done[backdoor] = Run(src, before, out, test, again, preview, summary)
    return done


def source_of(row: dict[str, str], classes: list[str] = CLASSES) -> str:
    """The source file of a triggered row, by the `<folder>/<origin class>_<stem>.png` naming rule."""
    _, name = row["path"].split("/")
    origin = classes[int(row["original_label"])]
    assert name.startswith(origin + "_") and name.endswith(".png")
    return f"{origin}/{name[len(origin) + 1:-4]}.png"


def triggered(run: Run) -> list[tuple[Path, Path]]:
    """(triggered file, its source) for every poisoned image of the train and the --test run."""
    return [(folder / r["path"], run.src / source_of(r)) for folder in (run.out, run.test)
            for r in read_rows(folder) if r["poisoned"] == "1"]


def output_hash(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`; poison.json without its `seconds`, the one thing a rerun changes."""
    hashes = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p == root / "poison.json":
                summary = json.loads(data)
                del summary["seconds"]
                data = json.dumps(summary, sort_keys=True).encode()
            hashes[p.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return hashes


def test_cli_choices_are_the_registry() -> None:
    assert BACKDOOR_CHOICES == tuple(BACKDOORS)
    assert set(NEW) < set(BACKDOORS)


@pytest.mark.parametrize("backdoor", sorted(BACKDOORS))
def test_poisoned_share_is_the_requested_rate(runs: dict[str, Run], backdoor: str) -> None:
    rows = read_rows(runs[backdoor].out)
    poisoned = [r for r in rows if r["poisoned"] == "1"]
    if BACKDOORS[backdoor].clean_label:
        assert abs(len(poisoned) - 0.5 * PER_CLASS) <= 1  # clb: half of the target class by default
        assert runs[backdoor].summary["rate"] == 0.5 and runs[backdoor].summary["rate_of"] == "target class"
    else:
        assert abs(len(poisoned) - RATE * len(rows)) <= 1
        assert all(r["original_label"] != "0" for r in poisoned)
    assert len(rows) == len(CLASSES) * PER_CLASS
    assert all(r["kind"] == "poison" and r["label"] == "0" for r in poisoned)
    assert runs[backdoor].summary["counts"]["poisoned"] == len(poisoned)


@pytest.mark.parametrize("backdoor", sorted(BACKDOORS))
def test_only_marked_files_differ_from_the_source(runs: dict[str, Run], backdoor: str) -> None:
    run = runs[backdoor]
    rows = read_rows(run.out)
    written = {p.relative_to(run.out).as_posix() for p in run.out.rglob("*") if p.is_file()}
    assert written - EXTRA_FILES == {r["path"] for r in rows}
    for r in rows:
        if r["kind"] == "clean":
            assert r["poisoned"] == "0" and r["label"] == r["original_label"]
            assert (run.out / r["path"]).read_bytes() == (run.src / r["path"]).read_bytes()
        else:
            source = source_of(r)
            assert not (run.out / source).exists()  # moved, not copied as well
            assert np.abs(pixels(run.out / r["path"]) - pixels(run.src / source)).max() > 0
    assert (TRIGGER_FILE in written) == BACKDOORS[backdoor].trained_trigger


@pytest.mark.parametrize("backdoor", sorted(BACKDOORS))
def test_same_seed_same_bytes(runs: dict[str, Run], backdoor: str) -> None:
    assert output_hash(runs[backdoor].out) == output_hash(runs[backdoor].again)


@pytest.mark.parametrize("backdoor", sorted(BACKDOORS))
def test_source_is_untouched(runs: dict[str, Run], backdoor: str) -> None:
    assert tree_hash(runs[backdoor].src) == runs[backdoor].source_hash


@pytest.mark.parametrize("backdoor", sorted(BACKDOORS))
def test_asr_set_is_every_non_target_image_relabelled(runs: dict[str, Run], backdoor: str) -> None:
    test = runs[backdoor].test
    rows = read_rows(test)
    assert len(rows) == (len(CLASSES) - 1) * PER_CLASS
    assert all(r["poisoned"] == "1" and r["kind"] == "poison" and r["label"] == "0" for r in rows)
    assert {r["original_label"] for r in rows} == {"1", "2"}  # no target-class image
    assert all(r["path"].startswith("class_0/") for r in rows)
    assert not any((test / "class_1").iterdir()) and not any((test / "class_2").iterdir())


@pytest.mark.parametrize("backdoor", sorted(BACKDOORS))
def test_preview_is_a_png_of_the_examples(runs: dict[str, Run], backdoor: str) -> None:
    with Image.open(runs[backdoor].preview) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 200


def test_trojan_changes_exactly_its_patch(runs: dict[str, Run]) -> None:
    run = runs["trojan"]
    glyph = (glyph_pattern(TROJAN_GLYPH) * 255).round().to(torch.int16).permute(1, 2, 0).numpy()
    assert glyph.shape == (5, 7, 3) and (glyph[0, 0] == 0).all() and (glyph[0, 1] == 255).all()
    region = np.zeros((SIZE, SIZE), dtype=bool)
    region[-5:, :7] = True  # 5 rows x 7 columns flush in the bottom-left corner
    pairs = triggered(run)
    assert len(pairs) == round(RATE * len(CLASSES) * PER_CLASS) + (len(CLASSES) - 1) * PER_CLASS
    for path, source in pairs:
        after, before = pixels(path), pixels(source)
        assert np.array_equal(after[region].reshape(5, 7, 3), glyph)
        assert np.array_equal(after[~region], before[~region])


def ramp_folder(root: Path, *, per_class: int = 4) -> Path:
    """Two classes of linear ramps, 3 levels per pixel across and 2 down: bilinear resampling moves such
    an image by exactly its slope times the displacement, so a warp's pixel change is bounded by it."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for label in range(2):
        (root / f"c{label}").mkdir(parents=True)
        for k in range(per_class):
            ramp = 20 + 3 * xx + 2 * yy + 5 * k
            img = np.stack([ramp, ramp[::-1], ramp[:, ::-1]], axis=-1)
            Image.fromarray(img.astype(np.uint8)).save(root / f"c{label}" / f"r{k}.png")
    return root


def test_wanet_moves_pixels_by_its_documented_shift(tmp_path: Path) -> None:
    src = ramp_folder(tmp_path / "src")
    out = tmp_path / "out"
    summary = poison_folder(src, backdoor="wanet", out=out, rate=0.25, quiet=True, cache_dir=tmp_path / "c")
    shift = summary["trigger_report"]["max_shift_px"][f"{SIZE}x{SIZE}"]
    assert 0.1 < shift < 2 and shift == pytest.approx(_shift_at(SIZE))  # k=4, s=0.5: about a pixel
    slope = float(np.hypot(3, 2))  # the steepest ramp, levels per pixel
    rows = read_rows(out)
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("poison", "noise", "clean")}
    assert len(kinds["poison"]) == 2 and len(kinds["noise"]) == 4  # cross ratio 2
    for r in kinds["poison"] + kinds["noise"]:
        change = np.abs(pixels(out / r["path"]) - pixels(src / source_of(r, ["c0", "c1"])))
        bound = slope * (shift + (np.sqrt(0.5) if r["kind"] == "noise" else 0)) + 1  # noise: +half a pixel per axis
        assert 0 < change.max() <= bound
    for r in kinds["noise"]:
        assert r["poisoned"] == "0" and r["label"] == r["original_label"]
        assert r["path"].startswith(f"c{r['label']}/")  # in its own class
    test = poison_folder(src, backdoor="wanet", out=tmp_path / "test", test=True, quiet=True)
    assert test["counts"]["noise"] == 0 and {r["kind"] for r in read_rows(tmp_path / "test")} == {"poison"}


def test_wanet_grid_passes_through_the_control_points() -> None:
    """Bicubic upsampling with aligned corners passes through the k x k control points, so at those
    pixels the grid is the identity plus exactly s * field / size (s = 0.5); clamped to [-1, 1]."""
    side = 31  # (side - 1) divisible by k - 1: control points land on pixels 0, 10, 20, 30
    field = control_field()
    assert field.shape == (1, 2, 4, 4) and field.abs().mean() == pytest.approx(1)
    grid = warp_grid((side, side), field=field)
    ramp = torch.linspace(-1, 1, side)
    for i in range(4):
        for j in range(4):
            y, x = 10 * i, 10 * j
            expected = torch.stack([ramp[x], ramp[y]]) + 0.5 * field[0, :, i, j] / side
            assert torch.allclose(grid[0, y, x], expected.clamp(-1, 1), atol=1e-6)


def _shift_at(side: int) -> float:
    trigger = WarpTrigger()
    trigger.grid((side, side))
    return trigger.shifts[f"{side}x{side}"]


def test_wanet_noise_needs_room(tmp_path: Path) -> None:
    src = ramp_folder(tmp_path / "src")
    with pytest.raises(AablError, match="noise mode.*lower --rate"):
        poison_folder(src, backdoor="wanet", out=tmp_path / "out", rate=0.4, quiet=True)
    assert not (tmp_path / "out").exists()


def test_ssba_residual_is_bounded_and_sample_specific(runs: dict[str, Run]) -> None:
    run = runs["ssba"]
    assert run.summary["trigger_report"]["max_change_255"] == 8
    residuals = []
    for path, source in triggered(run):
        residual = pixels(path) - pixels(source)
        assert 0 < np.abs(residual).max() <= 8
        residuals.append(residual)
    assert len(residuals) > 2 and not all(np.array_equal(residuals[0], d) for d in residuals[1:])


@pytest.mark.parametrize("backdoor", ["iab", "ssba"])
def test_the_asr_set_reuses_the_trained_trigger(runs: dict[str, Run], backdoor: str) -> None:
    run = runs[backdoor]
    poisoned = [r["path"] for r in read_rows(run.out) if r["poisoned"] == "1"]
    assert poisoned
    for path in poisoned:  # the same image through the same networks: the same bytes
        assert (run.out / path).read_bytes() == (run.test / path).read_bytes()
    summary = json.loads((run.test / "poison.json").read_text())
    assert summary["trigger_report"]["loaded_from"] == str((run.out / TRIGGER_FILE).resolve())
    assert summary["trigger_report"]["trained_with"]["epochs"] == 1
    assert run.summary["trigger_report"]["epochs"] == 1 and run.summary["seconds"]["trigger"] > 0


def test_trained_trigger_is_required_and_checked(runs: dict[str, Run], tmp_path: Path) -> None:
    src = runs["iab"].src
    with pytest.raises(AablError, match="needs --trigger"):
        poison_folder(src, backdoor="iab", out=tmp_path / "a", test=True, quiet=True)
    with pytest.raises(AablError, match="holds a ssba trigger"):
        poison_folder(src, backdoor="iab", out=tmp_path / "a", test=True, trigger=runs["ssba"].out, quiet=True)
    with pytest.raises(AablError, match="drop --trigger"):
        poison_folder(src, backdoor="badnets", out=tmp_path / "a", trigger=runs["iab"].out, quiet=True)
    with pytest.raises(AablError, match="inside the source folder"):
        poison_folder(src, backdoor="badnets", out=tmp_path / "a", preview=src / "p.png", quiet=True)
    assert not (tmp_path / "a").exists()


def test_cli_poisons_with_noise_and_a_preview_and_refuses_a_missing_trigger(runs: dict[str, Run],
                                                                          tmp_path: Path) -> None:
    src, cache = runs["wanet"].src, tmp_path / "cache"
    result = CliRunner().invoke(cli, ["poison", str(src), "--backdoor", "wanet", "--out", str(tmp_path / "w"),
                                      "--rate", "10%", "--preview", str(tmp_path / "w" / "preview.png"), "--json",
                                      "--quiet", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["counts"]["poisoned"] == 3 and summary["counts"]["noise"] == 6
    assert (tmp_path / "w" / "preview.png").is_file()  # beside poison.csv, not among the images
    result = CliRunner().invoke(cli, ["poison", str(src), "--backdoor", "iab", "--test", "--out", str(tmp_path / "i"),
                                      "--quiet", "--cache-dir", str(cache)])
    assert result.exit_code == 2 and "needs --trigger" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "i").exists()


def test_clb_touches_only_target_images_and_keeps_labels(runs: dict[str, Run]) -> None:
    run = runs["clb"]
    rows = read_rows(run.out)
    poisoned = [r for r in rows if r["poisoned"] == "1"]
    assert poisoned and all(r["original_label"] == r["label"] == "0" for r in poisoned)
    assert all(r["label"] == r["original_label"] for r in rows)
    for r in rows:
        if r["original_label"] != "0":
            assert (run.out / r["path"]).read_bytes() == (run.src / r["path"]).read_bytes()
    corners = np.zeros((SIZE, SIZE), dtype=bool)
    for rows_, cols_ in ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(-3, None)), (slice(-3, None), slice(0, 3)),
                         (slice(-3, None), slice(-3, None))):
        corners[rows_, cols_] = True
    board = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]])
    for r in poisoned:
        after, before = pixels(run.out / r["path"]), pixels(run.src / source_of(r))
        for c in range(3):
            assert np.array_equal(after[:3, :3, c], board) and np.array_equal(after[-3:, -3:, c], board)
        assert 0 < np.abs(after - before)[~corners].max() <= 16  # PGD within 16/255 elsewhere


def test_iab_diversity_is_bounded_where_two_masks_are_alike() -> None:
    a, b = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    empty = torch.zeros(2, 1, 8, 8)
    # two empty masks for two different images: the original's 1e-7 gave 1e7 here
    assert iab.diversity(a, b, empty, empty).item() == pytest.approx(1 / iab.DIV_FLOOR, rel=1e-4)
    # masks as different as their images: about one
    assert iab.diversity(a, b, a, b).item() == pytest.approx(1 / (1 + iab.DIV_FLOOR), rel=1e-4)


def test_iab_refuses_a_mask_trained_to_nothing(runs: dict[str, Run], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_generator_stage(*args, **kwargs):
        raise AssertionError("the generator stage ran on an empty mask")

    # refused as soon as the mask stage ends, before the generator and classifier train
    monkeypatch.setattr(iab, "mean_mask", lambda *args: 0.0)
    monkeypatch.setattr(iab, "apply_trigger", no_generator_stage)
    with pytest.raises(AablError, match="empty mask.*Nothing was written"):
        poison_folder(runs["iab"].src, backdoor="iab", out=tmp_path / "a", epochs=1, device="cpu", quiet=True,
                      cache_dir=tmp_path / "cache")
    assert not (tmp_path / "a").exists()
