"""Stage 2: cut the robust (low-score, suspicious) samples away from the rest.

Otsu's threshold over the raw scores; samples below it are *isolated* (D_rob), the rest
*kept* (D_vul). At least `min_isolated` of the set is isolated (see README: the paper's
Table 1 implies a 10 % floor). A backdoor's poisons share one label, so the class make-up
of the isolated set's most robust core decides the verdict.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from skimage.filters import threshold_otsu

from aabl_cli import __version__
from aabl_cli.data import LINK_MODES, dataset_fingerprint, write_image_folder
from aabl_cli.errors import AablError
from aabl_cli.fsutil import SECOND_ROUND, Place, atomic_output_dir, inside, refuse_overlap, write_json
from aabl_cli.lock import workdir_lock
from aabl_cli.text import printable

METHODS = ("otsu", "quantile", "fixed")
# Verdict: the suspected class's excess share of the verdict core, as a fraction of the
# room it had to grow: (q - p) / (1 - p), q its share of the core, p its data share.
# On 10,000 CIFAR-10 images (benchmarks/SPLIT_CHECK.md) BadNets gave 0.57 and 1.00 (two
# naive networks) and the clean set 0.24 and 0.33: a naturally robust class (ship) can
# fill a third of the core, a patch trigger's target fills most of it.
SUSPECT_CONCENTRATION = 0.5
# The verdict reads a lower confidence bound of the concentration, not the point estimate:
# a 200-image core (5 % of 4,000) has a standard error near 0.04, and on CIFAR-10 Blend a
# naturally robust class reached 0.52 by chance. One-sided Wilson bound on the class's core
# share, Bonferroni-corrected over the classes since the largest of them is the one tested.
VERDICT_ALPHA = 0.05
# The verdict core: the most robust isolated samples, at most this share of the set. On
# real data whole classes are naturally robust (ships, cars) and fill the isolated set's
# upper part on clean and poisoned sets alike; a patch trigger's poisons sit far below.
VERDICT_CORE = 0.05
VERDICT_CORE_MIN = 50  # samples: a smaller core says little about class make-up
SPLIT_FIELDS = ("index", "path", "label", "score", "kept")
# Below this accuracy on its own (unaugmented) training images the naive model has not
# learnt its data, nor a backdoor: its robust images are noise, and so is the verdict.
# Measured on CIFAR-10: 3 epochs (40 %) isolated 29 % of a clean set and cried "backdoor";
# 20 epochs (82 %) did not.
FIT_WARNING_ACC = 0.6


def choose_isolated(scores: np.ndarray, *, method: str = "otsu", fraction: float | None = None,
                    threshold: float | None = None, min_isolated: float = 0.10) -> tuple[np.ndarray, float]:
    """Boolean mask of the isolated samples (True = suspicious) and the threshold used.

    otsu: score < Otsu threshold (256 bins), raised so at least `min_isolated` of the set is
    isolated; quantile: the `fraction` lowest scores; fixed: score < `threshold`.
    Ties at a rank cut are broken by dataset order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if method == "fixed":
        assert threshold is not None
        return scores < threshold, float(threshold)
    if method == "quantile":
        assert fraction is not None
        return _lowest(scores, round(fraction * n))
    isolated, t = _otsu(scores)
    floor = math.ceil(min_isolated * n - 1e-9)
    if isolated.sum() < floor:
        return _lowest(scores, floor)
    return isolated, t


# Otsu's threshold works on the scores as they are when their range is ordinary; past these
# bounds skimage's histogram and class variances overflow or cannot make 256 distinct bins.
_OTSU_SAFE_MAGNITUDE, _OTSU_SAFE_RELATIVE_RANGE = 1e100, 1e-9


