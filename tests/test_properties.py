"""Property tests: the budget and share parsers, the CSV readers and the isolation rule, on inputs
hypothesis makes up. Each property says what must hold for *every* input, bad ones included."""

from __future__ import annotations

import csv
import math
import shutil
import time
from fractions import Fraction
from pathlib import Path

import click
import numpy as np
import pytest
from conftest import make_folder, write_fake_scan
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from aabl_cli.core.data import list_image_folder
from aabl_cli.core.errors import AablError
from aabl_cli.core.groundtruth import read_ground_truth
from aabl_cli.core.threshold import choose_isolated
from aabl_cli.options import BUDGET, SHARE
from aabl_cli.stages.split import read_scores, split

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- budgets and shares


@FAST
@given(num=st.integers(0, 10_000), den=st.integers(1, 10_000))
def test_budget_fraction_in_range_is_exact(num: int, den: int) -> None:
    assume(num <= den)
    assert BUDGET.convert(f"{num}/{den}", None, None) == float(Fraction(num, den))


@FAST
@given(value=st.floats(0, 1))
def test_budget_decimal_round_trips(value: float) -> None:
    for text in (repr(value), f"{value:.6f}", f"{value:e}"):
        assert BUDGET.convert(text, None, None) == float(Fraction(text))
    assert BUDGET.convert(repr(value), None, None) == value


@FAST
@given(num=st.integers(2, 10**6), den=st.integers(1, 10**6))
def test_budget_above_one_suggests_per_255(num: int, den: int) -> None:
    assume(num > den)
    text = f"{num}/{den}" if den > 1 else str(num)
    with pytest.raises(click.BadParameter, match=f"did you mean {text}/255"):
        BUDGET.convert(text, None, None)


@FAST
@given(num=st.integers(1, 10**6), den=st.integers(1, 10**6))
def test_budget_negative_refused(num: int, den: int) -> None:
    with pytest.raises(click.BadParameter, match="negative"):
        BUDGET.convert(f"-{num}/{den}", None, None)


def _parse_or_usage_error(param: click.ParamType, text: str) -> float | None:
    started = time.perf_counter()
    try:
        value = param.convert(text, None, None)
    except click.BadParameter:
        value = None
    assert time.perf_counter() - started < 1.0, f"parsing {text!r} took too long"
    return value


@FAST
@given(text=st.text(max_size=30) | st.from_regex(r"\s*[-+]?[0-9.]{0,6}(e[-+]?[0-9]{1,12})?(/[-+]?[0-9.e]{0,6})?%?\s*",
                                                   fullmatch=True))
@example("1e999999999")
@example("1e-0999")
@example("1/1e-999999999")
@example("nan")
@example("inf")
@example("1/0")
@example("0x10")
@example("__import__('os')")
@example("9" * 5000)
def test_any_text_gives_a_budget_in_range_or_a_usage_error(text: str) -> None:
    """Never another exception, never a hang, and never a value outside [0, 1]."""
    for param in (BUDGET, SHARE):
        value = _parse_or_usage_error(param, text)
        if value is not None:
            assert isinstance(value, float) and 0 <= value <= 1 and math.isfinite(value)


@FAST
@given(percent=st.integers(0, 100), decimals=st.integers(0, 3))
def test_share_percent_equals_the_fraction(percent: int, decimals: int) -> None:
    text = f"{percent / 10**decimals}%"
    assert SHARE.convert(text, None, None) == pytest.approx(percent / 10**decimals / 100, abs=1e-15)


@FAST
@given(percent=st.floats(100, 1e6, exclude_min=True))
def test_share_above_100_percent_refused(percent: float) -> None:
    with pytest.raises(click.BadParameter, match=r"outside \[0, 1\]"):
        SHARE.convert(f"{percent}%", None, None)


