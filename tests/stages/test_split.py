"""split: the threshold rules, the verdict, checking scores.csv, and the kept/isolated folders."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_folder, tree_hash, write_fake_scan
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import aabl_cli.stages.split as split_mod
from aabl_cli.cli import cli
from aabl_cli.core.errors import AablError
from aabl_cli.core.threshold import choose_isolated
from aabl_cli.stages.split import class_verdict, describe, read_scores, split, split_settings, wilson_lower

SPLIT_COLUMNS = ["index", "path", "label", "score", "kept"]


def _bimodal(low: int, high: int, seed: int = 0) -> np.ndarray:
    """`low` robust scores near 0.01, then `high` vulnerable ones near 5, shuffled."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(0.005, 0.02, low), rng.uniform(4.0, 6.0, high)])


# ---------------------------------------------------------------- choose_isolated


def test_otsu_isolates_exactly_the_low_mode():
    scores = _bimodal(12, 48)
    perm = np.random.default_rng(1).permutation(60)
    scores = scores[perm]
    isolated, t = choose_isolated(scores, method="otsu", min_isolated=0.10)
    assert isolated.dtype == bool and isolated.shape == (60,)
    assert np.array_equal(isolated, perm < 12)
    assert 0.02 < t <= 4.0


@pytest.mark.parametrize(("n_low", "n", "min_isolated", "expected"),
                         [(2, 50, 0.10, 5), (1, 33, 0.10, 4), (3, 40, 0.25, 10), (1, 30, 0.10, 3)])
def test_otsu_floor_isolates_ceil_min_isolated_times_n(n_low, n, min_isolated, expected):
    scores = _bimodal(n_low, n - n_low)
    assert expected == math.ceil(min_isolated * n)
    isolated, t = choose_isolated(scores, method="otsu", min_isolated=min_isolated)
    assert isolated.sum() == expected
    # the floor takes the lowest scores, and the threshold separates them from the rest
    assert scores[isolated].max() <= scores[~isolated].min()
    assert scores[isolated].max() <= t <= scores[~isolated].min()


def test_otsu_without_floor_is_pure_otsu():
    scores = _bimodal(2, 48)
    isolated, _ = choose_isolated(scores, method="otsu", min_isolated=0.0)
    assert np.array_equal(isolated, np.arange(50) < 2)


def test_otsu_isolates_more_than_the_floor_when_the_low_mode_is_bigger():
    scores = _bimodal(20, 30)
    isolated, _ = choose_isolated(scores, method="otsu", min_isolated=0.10)
    assert isolated.sum() == 20


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=200),
       min_isolated=st.sampled_from([0.0, 0.05, 0.1, 0.3]))
def test_otsu_isolates_a_lowest_block_of_at_least_the_floor(scores, min_isolated):
    scores = np.array(scores)
    isolated, _ = choose_isolated(scores, method="otsu", min_isolated=min_isolated)
    assert isolated.sum() >= math.ceil(min_isolated * len(scores) - 1e-9)
    if isolated.any() and (~isolated).any():
        assert scores[isolated].max() <= scores[~isolated].min()


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=100),
       fraction=st.floats(0, 1))
def test_quantile_isolates_round_fraction_n_lowest(scores, fraction):
    scores = np.array(scores)
    isolated, _ = choose_isolated(scores, method="quantile", fraction=fraction)
    assert isolated.sum() == round(fraction * len(scores))
    if isolated.any() and (~isolated).any():
        assert scores[isolated].max() <= scores[~isolated].min()


def test_quantile_isolates_the_lowest_fraction_ties_in_dataset_order():
    scores = np.array([5.0, 1.0, 3.0, 1.0, 1.0, 9.0, 7.0, 2.0, 8.0, 6.0])
    isolated, t = choose_isolated(scores, method="quantile", fraction=0.2)
    assert np.flatnonzero(isolated).tolist() == [1, 3]  # the third 1.0 (index 4) loses the tie
    isolated, t = choose_isolated(scores, method="quantile", fraction=0.4)
    assert np.flatnonzero(isolated).tolist() == [1, 3, 4, 7]
    assert 2.0 < t < 3.0
    isolated, _ = choose_isolated(scores, method="quantile", fraction=0.0)
    assert not isolated.any()
    isolated, _ = choose_isolated(scores, method="quantile", fraction=1.0)
    assert isolated.all()