def _otsu(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """Scores below Otsu's threshold (256 bins) and the threshold, for any finite scores."""
    lo, hi = float(scores.min()), float(scores.max())
    if lo == hi:
        return scores < lo, lo
    span = hi - lo
    magnitude = max(abs(lo), abs(hi))
    smallest_span = max(1 / _OTSU_SAFE_MAGNITUDE, magnitude * _OTSU_SAFE_RELATIVE_RANGE)
    if magnitude <= _OTSU_SAFE_MAGNITUDE and span >= smallest_span:
        # skimage returns the centre of the low group's last bin; its upper edge is the cut,
        # or samples in the top half of that bin would be kept.
        t = float(threshold_otsu(scores, nbins=256)) + span / 512
        return scores < t, t
    # Extreme ranges (1e308, subnormal gaps): cut the scores mapped onto [0, 1] (an order-keeping map,
    # halved first where hi - lo overflows), then report the cut between the two groups' scores.
    scaled = (scores - lo) / span if math.isfinite(span) else (scores / 2 - lo / 2) / (hi / 2 - lo / 2)
    below = scaled < float(threshold_otsu(scaled, nbins=256)) + 1 / 512
    return _lowest(scores, int(below.sum()))


def _lowest(scores: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    order = np.argsort(scores, kind="stable")
    isolated = np.zeros(len(scores), dtype=bool)
    isolated[order[:k]] = True
    if k <= 0:
        return isolated, float(scores[order[0]]) if len(scores) else 0.0
    if k >= len(scores):
        top = float(scores[order[-1]])
        above = math.nextafter(top, math.inf)
        return isolated, above if math.isfinite(above) else top
    a, b = float(scores[order[k - 1]]), float(scores[order[k]])
    middle = (a + b) / 2
    return isolated, middle if math.isfinite(middle) else a / 2 + b / 2


def class_verdict(labels: np.ndarray, scores: np.ndarray, isolated: np.ndarray, classes: list[str],
                  *, core: float = VERDICT_CORE, core_min: int = VERDICT_CORE_MIN) -> dict[str, Any]:
    """Per-class isolated shares against data shares, the suspected target class and a verdict.

    The verdict looks at the core: the `max(core * N, core_min)` isolated samples with the
    lowest scores, or all of them when fewer are isolated. A backdoor is suspected when the
    lower confidence bound of the top class's concentration (`concentration_low`) reaches
    `SUSPECT_CONCENTRATION`.
    """
    counts = np.bincount(labels, minlength=len(classes))
    iso = np.bincount(labels[isolated], minlength=len(classes))
    candidates = np.flatnonzero(isolated)
    size = min(len(candidates), max(core_min, math.ceil(core * len(labels))))
    in_core = candidates[np.argsort(scores[candidates], kind="stable")[:size]]
    core_counts = np.bincount(labels[in_core], minlength=len(classes))
    p = counts / max(1, counts.sum())
    q = core_counts / max(1, size)
    excess = np.where(p < 1, (q - p) / np.clip(1 - p, 1e-12, None), 0.0)
    top = int(np.argmax(excess))
    concentration = float(excess[top]) if size else 0.0
    low = 0.0
    if size:
        z = NormalDist().inv_cdf(1 - VERDICT_ALPHA / len(classes))
        q_low = wilson_lower(int(core_counts[top]), int(size), z)
        low = max(0.0, float((q_low - p[top]) / (1 - p[top]))) if p[top] < 1 else 0.0
    return {
        "per_class": [{"class": c, "samples": int(counts[i]), "isolated": int(iso[i]), "core": int(core_counts[i]),
                       "share_of_data": float(p[i]), "share_of_isolated": float(iso[i] / max(1, iso.sum())),
                       "share_of_core": float(q[i]),
                       "isolated_fraction": float(iso[i] / counts[i]) if counts[i] else 0.0}
                      for i, c in enumerate(classes)],
        "core_size": int(size),
        "core_fraction": core,
        "suspected_class": classes[top],
        "suspected_label": top,
        "concentration": concentration,
        "concentration_low": low,
        "concentration_confidence": 1 - VERDICT_ALPHA,
        "concentration_threshold": SUSPECT_CONCENTRATION,
        "verdict": "backdoor suspected" if low >= SUSPECT_CONCENTRATION else "no backdoor evidence",
    }


def wilson_lower(successes: int, trials: int, z: float) -> float:
    """Lower end of the Wilson score interval for a binomial proportion (0 without trials)."""
    if trials <= 0:
        return 0.0
    phat = successes / trials
    centre = phat + z * z / (2 * trials)
    spread = z * math.sqrt(phat * (1 - phat) / trials + z * z / (4 * trials * trials))
    return max(0.0, (centre - spread) / (1 + z * z / trials))


def read_ground_truth(root: Path, paths: list[str]) -> np.ndarray | None:
    """`poisoned` flags (0/1) from `root/poison.csv` in the order of `paths`, or None without one."""
    truth_path = Path(root) / "poison.csv"
    if not truth_path.is_file():
        return None
    try:
        with open(truth_path, newline="", encoding="utf-8-sig") as fh:
            flags = {row["path"]: int(row["poisoned"]) for row in csv.DictReader(fh)}
    except (KeyError, TypeError, ValueError, OSError, csv.Error):
        return None
    return np.array([flags.get(p, 0) for p in paths], dtype=np.int64)


def read_scores(path: Path) -> tuple[dict[str, Any], list[str], np.ndarray, np.ndarray]:
    """Read `scores.csv` and the `scan.json` beside it; check the rows against the dataset.

    Returns (scan summary, paths, labels, scores). Edited score values are accepted;
    missing, extra, duplicate or reordered rows, non-finite scores and changed images
    are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise AablError(f"scores file {path} does not exist; run `aabl scan DATA` first or pass its scores.csv")
    scan_json = path.with_name("scan.json")
    try:
        scan = json.loads(scan_json.read_text())
        root = Path(scan["dataset_root"])
        fingerprint = scan["dataset_fingerprint"]
        classes = list(scan["classes"])
        expected = int(scan["samples"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AablError(f"{scan_json} is missing or unreadable; keep the scan.json that `aabl scan` wrote "
                        "beside scores.csv") from err
    label_of = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    scores: list[float] = []
    try:
        # utf-8-sig: a spreadsheet that saved the file may have put a byte-order mark before "index"
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"index", "path", "label", "score"} - set(reader.fieldnames or [])
            if missing:
                raise AablError(f"{path} lacks the column(s) {sorted(missing)}; use the scores.csv that scan wrote")
            for line, row in enumerate(reader, start=2):
                try:
                    index, label, score = int(row["index"]), int(row["label"]), float(row["score"])
                except (TypeError, ValueError) as err:
                    raise AablError(f"{path}, line {line}: unreadable row ({err}); fix or re-create the file "
                                    "with `aabl scan`") from err
                if index != len(paths):
                    raise AablError(f"{path}, line {line}: index {index} where {len(paths)} was expected (rows "
                                    "missing, duplicated or reordered); restore the rows in dataset order")
                if not math.isfinite(score):
                    raise AablError(f"{path}, line {line}: score {row['score']!r} is not a finite number; "
                                    "give every sample a finite score")
                if not 0 <= label < len(classes):
                    raise AablError(f"{path}, line {line}: label {label} is not one of the {len(classes)} classes")
                folder = str(row["path"]).split("/", 1)[0]
                if label_of.get(folder) != label:
                    raise AablError(f"{path}, line {line}: label {label} does not match the class folder of "
                                    f"{row['path']}; restore the label or re-create the file with `aabl scan`")
                paths.append(row["path"])
                labels.append(label)
                scores.append(score)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise AablError(f"cannot read {path}: {err}; re-create it with `aabl scan`") from err
    if len(paths) != expected:
        raise AablError(f"{path} has {len(paths)} rows but the scan scored {expected} images; the file is "
                        "truncated or edited: re-create it with `aabl scan`")
    if len(set(paths)) != len(paths):
        raise AablError(f"{path} lists some images twice; re-create it with `aabl scan`")
    if not root.is_dir():
        raise AablError(f"the scanned dataset {root} (named in {scan_json}) is gone; restore it or scan again")
    try:
        current = dataset_fingerprint(root, paths)
    except OSError as err:
        raise AablError(f"an image listed in {path} cannot be read from {root} ({err}); "
                        "the dataset changed since the scan: scan it again") from err
    if current != fingerprint:
        raise AablError(f"{path} does not match the images in {root} (paths, order or file contents changed "
                        "since the scan); scan the dataset again")
    return scan, paths, np.array(labels, dtype=np.int64), np.array(scores, dtype=np.float64)


def gates_for(summary: dict[str, Any], *, fail_over: float | None, fail_on_suspect: bool) -> list[str]:
    """The CI gates a split summary trips: more isolated than `fail_over`, or a suspected backdoor."""
    gates = []
    if fail_over is not None and summary["isolated_fraction"] > fail_over:
        gates.append(f"isolated {summary['isolated_fraction']:.1%} of the set, more than --fail-over "
                     f"{fail_over:.1%}")
    if fail_on_suspect and summary["verdict"] == "backdoor suspected":
        gates.append(f"backdoor suspected (class {summary['suspected_class']!r}) and --fail-on-suspect is set")
    return gates


def split(scores: str | Path | None = None, *, workdir: str | Path = "aabl-out", method: str = "otsu",
          fraction: float | None = None, threshold: float | None = None, min_isolated: float = 0.10,
          link: str = "copy", fail_over: float | None = None, fail_on_suspect: bool = False) -> dict[str, Any]:
    """Split the scanned dataset into `workdir/split/kept/` and `workdir/split/isolated/`.

    Writes `split.csv` and `split.json` too. The summary's `gates` lists the CI gates
    that tripped (`fail_over`, `fail_on_suspect`); the caller turns them into exit 3.
    """
    if method not in METHODS:
        raise AablError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if method == "quantile" and fraction is None:
        raise AablError("--method quantile needs --fraction F (the share to isolate, e.g. 0.1)")
    if method == "fixed" and threshold is None:
        raise AablError("--method fixed needs --threshold T (isolate scores below T)")
    if threshold is not None and not math.isfinite(threshold):
        raise AablError(f"--threshold {threshold} is not a finite number; give the score below which images "
                        "are isolated, e.g. 0.5")
    if link not in LINK_MODES:
        raise AablError(f"unknown --link {link!r}; use one of {', '.join(LINK_MODES)}")
    started = time.time()
    workdir = Path(workdir)
    scores_path = Path(scores) if scores is not None else workdir / "scan" / "scores.csv"
    _refuse_overlap(scores_path, _scanned_root(scores_path), workdir)  # before the lock file is written
    own_scan = ("scan",) if inside(scores_path, workdir / "scan") else ()
    with workdir_lock(workdir, *own_scan, "split"):  # no scan replaces what is read, no split runs alongside
        scan, paths, labels, values = read_scores(scores_path)
        _refuse_overlap(scores_path, Path(scan["dataset_root"]), workdir)  # as read under the lock
        root, classes = Path(scan["dataset_root"]), list(scan["classes"])
        isolated, t = choose_isolated(values, method=method, fraction=fraction, threshold=threshold,
                                      min_isolated=min_isolated)
        kept = ~isolated
        n = len(values)
        summary: dict[str, Any] = {
            "stage": "split", "aabl_version": __version__, "scores": str(scores_path.resolve()),
            "dataset_root": str(root), "dataset_fingerprint": scan["dataset_fingerprint"],
            "settings": {"method": method, "fraction": fraction, "threshold": threshold,
                         "min_isolated": min_isolated if method == "otsu" else None, "link": link,
                         "fail_over": fail_over, "fail_on_suspect": fail_on_suspect},
            "threshold": t, "samples": n, "kept": int(kept.sum()), "isolated": int(isolated.sum()),
            "gamma": float(kept.mean()) if n else 0.0, "isolated_fraction": float(isolated.mean()) if n else 0.0,
            "skipped": scan.get("skipped", []),
            **class_verdict(labels, values, isolated, classes),
            "warnings": fit_warnings(scan),
        }
        truth = read_ground_truth(root, paths)
        if truth is not None:
            poisoned = truth.astype(bool)
            summary["ground_truth"] = {
                "poisoned": int(poisoned.sum()),
                "rho": float(poisoned.mean()),
                "rho_vul": float(poisoned[kept].mean()) if kept.any() else 0.0,
                "precision": float(poisoned[isolated].mean()) if isolated.any() else 0.0,
                "recall": float(isolated[poisoned].mean()) if poisoned.any() else float("nan"),
            }
        with atomic_output_dir(workdir / "split") as out:
            for tree in ("kept", "isolated"):
                for name in classes:
                    (out / tree / name).mkdir(parents=True, exist_ok=True)
            write_image_folder(out / "kept", root, [p for p, k in zip(paths, kept) if k], link=link)
            write_image_folder(out / "isolated", root, [p for p, i in zip(paths, isolated) if i], link=link)
            _write_split_csv(out / "split.csv", paths, labels, values, kept, truth)
            summary["gates"] = gates_for(summary, fail_over=fail_over, fail_on_suspect=fail_on_suspect)
            summary["seconds"] = time.time() - started
            write_json(out / "split.json", summary)
        return summary


def _scanned_root(scores_path: Path) -> Path | None:
    """The dataset root the scan.json beside `scores_path` names; None when unreadable (read_scores says why)."""
    try:
        return Path(json.loads(scores_path.with_name("scan.json").read_text())["dataset_root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refuse_overlap(scores_path: Path, root: Path | None, workdir: Path) -> None:
    """Split reads the scanned dataset (named in scan.json) and scores.csv, and replaces WORKDIR/split."""
    reads = [Place(scores_path, "SCORES"), Place(scores_path.with_name("scan.json"), "the scan.json beside SCORES")]
    if root is not None:
        reads.append(Place(root, "the scanned data folder"))
    refuse_overlap(reads, replaces=[Place(workdir / "split", "the split output")],
                   writes_into=[Place(workdir, "--workdir")],
                   fix=f"split into another work directory: aabl split {scores_path} --workdir OTHER "
                       f"({SECOND_ROUND}; {scores_path.with_name('scan.json')} names the scanned data folder)")


def fit_warnings(scan: dict[str, Any]) -> list[str]:
    """Why the split may say little: the scan's naive model did not fit its training set."""
    acc = scan.get("clean_acc")
    if isinstance(acc, (int, float)) and acc < FIT_WARNING_ACC:
        return [f"the naive model classifies only {acc:.0%} of its own training images (clean_acc in scan.json); "
                "a model that has not fitted its data has not learnt a backdoor either, so this split and its "
                "verdict say little: scan again with more --epochs"]
    return []


def _write_split_csv(path: Path, paths: list[str], labels: np.ndarray, scores: np.ndarray, kept: np.ndarray,
                     truth: np.ndarray | None) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SPLIT_FIELDS + (("poisoned",) if truth is not None else ()))
        for i, rel in enumerate(paths):
            row = [i, rel, int(labels[i]), f"{scores[i]:.9g}", int(kept[i])]
            writer.writerow(row + ([int(truth[i])] if truth is not None else []))


def describe(summary: dict[str, Any]) -> str:
    """The split's report for a terminal: threshold, sizes, per-class shares, verdict."""
    lines = [
        f"threshold {summary['threshold']:.6g} ({summary['settings']['method']})",
        f"kept      {summary['kept']:>7} ({summary['gamma']:.1%}, gamma)",
        f"isolated  {summary['isolated']:>7} ({summary['isolated_fraction']:.1%})",
        "",
        f"{'class':<20} {'samples':>8} {'isolated':>9} {'of class':>9} {'of isolated':>12} {'of core':>8} "
        f"{'of data':>8}",
    ]
    for row in summary["per_class"]:  # class names are the user's folder names: one escaped line each
        lines.append(f"{printable(row['class'])[:20]:<20} {row['samples']:>8} {row['isolated']:>9} "
                     f"{row['isolated_fraction']:>9.1%} {row['share_of_isolated']:>12.1%} {row['share_of_core']:>8.1%} "
                     f"{row['share_of_data']:>8.1%}")
    lines += ["", f"suspected target class: {printable(summary['suspected_class'])} "
              f"(concentration {summary['concentration']:.2f}, at least {summary.get('concentration_low', 0.0):.2f} "
              f"with {summary.get('concentration_confidence', 0.95):.0%} confidence, in the core of the "
              f"{summary['core_size']} most robust isolated samples; "
              f"suspected at {summary['concentration_threshold']})",
              f"verdict: {summary['verdict']}"]
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    truth = summary.get("ground_truth")
    if truth:
        recall = truth["recall"]  # undefined (NaN, or null once read back from JSON) without any poison
        recall_text = f"{recall:.1%}" if isinstance(recall, float) and math.isfinite(recall) else "n/a (no poison)"
        lines.append(f"ground truth: rho {truth['rho']:.2%} -> rho_vul {truth['rho_vul']:.2%}; isolated set "
                     f"precision {truth['precision']:.1%}, recall {recall_text}")
    for gate in summary.get("gates", []):
        lines.append(f"gate failed: {gate}")
    return "\n".join(lines)
