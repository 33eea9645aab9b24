"""benchmarks/peers.py: the split beside ART's and cleanlab's detectors on a tiny poisoned set scanned and split by
the real CLI, writing only under tmp_path. Without the `bench` extra (CI) the metrics, features, k-fold, result
files and tables run with stand-in defences; the real ART and cleanlab run where they are installed."""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke, make_folder

from aabl_cli.core.models import build_model

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "benchmarks" / "peers.py"
ROW_FIELDS = {"method", "settings", "flagged", "recall", "precision", "rho_vul", "gamma", "seconds", "versions",
              "device", "date"}


@pytest.fixture()
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: its helpers beside it
    spec = importlib.util.spec_from_file_location("peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def defences(peers):
    """benchmarks/peer_defences.py, as peers.py imported it."""
    return sys.modules["peer_defences"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A BadNets-poisoned folder (3 classes x 20 images of 16 px, 10 % poison) scanned for one epoch and split."""
    tmp = tmp_path_factory.mktemp("peers")
    cache = tmp / "cache"
    clean = make_folder(tmp / "clean", classes=3, per_class=20)
    steps = [("poison", clean, "--backdoor", "badnets", "--rate", "0.1", "--out", tmp / "poisoned"),
             ("scan", tmp / "poisoned", "--arch", "cnn", "--epochs", "1", "--workdir", tmp / "wd", "--device", "cpu"),
             ("split", "--workdir", tmp / "wd")]
    for step in steps:
        result = invoke(*step, *(["--cache-dir", cache] if step[0] != "split" else []), "--quiet")
        assert result.exit_code == 0, result.output
    return tmp / "wd"


def truth_rows(workdir: Path) -> list[dict]:
    """poison.csv of the scanned set, with `label` and `poisoned` as numbers."""
    data = Path(json.loads((workdir / "scan" / "scan.json").read_text())["data"])
    with open(data / "poison.csv", newline="") as fh:
        return [{**row, "label": int(row["label"]), "poisoned": int(row["poisoned"])} for row in csv.DictReader(fh)]


def numbers(row: dict) -> dict:
    """A result row's measurements."""
    return {k: row[k] for k in ("flagged", "recall", "precision", "rho_vul", "gamma")}


def run_main(peers, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["peers.py", *map(str, args)])
    peers.main()


def test_measure_matches_a_hand_count(defences):
    poisoned = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    flagged = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    # flagged 3, 2 of them poison; of the 3 poison, 2 flagged; kept 7, 1 of them poison
    assert defences.measure(flagged, poisoned) == pytest.approx(
        {"flagged": 3, "recall": 2 / 3, "precision": 2 / 3, "rho_vul": 1 / 7, "gamma": 0.7})
    nothing = defences.measure(np.zeros(10, dtype=bool), poisoned)
    assert nothing == pytest.approx({"flagged": 0, "recall": 0.0, "precision": 0.0, "rho_vul": 0.3, "gamma": 1.0})
    assert defences.measure(flagged, np.zeros(10, dtype=bool))["recall"] is None  # no poison: undefined


def test_folds_hold_each_class_evenly_and_repeat(defences):
    labels = np.repeat([0, 1, 2], [10, 7, 13])
    fold = defences.stratified_folds(labels, 3, seed=0)
    assert set(fold) == {0, 1, 2}
    for label in (0, 1, 2):
        counts = np.bincount(fold[labels == label], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert max(np.bincount(fold)) - min(np.bincount(fold)) <= 1  # 30 images: 10 a fold
    assert np.array_equal(fold, defences.stratified_folds(labels, 3, seed=0))
    assert not np.array_equal(fold, defences.stratified_folds(labels, 3, seed=1))


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_features_are_what_the_last_linear_layer_reads(defences, arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, image_size=16).eval()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    features = defences.penultimate_features(model, images, device=torch.device("cpu"), batch_size=2)
    head = defences.last_linear(model)
    assert features.shape == (5, head.in_features) and features.dtype == np.float32
    with torch.no_grad():
        logits = model(images.float() / 255)
        assert torch.allclose(head(torch.from_numpy(features)), logits, atol=1e-5)


def test_peers_beside_the_split_with_stand_in_defences(peers, defences, workdir, tmp_path, monkeypatch):
    """The whole run without ART or cleanlab: two stand-ins flag known sets, measured against poison.csv."""
    rows = truth_rows(workdir)
    n, poison = len(rows), sum(r["poisoned"] for r in rows)
    in_target = [r for r in rows if r["label"] == 0]
    chosen = [r["path"] for r in rows if r["poisoned"]][:3] + [r["path"] for r in rows if r["label"] == 1][:2]
    calls = []

    def target_class(case, settings):  # every image labelled as the target, found through the features
        calls.append("target")
        features, _ = case.features
        assert features.shape == (n, 512)
        return {**defences.measure(case.labels == 0, case.poisoned), "seconds": 0.5}

    def fixed_paths(case, settings):
        calls.append("paths")
        flagged = np.isin(np.array(case.dataset.paths), settings["paths"])
        return {**defences.measure(flagged, case.poisoned), "seconds": 0.25}

    stand_ins = {"aabl-split": peers.PEERS["aabl-split"],
                 "target": defences.Peer("stand-in: the target class", (), lambda case, args: {"k": 1}, target_class),
                 "paths": defences.Peer("stand-in: five paths", (), lambda case, args: {"paths": chosen}, fixed_paths),
                 "cleanlab": peers.PEERS["cleanlab"]}
    monkeypatch.setattr(peers, "PEERS", stand_ins)
    argv = [workdir, "--name", "tiny/badnets", "--results", tmp_path / "results", "--md", tmp_path / "PEERS.md",
            "--device", "cpu", "--cache-dir", workdir.parent / "cache", "--cleanlab-folds", "0"]
    run_main(peers, monkeypatch, *argv)

    stored = json.loads((tmp_path / "results" / "tiny-badnets.json").read_text())
    assert list(stored["peers"]) == ["aabl-split", "target", "paths"]  # cleanlab skipped: --cleanlab-folds 0
    assert stored["samples"] == n and stored["poisoned"] == poison and stored["rho"] == pytest.approx(poison / n)
    assert stored["backdoor"] == "badnets" and stored["naive"]["epochs"] == 1
    for row in stored["peers"].values():
        assert ROW_FIELDS <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("recall", "precision", "rho_vul", "gamma"))
        assert row["seconds"] >= 0
    split = json.loads((workdir / "split" / "split.json").read_text())
    aabl = stored["peers"]["aabl-split"]
    assert (aabl["flagged"], aabl["gamma"]) == (split["isolated"], split["kept_share"])
    assert {k: aabl[k] for k in ("recall", "precision", "rho_vul")} == {
        k: split["ground_truth"][k] for k in ("recall", "precision", "rho_vul")}
    # the target class holds every poison (BadNets relabels to the target)
    assert numbers(stored["peers"]["target"]) == pytest.approx(
        {"flagged": len(in_target), "recall": 1.0, "precision": poison / len(in_target), "rho_vul": 0.0,
         "gamma": 1 - len(in_target) / n})
    assert numbers(stored["peers"]["paths"]) == pytest.approx(
        {"flagged": 5, "recall": 3 / poison, "precision": 3 / 5, "rho_vul": (poison - 3) / (n - 5),
         "gamma": (n - 5) / n})
    text = (tmp_path / "PEERS.md").read_text()
    assert "### tiny/badnets" in text and f"{n:,} images, {poison:,} of them poison" in text
    assert (f"| stand-in: the target class | {len(in_target)} | 100.0 | {100 * poison / len(in_target):.1f} | 0.00 "
            f"| {100 * (1 - len(in_target) / n):.1f} | 0.5 |") in text
    assert f"| aabl split (Otsu on iFGSM scores) | {split['isolated']} |" in text

    calls.clear()
    stamp = (tmp_path / "results" / "tiny-badnets.json").stat().st_mtime_ns
    run_main(peers, monkeypatch, *argv)  # a rerun: every defence done earlier
    assert calls == [] and (tmp_path / "results" / "tiny-badnets.json").stat().st_mtime_ns == stamp
    stand_ins["paths"] = defences.Peer("stand-in: four paths", (), lambda case, args: {"paths": chosen[:4]},
                                       fixed_paths)
    run_main(peers, monkeypatch, *argv)  # one defence's settings changed: it alone runs again
    assert calls == ["paths"]
    assert json.loads((tmp_path / "results" / "tiny-badnets.json").read_text())["peers"]["paths"]["flagged"] == 4
    assert "tiny/badnets" not in (ROOT / "benchmarks" / "PEERS.md").read_text()  # nothing of it in the checkout


def test_scale_finds_reproduce_work_directories(peers, workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "PEERS", {"aabl-split": peers.PEERS["aabl-split"]})  # needs no bench extra
    shutil.copytree(workdir, tmp_path / "work" / "tiny" / "toy" / "badnets" / "aabl")  # reproduce.py's layout
    run_main(peers, monkeypatch, "--scale", "tiny", "--only", "toy/badnets,toy/blend", "--work", tmp_path / "work",
             "--results", tmp_path / "results", "--md", tmp_path / "PEERS.md", "--cache-dir", workdir.parent / "cache")
    out = capsys.readouterr().out
    assert "tiny/toy/blend: no finished split" in out and "--scale tiny --only toy/blend" in out
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["tiny-toy-badnets.json"]
    assert "### tiny/toy/badnets" in (tmp_path / "PEERS.md").read_text()


def test_missing_bench_extra_exits_2_naming_it(peers, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "art", None)  # an import of art now fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    with pytest.raises(SystemExit) as stop:
        run_main(peers, monkeypatch, tmp_path, "--results", tmp_path / "results", "--md", tmp_path / "PEERS.md")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "adversarial-robustness-toolbox and cleanlab" in err and 'pip install -e ".[bench]"' in err
    with pytest.raises(SystemExit) as stop:
        run_main(peers, monkeypatch, tmp_path, "--cleanlab-folds", "0", "--results", tmp_path / "results", "--md",
                 tmp_path / "PEERS.md")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "needs adversarial-robustness-toolbox," in err and "cleanlab," not in err
    assert not (tmp_path / "results").exists()


def test_tables_say_where_a_peer_beats_the_split(peers, tmp_path, monkeypatch):
    md = tmp_path / "PEERS.md"
    md.write_text(f"# Peers\n\nintro\n\n{peers.MARK_BEGIN}\nold\n{peers.MARK_END}\n\n## Notes\nkept\n")
    run_main(peers, monkeypatch, "--table-only", "--results", tmp_path / "results", "--md", md)
    assert "No configuration run yet." in md.read_text()

    def row(method, rho_vul, gamma):
        return {"method": method, "settings": {}, "flagged": 10, "recall": 0.9, "precision": 0.5, "rho_vul": rho_vul,
                "gamma": gamma, "seconds": 1.0, "versions": {"aabl": "x"}, "device": "CPU"}

    result = {"name": "cpu/cifar10/badnets", "samples": 1000, "poisoned": 100, "rho": 0.1, "backdoor": "badnets",
              "target": "airplane", "naive": {"arch": "cnn", "epochs": 8, "acc": 0.8, "train_seconds": 60.0},
              "peers": {"aabl-split": row("aabl split (Otsu on iFGSM scores)", 0.02, 0.80),
                        "ac-smaller": row("ART activation clustering, smaller cluster", 0.01, 0.85),
                        "ac-distance": row("ART activation clustering, distance", 0.01, 0.70),
                        "spectral-true": row("ART spectral signatures, true poison rate", 0.05, 0.80)}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cpu-cifar10-badnets.json").write_text(json.dumps(result))
    run_main(peers, monkeypatch, "--table-only", "--results", tmp_path / "results", "--md", md)
    text = md.read_text()
    assert text.startswith("# Peers\n\nintro\n") and text.endswith("## Notes\nkept\n") and "old" not in text
    assert "- cpu/cifar10/badnets: ART activation clustering, smaller cluster\n" in text
    assert "| ART activation clustering, smaller cluster | 10 | 90.0 | 50.0 | 1.00 | 85.0 | 1.0 | **beats the " \
        "split** |" in text
    assert "| ART activation clustering, distance | 10 | 90.0 | 50.0 | 1.00 | 70.0 | 1.0 | less poison left, less " \
        "data kept |" in text
    assert "| ART spectral signatures, true poison rate | 10 | 90.0 | 50.0 | 5.00 | 80.0 | 1.0 | worse than the " \
        "split |" in text
    assert "Not yet run at the cpu scale: cpu/cifar10/blend, cpu/cifar10/wanet, cpu/cifar10/clb, cpu/gtsrb/badnets." \
        in text


def test_a_workdir_without_a_split_is_refused(peers, tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEERS", {"aabl-split": peers.PEERS["aabl-split"]})  # needs no bench extra
    (tmp_path / "wd").mkdir()
    with pytest.raises(SystemExit) as stop:
        run_main(peers, monkeypatch, tmp_path / "wd", "--cleanlab-folds", "0", "--results", tmp_path / "results",
                 "--md", tmp_path / "PEERS.md", "--name", "x")
    assert "aabl split --workdir" in str(stop.value.code)


def test_real_art_and_cleanlab_beside_the_split(workdir, tmp_path, monkeypatch):
    """peers.py as a script with ART and cleanlab (the bench extra); skipped where they are not installed."""
    monkeypatch.setenv("HOME", str(tmp_path))  # ART writes ~/.art on its first import
    pytest.importorskip("art", reason="the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("cleanlab", reason="the bench extra: pip install -e '.[bench]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, PEERS, workdir, "--name", "tiny/badnets", "--results", tmp_path / "results", "--md",
           tmp_path / "PEERS.md", "--device", "cpu", "--threads", "1", "--cache-dir", workdir.parent / "cache",
           "--cleanlab-folds", "2"]
    run = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    stored = json.loads((tmp_path / "results" / "tiny-badnets.json").read_text())
    assert list(stored["peers"]) == ["aabl-split", "ac-smaller", "ac-distance", "spectral-true", "spectral-0.33",
                                     "cleanlab"]
    n, rows = stored["samples"], stored["peers"]
    for row in rows.values():
        assert ROW_FIELDS <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("recall", "precision", "rho_vul", "gamma"))
        assert 0 <= row["flagged"] <= n and row["gamma"] == pytest.approx(1 - row["flagged"] / n)
    assert rows["ac-smaller"]["settings"]["cluster_analysis"] == "smaller"
    assert rows["spectral-true"]["settings"]["expected_pp_poison"] == pytest.approx(stored["rho"])
    # spectral signatures drop the top eps_multiplier * rate of every class: 1.5 * 0.33 of each of the 3 classes
    assert abs(rows["spectral-0.33"]["flagged"] - 1.5 * 0.33 * n) <= 3
    assert "art" in rows["ac-smaller"]["versions"] and "cleanlab" in rows["cleanlab"]["versions"]
    assert rows["cleanlab"]["settings"]["folds"] == 2 and rows["cleanlab"]["train_seconds"] > 0
    assert "| cleanlab find_label_issues, k-fold |" in (tmp_path / "PEERS.md").read_text()


def test_art_reads_the_penultimate_features(defences, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # ART writes ~/.art on its first import
    pytest.importorskip("art", reason="the bench extra: pip install -e '.[bench]'")
    from art.defences.detector.poison import ActivationDefence

    linear = torch.nn.Linear(6, 3)
    classifier = defences.art_classifier(linear)
    features = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    layer = len(classifier.layer_names) - 1  # the layer ART's defences read
    assert np.allclose(classifier.get_activations(features, layer=layer), features)
    with torch.no_grad():
        assert np.allclose(classifier.predict(features), linear(torch.from_numpy(features)).numpy(), atol=1e-6)
    defaults = ActivationDefence(classifier, features, np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]).get_params()
    wanted = defences.activation_settings("smaller")(type("C", (), {"scan": {"settings": {"seed": 0}}})(), None)
    assert {k: defaults[k] for k in wanted if k != "seed"} == {k: v for k, v in wanted.items() if k != "seed"}