# ---------------------------------------------------------------- scores.csv and poison.csv


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x 4 images, shared by the examples (nothing here writes to it)."""
    return make_folder(tmp_path_factory.mktemp("props") / "data", classes=2, per_class=4)


@pytest.fixture(scope="module")
def listing(dataset: Path) -> tuple[list[str], list[int]]:
    files = list_image_folder(dataset).files
    return [p for p, _ in files], [lab for _, lab in files]


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@SLOW
@given(scores=st.lists(finite, min_size=8, max_size=8))
def test_read_scores_round_trips_any_finite_scores(dataset: Path, listing, tmp_path: Path, scores) -> None:
    path = write_fake_scan(tmp_path / f"w{abs(hash(tuple(scores)))}", dataset, scores)
    _, paths, labels, values = read_scores(path)
    assert (paths, labels.tolist()) == listing
    assert values.tolist() == pytest.approx(scores, rel=1e-8, abs=1e-300)


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


EDITS = st.one_of(
    st.tuples(st.just("drop"), st.integers(1, 8)),
    st.tuples(st.just("duplicate"), st.integers(1, 8)),
    st.tuples(st.just("swap"), st.integers(1, 8), st.integers(1, 8)),
    st.tuples(st.just("cell"), st.integers(0, 8), st.integers(0, 8), st.text(max_size=12)),
    st.tuples(st.just("cut"), st.integers(0, 2000)),
    st.tuples(st.just("bytes"), st.binary(max_size=200)),
)


@SLOW
@given(edit=EDITS)
def test_read_scores_refuses_or_keeps_rows_aligned(dataset: Path, listing, tmp_path: Path, edit: tuple) -> None:
    """Whatever is done to scores.csv, read_scores either raises AablError or returns rows that
    still line up with the dataset (same paths, same order), valid labels and finite scores."""
    work = tmp_path / f"w{abs(hash(edit))}"
    shutil.rmtree(work, ignore_errors=True)
    path = write_fake_scan(work, dataset, np.linspace(0.1, 2.0, 8))
    rows = _rows(path)
    kind = edit[0]
    if kind == "drop":
        del rows[edit[1]]
    elif kind == "duplicate":
        rows.insert(edit[1], list(rows[edit[1]]))
    elif kind == "swap":
        rows[edit[1]], rows[edit[2]] = rows[edit[2]], rows[edit[1]]
    elif kind == "cell":
        row = rows[edit[1]]
        row[edit[2] % len(row)] = edit[3]
    if kind in ("drop", "duplicate", "swap", "cell"):
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    elif kind == "cut":
        raw = path.read_bytes()
        path.write_bytes(raw[: edit[1] % (len(raw) + 1)])
    else:
        path.write_bytes(edit[1])
    try:
        _, paths, labels, values = read_scores(path)
    except AablError as err:
        assert str(err), "an empty message"
        return
    assert paths == listing[0]
    assert ((labels >= 0) & (labels < 2)).all() and np.isfinite(values).all()


@SLOW
@given(row=st.integers(0, 7))
def test_read_scores_refuses_a_label_that_contradicts_the_image_folder(dataset: Path, listing, tmp_path: Path,
                                                                       row: int) -> None:
    """A row's label is its image's class folder; scores.csv with a label edited to another class would
    skew the per-class verdict of split, so it must be refused like any other edit but the score."""
    work = tmp_path / f"w{row}"
    path = write_fake_scan(work, dataset, np.linspace(0.1, 2.0, 8))
    rows = _rows(path)
    rows[1 + row][2] = str(1 - int(rows[1 + row][2]))  # the other of the two classes
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(AablError, match=rf"line {row + 2}: label {rows[1 + row][2]} does not match the class folder"):
        read_scores(path)


@SLOW
@given(rows=st.lists(st.lists(st.text(max_size=10), max_size=4), max_size=12),
       header=st.sampled_from([["path", "poisoned"], ["path", "poisoned", "kind"], ["poisoned", "path"], ["x"], []]))
@example(rows=[["class_0/img_000.png"]], header=["path", "poisoned"])  # a short row: `poisoned` is missing
def test_read_ground_truth_never_raises(listing, tmp_path: Path, rows: list[list[str]], header: list[str]) -> None:
    """Ground truth is optional: a poison.csv that cannot be read gives None, never an exception; a
    readable one gives one 0/1 flag per path, in the order asked for."""
    paths = listing[0]
    root = tmp_path / f"gt{abs(hash((str(rows), str(header))))}"
    root.mkdir(exist_ok=True)
    with open(root / "poison.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    flags = read_ground_truth(root, paths)
    if flags is not None:
        assert flags.shape == (len(paths),) and flags.dtype == np.int64


@SLOW
@given(poisoned=st.lists(st.booleans(), min_size=8, max_size=8), order=st.permutations(range(8)))
def test_read_ground_truth_aligns_flags_with_paths(listing, tmp_path: Path, poisoned, order) -> None:
    paths = listing[0]
    root = tmp_path / f"gt{abs(hash((tuple(poisoned), tuple(order))))}"
    root.mkdir(exist_ok=True)
    with open(root / "poison.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "poisoned"], *[[paths[i], int(poisoned[i])] for i in order]])
    assert read_ground_truth(root, paths).tolist() == [int(p) for p in poisoned]
    # a path missing from poison.csv counts as clean
    assert read_ground_truth(root, paths + ["class_9/new.png"]).tolist() == [int(p) for p in poisoned] + [0]


# ---------------------------------------------------------------- choose_isolated


score_lists = st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=150)


@FAST
@given(scores=score_lists, method=st.sampled_from(["otsu", "quantile", "fixed"]), knob=st.floats(0, 1))
def test_every_sample_is_kept_or_isolated_once(scores, method: str, knob: float) -> None:
    s = np.array(scores)
    kwargs = {"otsu": {"min_isolated": knob}, "quantile": {"fraction": knob},
              "fixed": {"threshold": float(np.quantile(s, knob))}}[method]
    isolated, t = choose_isolated(s, method=method, **kwargs)
    assert isolated.dtype == bool and isolated.shape == s.shape
    assert isolated.sum() + (~isolated).sum() == len(s) and math.isfinite(t)
    # a lowest block cut at t: no kept sample is more robust (lower score) than an isolated one
    assert (s[isolated] <= t).all() and (s[~isolated] >= t).all()


@FAST
@given(scores=score_lists, floor=st.floats(0, 1))
def test_otsu_respects_min_isolated(scores, floor: float) -> None:
    s = np.array(scores)
    isolated, _ = choose_isolated(s, method="otsu", min_isolated=floor)
    assert isolated.sum() >= math.ceil(floor * len(s) - 1e-9)


@FAST
@given(scores=score_lists, floors=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_otsu_higher_floor_never_isolates_fewer(scores, floors) -> None:
    s = np.array(scores)
    low, high = sorted(floors)
    a, _ = choose_isolated(s, method="otsu", min_isolated=low)
    b, _ = choose_isolated(s, method="otsu", min_isolated=high)
    assert not (a & ~b).any(), "raising the floor released an isolated sample"


@FAST
@given(scores=score_lists, thresholds=st.tuples(st.floats(-1, 1e4 + 1), st.floats(-1, 1e4 + 1)))
def test_fixed_higher_threshold_never_isolates_fewer(scores, thresholds) -> None:
    s = np.array(scores)
    low, high = sorted(thresholds)
    a, ta = choose_isolated(s, method="fixed", threshold=low)
    b, tb = choose_isolated(s, method="fixed", threshold=high)
    assert (ta, tb) == (low, high)
    assert not (a & ~b).any() and a.sum() <= b.sum()
    assert np.array_equal(b, s < high)


@FAST
@given(scores=score_lists, fractions=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_quantile_isolates_round_fraction_n_and_grows_with_the_fraction(scores, fractions) -> None:
    s = np.array(scores)
    low, high = sorted(fractions)
    a, _ = choose_isolated(s, method="quantile", fraction=low)
    b, _ = choose_isolated(s, method="quantile", fraction=high)
    assert a.sum() == round(low * len(s)) and b.sum() == round(high * len(s))
    assert not (a & ~b).any()


@FAST
@given(scores=st.lists(st.floats(0, 1e4, allow_nan=False), min_size=2, max_size=80, unique=True),
       seed=st.integers(0, 2**32 - 1), method=st.sampled_from(["otsu", "quantile"]))
def test_isolation_follows_the_samples_when_shuffled(scores, seed: int, method: str) -> None:
    """Without ties, the dataset order does not change who is isolated."""
    s = np.array(scores)
    perm = np.random.default_rng(seed).permutation(len(s))
    kwargs = {"min_isolated": 0.1} if method == "otsu" else {"fraction": 0.3}
    a, _ = choose_isolated(s, method=method, **kwargs)
    b, _ = choose_isolated(s[perm], method=method, **kwargs)
    assert np.array_equal(a[perm], b)


# ---------------------------------------------------------------- split: kept/ and isolated/ on disk


def _files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}


@SLOW
@given(scores=st.lists(st.floats(0, 100, allow_nan=False), min_size=8, max_size=8),
       method=st.sampled_from(["otsu", "quantile", "fixed"]), knob=st.floats(0, 1))
def test_split_puts_every_file_in_exactly_one_tree(dataset: Path, listing, tmp_path: Path, scores, method: str,
                                                   knob: float) -> None:
    work = tmp_path / f"w{abs(hash((tuple(scores), method, knob)))}"
    shutil.rmtree(work, ignore_errors=True)
    scores_path = write_fake_scan(work, dataset, scores)
    kwargs = {"otsu": {"min_isolated": knob}, "quantile": {"fraction": knob}, "fixed": {"threshold": 100 * knob}}
    summary = split(scores_path, workdir=work, method=method, **kwargs[method])
    kept, isolated = _files(work / "split" / "kept"), _files(work / "split" / "isolated")
    assert kept.isdisjoint(isolated) and kept | isolated == set(listing[0])
    assert (summary["kept"], summary["isolated"]) == (len(kept), len(isolated))
    for tree in ("kept", "isolated"):
        assert sorted(p.name for p in (work / "split" / tree).iterdir()) == ["class_0", "class_1"]