def test_fixed_threshold_isolates_scores_below_it():
    scores = np.array([0.5, 1.0, 1.5, 2.0, 0.99])
    isolated, t = choose_isolated(scores, method="fixed", threshold=1.0)
    assert isolated.tolist() == [True, False, False, False, True]
    assert t == 1.0


# ---------------------------------------------------------------- class_verdict


def test_verdict_backdoor_suspected_for_one_class():
    labels = np.repeat(np.arange(3), 100)
    scores = np.linspace(1.0, 2.0, 300)
    isolated = np.zeros(300, dtype=bool)
    isolated[100:120] = True  # twenty samples, all of class 1
    verdict = class_verdict(labels, scores, isolated, ["a", "b", "c"], cores=(0.1,), core_min=1)
    assert verdict["verdict"] == "backdoor suspected"
    assert verdict["suspected_class"] == "b" and verdict["suspected_label"] == 1
    assert verdict["concentration"] == pytest.approx(1.0)
    assert 0.5 <= verdict["concentration_low"] < 1.0
    assert verdict["core_size"] == 20
    row = verdict["per_class"][1]
    assert row == {"class": "b", "samples": 100, "isolated": 20, "core": 20, "share_of_data": pytest.approx(1 / 3),
                   "share_of_isolated": pytest.approx(1.0), "share_of_core": pytest.approx(1.0),
                   "isolated_share": pytest.approx(0.2)}


def test_verdict_one_class_from_too_few_samples_is_not_evidence():
    # six isolated samples of one class: all of the core, but six draws could be chance
    labels = np.repeat(np.arange(3), 20)
    isolated = np.zeros(60, dtype=bool)
    isolated[20:26] = True
    verdict = class_verdict(labels, np.ones(60), isolated, ["a", "b", "c"], cores=(0.1,), core_min=1)
    assert verdict["concentration"] == pytest.approx(1.0) and verdict["suspected_class"] == "b"
    assert verdict["concentration_low"] < 0.5 and verdict["verdict"] == "no backdoor evidence"


def test_verdict_no_evidence_when_spread_like_the_data():
    labels = np.repeat(np.arange(3), 20)
    isolated = np.zeros(60, dtype=bool)
    isolated[[0, 1, 20, 21, 40, 41]] = True
    verdict = class_verdict(labels, np.ones(60), isolated, ["a", "b", "c"], cores=(0.1,), core_min=1)
    assert verdict["verdict"] == "no backdoor evidence"
    assert verdict["concentration"] == pytest.approx(0.0, abs=1e-9)
    assert [r["isolated"] for r in verdict["per_class"]] == [2, 2, 2]


def test_verdict_uses_class_shares_not_raw_counts():
    # class 0 is 80 % of the data; isolating 80 % from it is what chance gives: no evidence
    labels = np.array([0] * 80 + [1] * 10 + [2] * 10)
    isolated = np.zeros(100, dtype=bool)
    isolated[[0, 1, 2, 3, 4, 5, 6, 7, 80, 90]] = True
    verdict = class_verdict(labels, np.ones(100), isolated, ["big", "b", "c"], cores=(0.1,), core_min=1)
    assert verdict["verdict"] == "no backdoor evidence"


def test_verdict_reads_the_most_robust_core_of_the_isolated_set():
    # 1,000 samples per class. The isolated set holds 150 poisons of class 2 at scores near 0
    # and, above them, 300 naturally robust samples of each class: over the whole isolated
    # set class 2 barely stands out, in the 5 % core it is most of what is there.
    labels = np.repeat(np.arange(4), 1000)
    scores = np.full(4000, 9.0)
    isolated = np.zeros(4000, dtype=bool)
    robust = np.concatenate([np.arange(c * 1000, c * 1000 + 300) for c in range(4)])
    scores[robust] = np.random.default_rng(0).uniform(1.0, 2.0, len(robust))
    isolated[robust] = True
    scores[2300:2450] = 0.001
    isolated[2300:2450] = True
    whole = class_verdict(labels, scores, isolated, ["a", "b", "c", "d"], cores=(1.0,))
    assert whole["core_size"] == 1350 and whole["verdict"] == "no backdoor evidence"
    core = class_verdict(labels, scores, isolated, ["a", "b", "c", "d"], cores=(0.05,))
    assert core["core_size"] == 200
    assert core["verdict"] == "backdoor suspected" and core["suspected_class"] == "c"
    assert core["per_class"][2]["core"] >= 150 and core["per_class"][2]["isolated"] == 450
    assert 0.5 <= core["concentration_low"] < core["concentration"]


