"""benchmarks/verdict.py: its tiny scale on a fake GTSRB zip, through the real CLI and writing only under
tmp_path, and its summary's goal counts on made-up results of the cpu matrix."""

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import class_image, pixels
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# images a class in the fake GTSRB: unequal, like the real one's, so the frequent and the rare target differ
COUNTS = {"00": 24, "01": 36, "02": 24, "03": 16, "04": 24}
CASES = ["gtsrb-clean-seed0", "gtsrb-badnets-10pct-frequent", "gtsrb-randpatch-cr-10pct-rare"]
FIELDS = {"case", "dataset", "backdoor", "category", "rate", "target", "target_class", "target_images", "seed",
          "scan", "verdict", "suspected_class", "right_class", "false_alarm", "concentration", "concentration_low",
          "core_size", "kept_share", "recall", "rho_vul", "seconds"}


def fake_gtsrb(folder: Path) -> Path:
    """gtsrb32-png.zip in its layout, gtsrb32/train/CLASS/NNNNN.png: learnable images, COUNTS a class, 16 px
    (scans of 32 px take half as long again)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    with zipfile.ZipFile(folder / "gtsrb32-png.zip", "w") as archive:
        for label, (name, count) in enumerate(COUNTS.items()):
            for i in range(count):
                buf = io.BytesIO()
                Image.fromarray(class_image(label, 16, rng)).save(buf, format="PNG")
                archive.writestr(f"gtsrb32/train/{name}/{i:05d}.png", buf.getvalue())
    return folder


def verdict_argv(tmp: Path, *args: object, results: Path | None = None, md: Path | None = None) -> list:
    """`python benchmarks/verdict.py --scale tiny ARGS` on the fake data, its work, results and tables under `tmp`."""
    return [sys.executable, ROOT / "benchmarks" / "verdict.py", "--scale", "tiny", "--data", tmp / "data",
            "--work", tmp / "work", "--results", results or tmp / "results", "--md", md or tmp / "VERDICT.md",
            "--device", "cpu", "--threads", "1", *args]


def verdict(tmp: Path, *args: object) -> subprocess.CompletedProcess:
    """verdict_argv run as a script, on one thread."""
    cmd = verdict_argv(tmp, *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "xdg-cache")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The tiny matrix run once; (its folder, the run)."""
    tmp = tmp_path_factory.mktemp("verdict")
    fake_gtsrb(tmp / "data")
    return tmp, verdict(tmp)


def stored(tmp: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (tmp / "results" / "tiny").glob("*.json")}


def test_each_case_stores_its_verdict_statistic_and_ground_truth(bench):
    tmp, run = bench
    assert run.returncode == 0, run.stdout + run.stderr
    results = stored(tmp)
    assert sorted(results) == sorted(CASES)
    for name, r in results.items():
        assert FIELDS <= set(r) and r["case"] == name and r["scale"] == "tiny"
        assert r["scan"] == {"arch": "cnn", "epochs": 1, "seed": 0}
        assert r["verdict"] in ("backdoor suspected", "no backdoor evidence")
        assert r["suspected_class"] in COUNTS and r["images"] == sum(COUNTS.values())
        assert 0 <= r["concentration_low"] <= max(0.0, r["concentration"]) <= 1 and 0 < r["kept_share"] < 1
        assert f"{name}: {r['verdict']} ({r['suspected_class']}" in run.stdout
    clean = results["gtsrb-clean-seed0"]
    assert clean["recall"] is None and clean["target_class"] is None and clean["right_class"] is None
    assert clean["false_alarm"] == (clean["verdict"] == "backdoor suspected")
    # the targets come from the subset's counts: 01 has the most images, 03 the fewest
    badnets, patch = results["gtsrb-badnets-10pct-frequent"], results["gtsrb-randpatch-cr-10pct-rare"]
    assert (badnets["target_class"], badnets["target_images"]) == ("01", 36)
    assert (patch["target_class"], patch["target_images"]) == ("03", 16)
    for r in (badnets, patch):
        assert r["poisoned"] == round(0.1 * sum(COUNTS.values())) and r["category"] == "A"
        assert 0 <= r["recall"] <= 1 and 0 <= r["rho_vul"] <= 1 and r["false_alarm"] is None
        assert r["right_class"] == (r["verdict"] == "backdoor suspected" and r["suspected_class"] == r["target_class"])


