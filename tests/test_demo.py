"""`aabl demo --quick` end to end, and the generated shapes it runs on."""

import json

import numpy as np
from click.testing import CliRunner

from aabl_cli.cli import cli
from aabl_cli.data import list_image_folder
from aabl_cli.synthetic import CLASSES, make_shapes, write_shapes


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


def test_quick_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(workdir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for label in ("naive (trained on all)", "A-ABL (split + PGD-AT)", "gamma", "rho_vul", "verdict"):
        assert label in result.output
    summary = json.loads((workdir / "demo.json").read_text())
    for model in ("naive", "aabl"):
        for metric in ("acc", "ra", "asr"):
            assert 0.0 <= summary[model][metric] <= 1.0
    assert 0.0 < summary["gamma"] <= 0.9  # the split isolates at least 10 %
    assert summary["verdict"] in ("backdoor suspected", "no backdoor evidence")
    for path in ("scan/scores.csv", "scan/model.safetensors", "split/split.json", "train/model.safetensors",
                 "data/poisoned-train/poison.csv", "data/poisoned-test/poison.csv"):
        assert (workdir / path).exists(), path
    kept = sum(1 for p in (workdir / "split" / "kept").rglob("*.png"))
    assert kept == round(summary["gamma"] * 300)
