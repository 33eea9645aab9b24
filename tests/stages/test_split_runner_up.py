"""split's runner-up test: a class robust by nature is not taken for a backdoor's target.

The fake scan models here put every image in class b; where they rank it second is what the
test reads: c for the robust core (its first pixel is white) and elsewhere a class picked by
the image's own pixels (a class robust by nature whose easiest images lean to one neighbour, as
automobiles to truck), picked by the pixels for all (relabelled images of every other class, as
poisons are), or c for every image (a target whose own neighbour pulls every second choice).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_fake_scan
from PIL import Image
from torch import nn

import aabl_cli.stages.split as split_mod
from aabl_cli.cli import cli
from aabl_cli.stages.report.html import _runner_up
from aabl_cli.stages.split import RUNNER_UP_MIN, decide, describe, read_scores, runner_up_evidence

CLASSES = ["a", "b", "c", "d"]
PER_CLASS, CORE, SIZE = 40, 24, 8


def _folder(root: Path, classes: list[str]) -> Path:
    rng = np.random.default_rng(1)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
            if name == "b" and i < CORE:
                img[0, 0] = 255  # the robust core's mark
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


class _SecondChoice(nn.Module):
    """Logits with b first; second by `kind`: "natural" c for the marked core images, spread by the
    pixels for the others; "spread" by the pixels for every image; "neighbour" c for every image."""

    def __init__(self, kind: str, num_classes: int) -> None:
        super().__init__()
        self.kind, self.num_classes = kind, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.num_classes)
        logits[:, 1] = 10.0
        others = torch.tensor([k for k in range(self.num_classes) if k != 1])
        picks = others[(x[:, :, 1, :4].flatten(1) * 255).round().sum(1).long() % len(others)]  # even over the others
        marked = (x[:, :, 0, 0] > 0.999).all(1)
        second = {"natural": torch.where(marked, 2, picks), "spread": picks,
                  "neighbour": torch.full((len(x),), 2)}[self.kind]
        logits[torch.arange(len(x)), second] = 5.0
        return logits


def _scanned(tmp_path: Path, classes: list[str] = CLASSES) -> tuple[Path, dict, list[str], np.ndarray, np.ndarray]:
    data = _folder(tmp_path / "data", classes)
    scores = np.linspace(5.0, 6.0, len(classes) * PER_CLASS)
    scores[PER_CLASS:PER_CLASS + CORE] = np.linspace(0.01, 0.02, CORE)  # b's first images: the robust core
    path = write_fake_scan(tmp_path / "w", data, scores)
    (path.parent / "model.safetensors").write_bytes(b"stand-in")  # load_model is replaced
    scan, paths, labels, values = read_scores(path)
    return path, scan, paths, labels, values


def _verdict(classes: list[str], low: float = 0.9, size: int = CORE) -> dict:
    return {"suspected_label": 1, "core_size": size, "concentration_low": low,
            "per_class": [{"class": c} for c in classes]}


def _use_model(monkeypatch, kind: str, num_classes: int = len(CLASSES)) -> None:
    monkeypatch.setattr(split_mod, "load_model",
                        lambda *a, **k: (_SecondChoice(kind, num_classes), {"image_size": [SIZE, SIZE]}))


def _test(tmp_path: Path, monkeypatch, kind: str | None, classes: list[str] = CLASSES, **verdict) -> dict:
    path, scan, paths, labels, values = _scanned(tmp_path, classes)
    if kind is not None:
        _use_model(monkeypatch, kind, len(classes))
    model = path.parent / "model.safetensors" if kind is not None else None
    return runner_up_evidence(Path(scan["data"]), paths, labels, values, values < 1.0, _verdict(classes, **verdict),
                              (SIZE, SIZE), model)


def test_one_shared_neighbour_refutes_the_concentration(tmp_path, monkeypatch):
    test = _test(tmp_path, monkeypatch, kind="natural")
    assert test["class"] == "b" and test["images"] == CORE and test["runner_up"] == "c"
    assert test["agreement"] == 1.0 and test["refuted"] is True
    assert test["reference_images"] == PER_CLASS - CORE and test["reference_agreement"] < test["threshold"]
    assert test["expected"] == pytest.approx(1 / 3) and test["threshold"] == pytest.approx(2 / 3)
    decided = decide(_verdict(CLASSES), {"found": None}, test)
    assert decided == {"verdict": "no backdoor evidence", "verdict_basis": None}
    assert "robust by nature, the concentration does not count" in "\n".join(split_mod._runner_up_lines(test))


def test_runner_ups_spread_over_the_classes_keep_the_concentration(tmp_path, monkeypatch):
    test = _test(tmp_path, monkeypatch, kind="spread")
    assert test["refuted"] is False and test["agreement"] <= test["threshold"]
    assert test["agreement"] >= 1 / 3  # three other classes: the commonest holds a third at least
    decided = decide(_verdict(CLASSES), None, test)
    assert decided == {"verdict": "backdoor suspected", "verdict_basis": "concentration"}


def test_a_neighbour_every_image_of_the_class_shares_refutes_nothing(tmp_path, monkeypatch):
    test = _test(tmp_path, monkeypatch, kind="neighbour")
    assert test["agreement"] == 1.0 > test["threshold"] and test["reference_agreement"] == 1.0
    assert test["refuted"] is False
    assert decide(_verdict(CLASSES), None, test)["verdict"] == "backdoor suspected"


def test_a_refuted_concentration_still_yields_to_a_shared_patch(tmp_path, monkeypatch):
    test = _test(tmp_path, monkeypatch, kind="natural")
    decided = decide(_verdict(CLASSES), {"found": "b"}, test)
    assert decided["verdict"] == "backdoor suspected" and decided["verdict_basis"] == "shared patch"


def test_without_the_scan_model_the_concentration_decides_alone(tmp_path, monkeypatch):
    test = _test(tmp_path, monkeypatch, kind=None)
    assert test["refuted"] is None and test["agreement"] is None and "no scan model" in test["skipped"]
    assert decide(_verdict(CLASSES), None, test)["verdict"] == "backdoor suspected"
    assert "not tested (no scan model" in "\n".join(split_mod._runner_up_lines(test))


def test_two_classes_cannot_be_tested(tmp_path, monkeypatch):
    test = _test(tmp_path, monkeypatch, kind="natural", classes=["a", "b"])
    assert test["refuted"] is None and "fewer than three classes" in test["skipped"]


def test_too_few_core_images_are_not_tested(tmp_path, monkeypatch):
    test = _test(tmp_path, monkeypatch, kind="natural", size=RUNNER_UP_MIN - 1)
    assert test["images"] == RUNNER_UP_MIN - 1 and test["refuted"] is None
    assert f"{RUNNER_UP_MIN} needed" in test["skipped"]


def test_the_expected_share_follows_the_data(tmp_path, monkeypatch):
    path, scan, paths, labels, values = _scanned(tmp_path)
    _use_model(monkeypatch, kind="natural")
    keep = labels != 3  # drop class d's images: a and c share the rest evenly
    keep[-5:] = True  # ... but for five of d's
    test = runner_up_evidence(Path(scan["data"]), [p for p, k in zip(paths, keep) if k], labels[keep], values[keep],
                              values[keep] < 1.0, _verdict(CLASSES), (SIZE, SIZE), path.parent / "model.safetensors")
    assert test["expected"] == pytest.approx(40 / 85) and test["threshold"] == pytest.approx((1 + 40 / 85) / 2)


def test_split_and_its_report_record_the_test(tmp_path, monkeypatch):
    path, *_ = _scanned(tmp_path)
    _use_model(monkeypatch, kind="natural")
    summary = split_mod.split(path, workdir=tmp_path / "w", link="none")
    assert summary["suspected_class"] == "b" and summary["concentration_low"] >= 0.5  # b fills the core ...
    assert summary["runner_up"]["refuted"] is True  # ... with images that all go second to c
    assert summary["verdict"] == "no backdoor evidence"
    stored = json.loads((tmp_path / "w" / "split" / "split.json").read_text())
    assert stored["runner_up"]["runner_up"] == "c" and stored["verdict"] == "no backdoor evidence"
    assert "runner-up test, class b: 100% of its" in describe(summary)
    assert "go second to <b>c</b>" in _runner_up(stored["runner_up"]) and _runner_up(None) == "not tested"


def test_fail_on_suspect_passes_a_set_whose_robust_class_is_refuted(tmp_path, monkeypatch):
    path, *_ = _scanned(tmp_path)
    _use_model(monkeypatch, kind="natural")
    result = CliRunner().invoke(cli, ["split", str(path), "--workdir", str(tmp_path / "w"),
                                       "--link", "none", "--fail-on-suspect"])
    assert result.exit_code == 0, result.output
    _use_model(monkeypatch, kind="spread")
    result = CliRunner().invoke(cli, ["split", str(path), "--workdir", str(tmp_path / "w2"),
                                       "--link", "none", "--fail-on-suspect"])
    assert result.exit_code == 3, result.output