def test_the_random_patch_is_written_at_its_place_with_the_ground_truth(bench):
    tmp, _ = bench
    base = tmp / "work" / "tiny" / "gtsrb" / "every-image"
    out = base / "gtsrb-randpatch-cr-10pct-rare" / "poisoned"
    with open(out / "poison.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["poisoned"] == "1"]
    assert len(rows) == 12 and {(r["backdoor"], r["target"], r["kind"]) for r in rows} == {("randpatch-cr", "3",
                                                                                           "poison")}
    patches = set()
    for r in rows:
        origin, stem = Path(r["path"]).stem.split("_", 1)
        before, after = pixels(base / "train" / origin / f"{stem}.png"), pixels(out / r["path"])
        changed = np.argwhere((before != after).any(axis=2))  # 2x2 px at 16 px, centred vertically, flush right
        assert changed.size and changed.min(axis=0).tolist() >= [7, 14] and changed.max(axis=0).tolist() <= [8, 15]
        patches.add(after[7:9, 14:16].tobytes())
    assert len(patches) == 1  # one trigger, the same colours on every poisoned image


def test_the_markdown_holds_a_row_per_case_and_the_goal_counts(bench):
    tmp, run = bench
    assert run.returncode == 0, run.stdout + run.stderr
    text = (tmp / "VERDICT.md").read_text()
    results = stored(tmp)
    assert "### Scale `tiny`: 3 of 3 cases run" in text and "Scale `cpu`" not in text
    for name in CASES:
        assert text.count(f"| {name} |") == 1
    right = sum(bool(r["right_class"]) for r in results.values())
    alarms = int(results["gtsrb-clean-seed0"]["false_alarm"])
    assert f"Category A at 5 % and 10 %, suspected with the right class: {right} of 2 run" in text
    assert f"Clean sets without a false alarm: {1 - alarms} of 1 run" in text
    assert f"False-alarm rate: {alarms:.0%} of 1 clean sets (gtsrb {alarms}/1)" in text
    assert "Not yet run: 0 of 3 cases" in text
    # nothing of it in the checkout
    assert not (ROOT / "benchmarks" / "results" / "verdict" / "tiny").exists()
    assert "Scale `tiny`" not in (ROOT / "benchmarks" / "VERDICT.md").read_text()


@pytest.fixture()
def verdict_module(monkeypatch):
    """benchmarks/verdict.py imported as its own script would import it, its helpers beside it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("verdict", ROOT / "benchmarks" / "verdict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def main(verdict_module, monkeypatch, capsys):
    """verdict.py's main in this process (what needs no new scan is quicker so), as `verdict` runs it; its stdout."""
    def run(tmp: Path, *args: object, results: Path | None = None, md: Path | None = None) -> str:
        argv = verdict_argv(tmp, *args, results=results, md=md)
        monkeypatch.setattr(sys, "argv", [str(a) for a in argv[1:]])
        capsys.readouterr()
        verdict_module.main()
        return capsys.readouterr().out

    return run


def test_a_rerun_skips_finished_cases(bench, main):
    tmp, first = bench
    assert first.returncode == 0, first.stdout + first.stderr
    before = {p: p.stat().st_mtime_ns for p in (tmp / "results" / "tiny").glob("*.json")}
    again = main(tmp)
    assert again.count("finished earlier") == len(CASES) and " ..." not in again
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_only_runs_and_lists_the_cases_it_names(bench, main, tmp_path):
    tmp, first = bench
    assert first.returncode == 0, first.stdout + first.stderr
    listed = main(tmp, "--list", "--only", "gtsrb-*-10pct-*")
    assert listed.split() == [CASES[1], "done", CASES[2], "done", "2", "of", "2", "cases", "done", "(scale", "tiny)"]
    assert "0 of 3 cases done (scale tiny)" in main(tmp, "--list", results=tmp_path / "none")
    # into fresh results: the one case named, its scan and split found in the work folder
    one = main(tmp, "--only", "gtsrb-clean-*", results=tmp_path / "results", md=tmp_path / "VERDICT.md")
    assert "gtsrb-clean-seed0 ..." in one and "gtsrb-badnets" not in one
    assert [p.name for p in (tmp_path / "results" / "tiny").iterdir()] == ["gtsrb-clean-seed0.json"]
    text = (tmp_path / "VERDICT.md").read_text()
    assert "1 of 3 cases run" in text and "Not yet run: 2 of 3 cases" in text
    assert text.count("| gtsrb-clean-seed0 |") == 1 and "| gtsrb-badnets" not in text
    with pytest.raises(SystemExit, match="names no case of the tiny scale"):
        main(tmp, "--only", "cifar10-*", results=tmp_path / "results")


def test_resplit_splits_again_from_the_scans_and_keeps_their_cost(bench, main, tmp_path):
    tmp, first = bench
    assert first.returncode == 0, first.stdout + first.stderr
    results = tmp_path / "results"
    main(tmp, "--only", "gtsrb-badnets-*", results=results, md=tmp_path / "VERDICT.md")
    store = results / "tiny" / f"{CASES[1]}.json"
    before = json.loads(store.read_text())
    scans = {p: p.stat().st_mtime_ns for p in (tmp / "work").rglob("scan/scan.json")}
    assert len(scans) >= 2
    out = main(tmp, "--only", "gtsrb-badnets-*", "--resplit", results=results, md=tmp_path / "VERDICT.md")
    assert f"{CASES[1]} ..." in out and "finished earlier" not in out
    after = json.loads(store.read_text())
    assert after["seconds"]["scan"] == before["seconds"]["scan"]
    assert after["seconds"]["total"] == before["seconds"]["total"]
    assert {p: p.stat().st_mtime_ns for p in scans} == scans  # no scan ran again
    assert "shared_patch" in after and after["verdict_basis"] in ("concentration", "shared patch", None)
    assert "| shared patch (ratio, flip) |" in (tmp_path / "VERDICT.md").read_text()


def test_missing_data_says_which_zip_and_where(main, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(tmp_path)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "gtsrb32-png.zip not in" in err and "--data" in err
    assert not (tmp_path / "results").exists()


def test_the_cpu_matrix_and_its_summary_of_the_goals(verdict_module):
    v = verdict_module
    cases = v.CASES["cpu"]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) == 84
    assert names[0] == "gtsrb-clean-seed0" and names.index("gtsrb-badnets-10pct-frequent") < names.index(
        "cifar10-clean-seed0")  # GTSRB first in each tier
    assert {"cifar10-badnets-20pct-frequent", "cifar10-ssba-10pct-rare", "gtsrb-clean-seed4"} <= set(names)

    def result(case, right: bool) -> dict:
        clean = case.backdoor == "none"
        return {"case": case.name, "dataset": case.dataset, "backdoor": case.backdoor,
                "right_class": None if clean else right, "false_alarm": (not right) if clean else None,
                "verdict": "backdoor suspected" if right != clean else "no backdoor evidence",
                "seconds": {"scan": 240.0}}

    one_pct = [c for c in cases if c.rate == 0.01]
    made = [result(c, True) for c in cases if c.rate in (0.05, 0.10) and v.CATEGORY[c.backdoor] == "A"]
    made += [result(c, k != 0) for k, c in enumerate(one_pct[:4])]  # one miss of four so far
    made += [result(c, c.seed != 2) for c in cases if c.backdoor == "none"]  # a false alarm at seed 2
    lines = "\n".join(v.summary("cpu", {r["case"]: r for r in made}))
    assert "with the right class: 40 of 40 run (100%), 40 in the matrix; goal all: **met**" in lines
    assert "at 1 %, suspected with the right class: 3 of 4 run (75%), 20 in the matrix; goal at least 80 %: **open**" \
        in lines and f"Missed: {one_pct[0].name}." in lines
    assert "Clean sets without a false alarm: 8 of 10 run" in lines and "**NOT MET**" in lines
    assert "Missed: gtsrb-clean-seed2, cifar10-clean-seed2." in lines
    assert "False-alarm rate: 20% of 10 clean sets (gtsrb 1/5, cifar10 1/5)" in lines
    assert "cifar10-badnets-20pct-rare (the rate of the paper's Table 7): not run" in lines
    left = 84 - len(made)
    assert f"Not yet run: {left} of 84 cases (about" in lines
