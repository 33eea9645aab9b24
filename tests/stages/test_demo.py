"""`aabl demo --quick` end to end, the generated shapes it runs on, and how it plants two poisons at once."""

import csv
import json

import numpy as np
from click.testing import CliRunner

from aabl_cli.cli import cli
from aabl_cli.core.data import list_image_folder
from aabl_cli.core.synthetic import CLASSES, image_path, make_shapes, write_shapes
from aabl_cli.stages.demo import POISONS, Poison, poison_shapes, split_by_backdoor, triggered_test, write_poisoned


def test_shapes_are_balanced_deterministic_and_varied():
    images, labels = make_shapes(5, size=16, seed=3)
    assert images.shape == (50, 16, 16, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [5] * 10
    again, _ = make_shapes(5, size=16, seed=3)
    other, _ = make_shapes(5, size=16, seed=4)
    assert np.array_equal(images, again)
    assert not np.array_equal(images, other)
    assert len({img.tobytes() for img in images}) == 50


def test_written_shapes_are_an_image_folder_in_class_order(tmp_path):
    root = write_shapes(tmp_path / "shapes", per_class=2, size=16)
    listing = list_image_folder(root)
    assert listing.classes == list(CLASSES)  # index in CLASSES == label in the folder
    assert len(listing.files) == 20


def test_two_poisons_land_on_disjoint_images_at_their_rates():
    images, labels = make_shapes(20, size=16, seed=0)  # 200 images
    poisoned, new_labels, rows = poison_shapes(images, labels, seed=0)
    assert len(rows) == 200 and [r[0] for r in rows] == [image_path(i, int(y)) for i, y in enumerate(new_labels)]
    for p in POISONS:
        mine = [i for i, r in enumerate(rows) if r[2] == "poison" and r[5] == p.backdoor]
        assert len(mine) == round(p.rate * 200)
        assert all(labels[i] != p.target and new_labels[i] == p.target for i in mine)
        assert all(rows[i][3] == labels[i] and rows[i][6] == p.target for i in mine)
        assert all(not np.array_equal(poisoned[i], images[i]) for i in mine)  # the trigger changed them
    wanet_noise = [i for i, r in enumerate(rows) if r[2] == "noise"]
    assert len(wanet_noise) == 2 * round(0.1 * 200)  # WaNet's noise mode: label kept, not poisoned
    assert all(rows[i][1] == 0 and new_labels[i] == labels[i] for i in wanet_noise)
    assert sum(r[1] for r in rows) == round(sum(p.rate for p in POISONS) * 200)  # disjoint: no image counted twice
    clean = [i for i, r in enumerate(rows) if r[2] == "clean"]
    assert np.array_equal(poisoned[clean], images[clean]) and np.array_equal(new_labels[clean], labels[clean])
    again, _, rows_again = poison_shapes(images, labels, seed=0)
    assert np.array_equal(again, poisoned) and rows_again == rows


def test_a_patch_poison_and_its_test_set_carry_the_same_trigger():
    images, labels = make_shapes(4, size=16, seed=1)
    poisons = (Poison("badnets", "A", 2, 0.25),)
    poisoned, _, rows = poison_shapes(images, labels, poisons=poisons, seed=0)
    (x, y, test_rows), = triggered_test(images, labels, poisons=poisons)
    assert len(x) == int((labels != 2).sum()) and set(y.tolist()) == {2}
    assert all(r[1] == 1 and r[4] == 2 for r in test_rows)
    i = next(i for i, r in enumerate(rows) if r[1] == 1)
    assert (poisoned[i, -2:, -2:] == 255).all()  # the 2x2 white patch at 16 px
    assert (x[:, -2:, -2:] == 255).all()


def test_split_by_backdoor_counts_each_backdoors_poison(tmp_path):
    rows = [("a.png", 1, "poison", 3, 0, "badnets", 0), ("b.png", 1, "poison", 2, 0, "badnets", 0),
            ("c.png", 1, "poison", 4, 1, "wanet", 1), ("d.png", 0, "noise", 5, 5, "wanet", 1),
            ("e.png", 0, "clean", 6, 6, "", "")]
    split_csv = tmp_path / "split.csv"
    split_csv.write_text("index,path,label,score,kept\n0,a.png,0,0.1,0\n1,b.png,0,0.2,1\n2,c.png,1,5,1\n"
                         "3,d.png,5,5,1\n4,e.png,6,0.1,0\n")
    out = split_by_backdoor(split_csv, rows)
    assert out["badnets"] == {"images": 2, "kept": 1, "isolated": 1, "kept_share": 0.5, "isolated_share": 0.5}
    assert out["wanet"]["images"] == 1 and out["wanet"]["kept_share"] == 1.0
    assert out["clean"]["isolated_share"] == 1.0


def test_write_poisoned_replaces_an_older_folder(tmp_path):
    images, labels = make_shapes(2, size=16, seed=0)
    root = tmp_path / "set"
    write_poisoned(root, images, labels, [(image_path(i, int(y)), 0, "clean", int(y), int(y), "", "")
                                          for i, y in enumerate(labels)])
    write_poisoned(root, images[:5], labels[:5], [(image_path(i, int(y)), 0, "clean", int(y), int(y), "", "")
                                                  for i, y in enumerate(labels[:5])])
    assert len(list_image_folder(root).files) == 5  # nothing left over from the first write


def test_quick_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(workdir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for label in ("naive (trained on all)", "A-ABL (split + PGD-AT)", "ASR badnets", "ASR wanet", "gamma",
                  "rho_vul", "verdict", "A (badnets):", "B (wanet):"):
        assert label in result.output
    summary = json.loads((workdir / "demo.json").read_text())
    for model in ("naive", "aabl"):
        assert 0.0 <= summary[model]["acc"] <= 1.0 and 0.0 <= summary[model]["ra"] <= 1.0
        assert set(summary[model]["asr"]) == {"badnets", "wanet"}
        assert all(0.0 <= v <= 1.0 for v in summary[model]["asr"].values())
    assert 0.0 < summary["kept_share"] <= 0.9  # the split isolates at least 10 %
    assert summary["verdict"] in ("backdoor suspected", "no backdoor evidence")
    for path in ("scan/scores.csv", "scan/model.safetensors", "split/split.json", "train/model.safetensors",
                 "data/poisoned-train/poison.csv", "data/poisoned-test-badnets/poison.csv",
                 "data/poisoned-test-wanet/poison.csv", "data/clean-test/poison.csv"):
        assert (workdir / path).exists(), path
    page = (workdir / "report.html").read_text()
    assert summary["report"] == str(workdir / "report.html") and "report.html" in result.output
    assert "Most suspicious isolated images" in page and "data:image/png;base64," in page
    n = 300
    kept = sum(1 for p in (workdir / "split" / "kept").rglob("*.png"))
    assert kept == round(summary["kept_share"] * n)
    with open(workdir / "data" / "poisoned-train" / "poison.csv", newline="") as fh:
        truth = list(csv.DictReader(fh))
    assert len(truth) == n
    for backdoor in summary["backdoors"]:
        rows = [r for r in truth if r["kind"] == "poison" and r["backdoor"] == backdoor["backdoor"]]
        assert len(rows) == round(backdoor["rate"] * n) == backdoor["split"]["images"]
        assert {r["label"] for r in rows} == {str(backdoor["target"])}
        s = backdoor["split"]
        assert s["kept"] + s["isolated"] == s["images"] and 0.0 <= s["isolated_share"] <= 1.0
    poisoned = sum(int(r["poisoned"]) for r in truth)
    assert summary["rho"] == poisoned / n
    assert summary["recall"] == sum(a["split"]["isolated"] for a in summary["backdoors"]) / poisoned
    for backdoor in ("badnets", "wanet"):  # ASR sets: every test image outside the target class
        target = next(a["target"] for a in summary["backdoors"] if a["backdoor"] == backdoor)
        listing = list_image_folder(workdir / "data" / f"poisoned-test-{backdoor}")
        assert len(listing.files) == 90 and {label for _, label in listing.files} == {target}