def _core_of(share: float, size: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced labels whose `size`-sample core is `share` class 0, the rest spread evenly."""
    labels = np.repeat(np.arange(classes), size)
    scores = np.full(len(labels), 9.0)
    top = round(share * size)
    rest = np.array_split(np.arange(size - top), classes - 1)
    chosen = list(range(top)) + [c * size + i for c, part in enumerate(rest, start=1) for i in range(len(part))]
    scores[chosen] = 0.5
    return labels, scores, scores < 1


@pytest.mark.parametrize("size, expected", [(200, "no backdoor evidence"), (2000, "backdoor suspected")])
def test_verdict_needs_confidence_on_a_small_core(size, expected):
    # A core share of 0.6 against a data share of 0.1 is a concentration of 0.56, just over
    # the 0.5 threshold. From 200 images that is within chance (CIFAR-10 Blend's naturally
    # robust ship class reached 0.52 on 4,000 images); from 2,000 it is not.
    labels, scores, isolated = _core_of(0.6, size)
    verdict = class_verdict(labels, scores, isolated, [str(c) for c in range(10)], cores=(0.1,), core_min=1)
    assert verdict["core_size"] == size and verdict["suspected_class"] == "0"
    assert verdict["concentration"] == pytest.approx((0.6 - 0.1) / 0.9, abs=1e-9)
    assert verdict["concentration_low"] < verdict["concentration"]
    assert verdict["verdict"] == expected


def test_wilson_lower_bound():
    assert wilson_lower(0, 0, 1.96) == 0.0
    assert wilson_lower(0, 10, 1.96) == 0.0
    # the textbook 95 % interval for 8 of 10 is (0.490, 0.943)
    assert wilson_lower(8, 10, 1.96) == pytest.approx(0.490, abs=1e-3)
    assert wilson_lower(50, 50, 1.645) == pytest.approx(50 / (50 + 1.645 ** 2))


def test_verdict_with_nothing_isolated():
    labels = np.repeat(np.arange(2), 5)
    verdict = class_verdict(labels, np.ones(10), np.zeros(10, dtype=bool), ["a", "b"])
    assert verdict["verdict"] == "no backdoor evidence" and verdict["concentration"] == 0.0
    assert verdict["core_size"] == 0


def test_verdict_core_has_a_minimum_size():
    # 5 % of 1,000 samples is 50, too few to judge: the core takes the 100 most robust isolated
    labels = np.repeat(np.arange(2), 500)
    scores = np.arange(1000, dtype=float)
    isolated = scores < 600
    verdict = class_verdict(labels, scores, isolated, ["a", "b"], cores=(0.05,))
    assert verdict["core_size"] == 100
    assert verdict["per_class"][0]["core"] == 100 and verdict["suspected_class"] == "a"
    assert class_verdict(labels, scores, scores < 10, ["a", "b"])["core_size"] == 10  # all isolated


def _scan_like(*, robust: tuple[int, ...] = (), poison: int = 0, target: int = 0, classes: int = 10,
               per_class: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores shaped like a real scan's (benchmarks/VERDICT_CHECK.md), in log10 units.

    Clean images spread over (-2.5, 1] with most near the top; naturally robust classes shift
    their whole class down over the same range (no cluster below it); `poison` extra images of
    `target` spread evenly per decade from 1e-5 to 1e-1, as a patch trigger's learnt poisons do.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    log = 1 - 3.5 * rng.beta(1.5, 4.0, len(labels))
    for c in robust:
        log[labels == c] = 1 - 3.5 * rng.beta(3.0, 3.0, per_class)
    labels = np.concatenate([labels, np.full(poison, target)])
    log = np.concatenate([log, rng.uniform(-5, -1, poison)])
    return labels, 10.0 ** log


def _verdict_of(labels: np.ndarray, scores: np.ndarray) -> dict:
    isolated, _ = choose_isolated(scores, method="otsu")
    return class_verdict(labels, scores, isolated, [str(c) for c in range(labels.max() + 1)])


def test_verdict_clean_set_with_naturally_robust_classes_is_not_suspected():
    # three classes (ship, automobile, truck on CIFAR-10) shift down as a whole and share the bottom
    verdict = _verdict_of(*_scan_like(robust=(1, 8, 9)))
    assert verdict["suspected_class"] in {"1", "8", "9"}
    assert verdict["concentration_low"] < 0.5 and verdict["verdict"] == "no backdoor evidence"


@pytest.mark.parametrize("rate, per_class", [(0.01, 2000), (0.05, 1000)])  # 200 and 500 poisons
@pytest.mark.parametrize("target", [4, 8])  # a plain class, and one of the naturally robust ones
def test_verdict_names_a_patch_backdoor_target(rate, per_class, target):
    labels, scores = _scan_like(robust=(1, 8, 9), poison=round(rate * 10 * per_class), target=target,
                                per_class=per_class)
    verdict = _verdict_of(labels, scores)
    assert verdict["verdict"] == "backdoor suspected"
    assert verdict["suspected_class"] == str(target) and verdict["concentration_low"] >= 0.5


def test_verdict_reads_several_cores():
    # GTSRB-like: the poison fills the bottom 0.5 %, the naturally robust classes crowd the 5 % core
    labels, scores = _scan_like(robust=(1, 2, 3, 5, 6, 7), poison=150, target=0)
    isolated, _ = choose_isolated(scores, method="otsu")
    names = [str(c) for c in range(10)]
    assert class_verdict(labels, scores, isolated, names, cores=(0.05,))["verdict"] == "no backdoor evidence"
    verdict = class_verdict(labels, scores, isolated, names)
    assert verdict["verdict"] == "backdoor suspected" and verdict["suspected_class"] == "0"
    assert verdict["core_size"] < 0.05 * len(labels)
    assert [c["size"] for c in verdict["cores"]] == [100, 102, 203, 508]
    assert verdict["cores"][-1]["concentration_low"] < 0.5 <= verdict["concentration_low"]


@pytest.mark.parametrize("poison, expected", [(80, "backdoor suspected"), (20, "no backdoor evidence")])
def test_verdict_on_a_small_set(poison, expected):
    # 500 clean images: every core is the 100-image minimum, which 20 poisons cannot fill
    labels, scores = _scan_like(poison=poison, target=1, per_class=50)
    verdict = _verdict_of(labels, scores)
    assert verdict["verdict"] == expected and [c["size"] for c in verdict["cores"]] == [100]
    assert verdict["suspected_class"] == "1"


def test_verdict_with_one_class():
    labels, scores = _scan_like(classes=1, poison=100)
    verdict = _verdict_of(labels, scores)
    assert verdict["verdict"] == "no backdoor evidence" and verdict["concentration_low"] == 0.0
    assert verdict["suspected_class"] == "0"


def test_verdict_ties_do_not_fill_a_core_in_dataset_order():
    # every score equal and the folder sorted class by class: no class may fill a core
    labels = np.repeat(np.arange(10), 100)
    verdict = class_verdict(labels, np.zeros(1000), np.ones(1000, dtype=bool), [str(c) for c in range(10)])
    assert verdict["verdict"] == "no backdoor evidence"
    assert verdict["concentration"] == pytest.approx(0.0, abs=1e-9)
    assert [r["core"] for r in verdict["per_class"]] == [verdict["core_size"] // 10] * 10


def test_verdict_false_alarm_rate_at_the_boundary():
    # A class that holds exactly half of the room in every core (0.55 of each core against a 0.1 data
    # share) is the boundary of "no evidence": it may be called suspected at most 5 % of the time.
    rng = np.random.default_rng(0)
    alarms = 0
    for _ in range(200):
        labels = rng.integers(1, 10, 2000)
        bottom = np.flatnonzero(rng.random(200) < 0.55)
        labels[bottom] = 0
        labels[200:][rng.random(1800) < (200 - len(bottom)) / 1800] = 0  # class 0 is 10 % of the data
        verdict = class_verdict(labels, np.arange(2000.0), np.ones(2000, dtype=bool), [str(c) for c in range(10)])
        alarms += verdict["verdict"] == "backdoor suspected"
    assert alarms <= 0.05 * 200


# ---------------------------------------------------------------- read_scores


@pytest.fixture
def scanned(tiny_data: Path, tmp_path: Path) -> Path:
    """A hand-written scan of tiny_data with bimodal scores; returns scores.csv."""
    return write_fake_scan(tmp_path / "work", tiny_data, _bimodal(6, 30, seed=2))


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])


def test_read_scores_round_trip(scanned, tiny_data):
    scan, paths, labels, scores = read_scores(scanned)
    assert len(paths) == 36 and paths[0] == "class_0/img_000.png"
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    assert scores.dtype == np.float64
    assert scores.tolist() == pytest.approx(_bimodal(6, 30, seed=2).tolist(), rel=1e-8)
    assert Path(scan["data"]) == tiny_data.resolve()


def test_read_scores_accepts_edited_score_values(scanned):
    header, rows = _rows(scanned)
    rows[7][header.index("score")] = "123.5"
    _write(scanned, header, rows)
    _, _, _, scores = read_scores(scanned)
    assert scores[7] == 123.5


def _truncated(header, rows):
    return header, rows[:-1]


def _truncated_mid_row(header, rows):
    return header, rows[:-1] + [rows[-1][:2]]


def _duplicated_row(header, rows):
    return header, rows + [rows[3]]


def _duplicated_path(header, rows):
    rows = [r[:] for r in rows]
    rows[5][1] = rows[4][1]
    return header, rows


def _swapped_rows(header, rows):
    rows = rows[:]
    rows[2], rows[9] = rows[9], rows[2]
    return header, rows


def _swapped_and_renumbered(header, rows):
    rows = [r[:] for r in rows]
    rows[2], rows[9] = rows[9], rows[2]
    for i, r in enumerate(rows):
        r[0] = str(i)
    return header, rows


def _row_dropped_and_renumbered(header, rows):
    rows = [r[:] for r in rows[:10] + rows[11:]]
    for i, r in enumerate(rows):
        r[0] = str(i)
    return header, rows


def _no_score_column(header, rows):
    k = header.index("score")
    return header[:k] + header[k + 1:], [r[:k] + r[k + 1:] for r in rows]


def _no_path_column(header, rows):
    k = header.index("path")
    return header[:k] + header[k + 1:], [r[:k] + r[k + 1:] for r in rows]


def _nonfinite(value):
    def edit(header, rows):
        rows = [r[:] for r in rows]
        rows[4][header.index("score")] = value
        return header, rows
    return edit


def _bad_label(header, rows):
    rows = [r[:] for r in rows]
    rows[0][header.index("label")] = "7"
    return header, rows


@pytest.mark.parametrize("edit", [_truncated, _truncated_mid_row, _duplicated_row, _duplicated_path, _swapped_rows,
                                  _swapped_and_renumbered, _row_dropped_and_renumbered, _no_score_column,
                                  _no_path_column, _nonfinite("nan"), _nonfinite("inf"), _nonfinite("-inf"),
                                  _nonfinite("abc"), _bad_label],
                         ids=lambda f: getattr(f, "__name__", "nonfinite"))
def test_read_scores_refuses_damaged_files(scanned, edit):
    header, rows = _rows(scanned)
    _write(scanned, *edit(header, rows))
    with pytest.raises(AablError) as info:
        read_scores(scanned)
    assert str(scanned) in str(info.value)


def test_read_scores_refuses_empty_file(scanned):
    scanned.write_text("")
    with pytest.raises(AablError, match="lacks the column"):
        read_scores(scanned)


def test_read_scores_refuses_a_changed_dataset(scanned, tiny_data):
    target = tiny_data / "class_1" / "img_004.png"
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(AablError, match="does not match the images"):
        read_scores(scanned)


def test_read_scores_refuses_a_deleted_image(scanned, tiny_data):
    (tiny_data / "class_2" / "img_000.png").unlink()
    with pytest.raises(AablError, match="cannot be read"):
        read_scores(scanned)


def test_read_scores_needs_scan_json(scanned):
    scanned.with_name("scan.json").unlink()
    with pytest.raises(AablError, match="scan.json"):
        read_scores(scanned)


def test_read_scores_missing_file(tmp_path):
    with pytest.raises(AablError, match="aabl scan"):
        read_scores(tmp_path / "nope.csv")


# ---------------------------------------------------------------- split outputs


def _files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if not p.is_dir()}


def test_split_writes_kept_isolated_csv_and_json(scanned, tiny_data, tmp_path):
    before = tree_hash(tiny_data)
    work = tmp_path / "work"
    summary = split(workdir=work)
    out = work / "split"
    classes = ["class_0", "class_1", "class_2"]
    for tree in ("kept", "isolated"):
        assert sorted(p.name for p in (out / tree).iterdir()) == classes
    kept, isolated = _files(out / "kept"), _files(out / "isolated")
    _, paths, _, scores = read_scores(scanned)
    assert kept.isdisjoint(isolated) and kept | isolated == set(paths)
    assert isolated == set(paths[:6])  # the six low scores belong to class_0's first six files
    for rel in paths:
        tree = "kept" if rel in kept else "isolated"
        assert (out / tree / rel).read_bytes() == (tiny_data / rel).read_bytes()

    header, rows = _rows(out / "split.csv")
    assert header == SPLIT_COLUMNS
    assert [r[1] for r in rows] == paths and [int(r[0]) for r in rows] == list(range(36))
    assert {r[1] for r in rows if r[4] == "1"} == kept
    assert [float(r[3]) for r in rows] == pytest.approx(scores.tolist(), rel=1e-8)

    saved = json.loads((out / "split.json").read_text())
    assert saved["samples"] == 36 and saved["kept"] == 30 and saved["isolated"] == 6
    assert saved["kept_share"] == pytest.approx(30 / 36)
    # all six isolated images are class_0, but six draws cannot show a concentration of 0.5
    assert saved["suspected_class"] == "class_0" and saved["concentration"] == pytest.approx(1.0)
    assert saved["concentration_low"] < 0.5 and saved["verdict"] == "no backdoor evidence"
    assert saved["settings"]["method"] == "otsu" and saved["settings"]["min_isolated"] == 0.10
    assert saved["dataset_fingerprint"] == json.loads(scanned.with_name("scan.json").read_text())[
        "dataset_fingerprint"]
    assert "ground_truth" not in saved
    assert summary["kept"] == 30 and summary["gates"] == []
    assert tree_hash(tiny_data) == before


@pytest.mark.parametrize(("key", "acc", "warned"), [("acc", 0.35, True), ("acc", 0.9, False), ("acc", None, False),
                                                   ("clean_acc", 0.35, True)])  # an earlier version's name
def test_split_warns_when_the_naive_model_did_not_fit(scanned, tmp_path, key, acc, warned):
    scan_json = scanned.with_name("scan.json")
    scan = json.loads(scan_json.read_text())
    if acc is not None:
        scan[key] = acc
    scan_json.write_text(json.dumps(scan))
    summary = split(workdir=tmp_path / "work", link="none")
    assert bool(summary["warnings"]) is warned
    assert json.loads((tmp_path / "work" / "split" / "split.json").read_text())["warnings"] == summary["warnings"]
    text = describe(summary)
    assert ("warning: the naive model classifies only 35% of its own training images" in text) is warned
    assert ("more --epochs" in text) is warned


def test_split_reads_the_scan_json_of_an_earlier_version(scanned, tmp_path):
    """A scan.json written before the dataset folder was named `data` names it `dataset_root`."""
    scan_json = scanned.with_name("scan.json")
    scan = json.loads(scan_json.read_text())
    scan["dataset_root"] = scan.pop("data")
    scan_json.write_text(json.dumps(scan))
    summary = split(workdir=tmp_path / "work", link="none")
    assert summary["data"] == scan["dataset_root"] and summary["isolated"] == 6


def test_split_records_exactly_its_settings_function(scanned, tmp_path):
    summary = split(workdir=tmp_path / "work", method="quantile", fraction=0.25, link="none", fail_over=0.9)
    assert summary["settings"] == split_settings(method="quantile", fraction=0.25, threshold=None, min_isolated=0.1,
                                                 link="none", fail_over=0.9, fail_on_suspect=False)
    assert summary["settings"]["min_isolated"] is None  # Otsu's floor means nothing to a quantile
    assert summary["isolated_share"] == pytest.approx(9 / 36) and summary["kept_share"] == pytest.approx(27 / 36)
    assert set(summary["seconds"]) == {"total"}


def test_split_again_replaces_the_old_output(scanned, tmp_path):
    work = tmp_path / "work"
    split(workdir=work)
    split(workdir=work, method="quantile", fraction=0.5, link="none")
    _, rows = _rows(work / "split" / "split.csv")
    assert sum(r[4] == "0" for r in rows) == 18
    assert not _files(work / "split" / "kept")  # the old copies are gone
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split"]  # no temporary folders left


def test_failed_split_leaves_the_previous_output(scanned, tmp_path, monkeypatch):
    work = tmp_path / "work"
    split(workdir=work)
    before = tree_hash(work / "split")
    real = split_mod.write_image_folder

    def fail_half_way(out, root, paths, *, link="copy"):
        real(out, root, list(paths)[:3], link=link)
        raise OSError("disk unplugged")

    monkeypatch.setattr(split_mod, "write_image_folder", fail_half_way)
    with pytest.raises(OSError, match="unplugged"):
        split(workdir=work, method="quantile", fraction=0.5)
    assert tree_hash(work / "split") == before
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split"]


def test_split_with_ground_truth_reports_rho_precision_recall(tiny_data, tmp_path):
    paths = sorted(p.relative_to(tiny_data).as_posix() for p in tiny_data.rglob("*.png"))
    poisoned = {f"class_0/img_00{i}.png" for i in range(5)}  # 5 poisons ...
    low = {f"class_0/img_00{i}.png" for i in range(4)} | {"class_1/img_000.png"}  # ... 4 of them caught, 1 clean
    scores = [0.01 if p in low else 5.0 + 0.01 * i for i, p in enumerate(paths)]
    write_fake_scan(tmp_path / "work", tiny_data, scores)
    with open(tiny_data / "poison.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "poisoned", "kind", "original_label", "label", "attack", "target"])
        for p in paths:
            label = int(p.split("/")[0][-1])
            writer.writerow([p, int(p in poisoned), "poison" if p in poisoned else "clean",
                             (label + 1) % 3 if p in poisoned else label, label, "badnets", 0])
    summary = split(workdir=tmp_path / "work")
    truth = summary["ground_truth"]
    assert summary["isolated"] == 5
    assert truth["poisoned"] == 5
    assert truth["rho"] == pytest.approx(5 / 36)
    assert truth["rho_vul"] == pytest.approx(1 / 31)
    assert truth["precision"] == pytest.approx(4 / 5)
    assert truth["recall"] == pytest.approx(4 / 5)
    header, rows = _rows(tmp_path / "work" / "split" / "split.csv")
    assert header == SPLIT_COLUMNS + ["poisoned"]
    assert {r[1] for r in rows if r[5] == "1"} == poisoned
    saved = json.loads((tmp_path / "work" / "split" / "split.json").read_text())
    assert saved["ground_truth"]["rho_vul"] == pytest.approx(1 / 31)


def test_link_none_writes_only_the_tables(scanned, tmp_path):
    work = tmp_path / "work"
    split(workdir=work, link="none")
    out = work / "split"
    assert _files(out) == {"split.csv", "split.json"}
    for tree in ("kept", "isolated"):
        assert sorted(p.name for p in (out / tree).iterdir()) == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_link_modes_share_the_source_files(scanned, tiny_data, tmp_path, link):
    before = tree_hash(tiny_data)
    work = tmp_path / "work"
    split(workdir=work, link=link)
    files = [p for tree in ("kept", "isolated") for p in (work / "split" / tree).rglob("*.png")]
    assert len(files) == 36
    for f in files:
        rel = f.relative_to(f.parents[1]).as_posix()
        assert os.path.samefile(f, tiny_data / rel)
        assert f.is_symlink() == (link == "symlink")
    assert tree_hash(tiny_data) == before


def test_copy_is_independent_of_the_source(scanned, tiny_data, tmp_path):
    work = tmp_path / "work"
    split(workdir=work)
    copy = work / "split" / "kept" / "class_2" / "img_005.png"
    assert not copy.is_symlink() and not os.path.samefile(copy, tiny_data / "class_2" / "img_005.png")
    before = tree_hash(tiny_data)
    Image.new("RGB", (16, 16)).save(copy)  # editing the copy leaves the source alone
    assert tree_hash(tiny_data) == before


def test_split_option_errors(scanned, tmp_path):
    with pytest.raises(AablError, match="--fraction"):
        split(workdir=tmp_path / "work", method="quantile")
    with pytest.raises(AablError, match="--threshold"):
        split(workdir=tmp_path / "work", method="fixed")
    with pytest.raises(AablError, match="aabl scan"):
        split(workdir=tmp_path / "elsewhere")
    assert not (tmp_path / "work" / "split").exists()


def test_split_lists_skipped_files_from_the_scan(scanned, tmp_path):
    scan_json = scanned.with_name("scan.json")
    scan = json.loads(scan_json.read_text())
    scan["skipped"] = [{"path": "class_0/broken.png", "reason": "not a readable image"}]
    scan_json.write_text(json.dumps(scan))
    split(workdir=tmp_path / "work")
    saved = json.loads((tmp_path / "work" / "split" / "split.json").read_text())
    assert saved["skipped"] == scan["skipped"]


# ---------------------------------------------------------------- CI gates through the CLI


def _split_cli(work: Path, *args: str):
    return CliRunner().invoke(cli, ["split", "--workdir", str(work), *args])


def test_fail_over_gate_exits_3_after_writing_everything(scanned, tmp_path):
    work = tmp_path / "work"
    result = _split_cli(work, "--fail-over", "0.05")
    assert result.exit_code == 3, result.output
    assert "gate failed" in result.output and "--fail-over" in result.output
    out = work / "split"
    assert (out / "split.csv").is_file() and (out / "split.json").is_file()
    assert len(_files(out / "kept")) + len(_files(out / "isolated")) == 36
    assert json.loads((out / "split.json").read_text())["gates"]


def test_fail_over_gate_passes_below_the_share(scanned, tmp_path):
    result = _split_cli(tmp_path / "work", "--fail-over", "50%", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet: nothing but errors
    assert json.loads((tmp_path / "work" / "split" / "split.json").read_text())["gates"] == []


def test_fail_on_suspect_gate(tmp_path):
    data = make_folder(tmp_path / "data", per_class=40)
    scores = np.linspace(5.0, 6.0, 120)
    scores[:30] = np.linspace(0.001, 0.01, 30)  # thirty of class_0's forty images
    write_fake_scan(tmp_path / "work", data, scores)
    result = _split_cli(tmp_path / "work", "--fail-on-suspect", "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["verdict"] == "backdoor suspected" and len(summary["gates"]) == 1
    assert (tmp_path / "work" / "split" / "split.json").is_file()


def test_fail_on_suspect_passes_without_evidence(tiny_data, tmp_path):
    scores = np.linspace(5.0, 6.0, 36)
    scores[[0, 12, 24, 1, 13, 25]] = 0.01  # two per class: spread like the data
    write_fake_scan(tmp_path / "work", tiny_data, scores)
    result = _split_cli(tmp_path / "work", "--fail-on-suspect")
    assert result.exit_code == 0, result.output
    assert "no backdoor evidence" in result.output


def test_split_cli_refuses_damaged_scores_with_exit_2(scanned, tmp_path):
    header, rows = _rows(scanned)
    _write(scanned, header, rows[:-3])
    result = _split_cli(tmp_path / "work")
    assert result.exit_code == 2, result.output
    assert "truncated" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "work" / "split").exists()
