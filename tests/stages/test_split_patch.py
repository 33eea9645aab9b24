"""split's second road to "backdoor suspected": a shared patch that makes the scan model's prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fake_scan
from PIL import Image
from torch import nn

import aabl_cli.stages.split as split_mod
from aabl_cli.stages.split import SHARED_PATCH_FLIP, SHARED_PATCH_RATIO, decide, describe, patch_evidence, read_scores

CLASSES = ["a", "b", "c"]
PER_CLASS, STAMPED, SIZE = 40, 20, 16


def _poisoned_folder(root: Path) -> Path:
    """Noise images, 40 a class; the first 20 of class b carry a white 3x3 patch at the bottom right."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            if label == 1 and i < STAMPED:
                img[-3:, -3:] = 255
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


class _PatchReader(nn.Module):
    """Predicts b when the bottom-right 3x3 is white, a otherwise (a model with the backdoor);
    `reads_patch=False`: b always (a model that never looked at the patch)."""

    def __init__(self, reads_patch: bool) -> None:
        super().__init__()
        self.reads_patch = reads_patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        white = (x[:, :, -3:, -3:] > 0.99).flatten(1).all(1).float() if self.reads_patch else torch.ones(len(x))
        return torch.stack([1 - white, white, torch.zeros_like(white)], dim=1)


@pytest.fixture
def scanned(tmp_path: Path) -> tuple[Path, dict, list[str], np.ndarray, np.ndarray, np.ndarray]:
    data = _poisoned_folder(tmp_path / "data")
    scores = np.full(3 * PER_CLASS, 5.0) + np.linspace(0, 1, 3 * PER_CLASS)
    scores[PER_CLASS:PER_CLASS + STAMPED] = np.linspace(0.01, 0.02, STAMPED)  # the stamped ones are robust
    path = write_fake_scan(tmp_path / "w", data, scores)
    scan, paths, labels, values = read_scores(path)
    (path.parent / "model.safetensors").write_bytes(b"stand-in")  # load_model is replaced below
    return path, scan, paths, labels, values, values < 1.0


def _evidence(scanned, monkeypatch, reads_patch: bool | None, low: float = 0.2) -> tuple[dict, dict]:
    path, scan, paths, labels, values, isolated = scanned
    if reads_patch is not None:
        monkeypatch.setattr(split_mod, "load_model",
                            lambda *a, **k: (_PatchReader(reads_patch), {"image_size": [SIZE, SIZE]}))
    verdict = {"cores": [{"size": STAMPED, "class": "b", "concentration": 0.4, "concentration_low": low}],
               "per_class": [{"class": c} for c in CLASSES], "concentration_low": low}
    model = path.parent / "model.safetensors" if reads_patch is not None else None
    patch = patch_evidence(Path(scan["data"]), paths, labels, values, isolated, verdict, (SIZE, SIZE), model)
    return verdict, patch


def test_a_patch_the_model_reads_is_found_and_suspected(scanned, monkeypatch):
    verdict, patch = _evidence(scanned, monkeypatch, reads_patch=True)
    (row,) = patch["tested"]
    assert row["class"] == "b" and row["core_images"] == STAMPED and row["reference_images"] == PER_CLASS - STAMPED
    assert row["ratio"] == pytest.approx(0.0, abs=1e-9) and row["at"] == [SIZE - 3, SIZE - 3]
    assert row["flip"] == 1.0 and row["reference_flip"] is None  # no typical b image was put in b
    assert 9 <= row["region_pixels"] <= 16
    assert patch["found"] == "b" and patch["threshold"] == SHARED_PATCH_RATIO
    decided = decide(verdict, patch)
    assert decided == {"verdict": "backdoor suspected", "verdict_basis": "shared patch", "suspected_class": "b",
                       "suspected_label": 1}
    summary = {**verdict, **decided, "shared_patch": patch}
    assert any("shared patch, class b: spread ratio 0.000" in line and "100% of them leave" in line
               for line in split_mod._patch_lines(summary["shared_patch"]))


def test_a_shared_region_the_model_ignores_is_no_evidence(scanned, monkeypatch):
    verdict, patch = _evidence(scanned, monkeypatch, reads_patch=False)
    (row,) = patch["tested"]
    assert row["ratio"] == pytest.approx(0.0, abs=1e-9) and row["flip"] == 0.0 < SHARED_PATCH_FLIP
    assert patch["found"] is None
    assert decide(verdict, patch) == {"verdict": "no backdoor evidence", "verdict_basis": None}


def test_a_shared_background_is_not_painted_over(tmp_path, monkeypatch):
    """Class b's robust images share a white left half (objects shot on white): too large for a patch."""
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            if name == "b" and i < STAMPED:
                img[:, : SIZE // 2] = 255
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    scores = np.full(3 * PER_CLASS, 5.0)
    scores[PER_CLASS:PER_CLASS + STAMPED] = 0.01
    path = write_fake_scan(tmp_path / "w", root, scores)
    scan, paths, labels, values = read_scores(path)
    model = path.parent / "model.safetensors"
    model.write_bytes(b"stand-in")
    monkeypatch.setattr(split_mod, "load_model", lambda *a, **k: pytest.fail("a background is not tested"))
    verdict = {"cores": [{"size": STAMPED, "class": "b", "concentration": 0.4, "concentration_low": 0.2}],
               "per_class": [{"class": c} for c in CLASSES], "concentration_low": 0.2}
    patch = patch_evidence(root, paths, labels, values, values < 1, verdict, (SIZE, SIZE), model)
    (row,) = patch["tested"]
    assert row["ratio"] == pytest.approx(0.0, abs=1e-9) and row["flip"] is None
    assert "a shared background" in row["skipped"] and row["region_pixels"] > SIZE * SIZE // 2
    assert patch["found"] is None


def test_without_the_scan_model_the_patch_is_not_enough(scanned, monkeypatch):
    verdict, patch = _evidence(scanned, monkeypatch, reads_patch=None)
    (row,) = patch["tested"]
    assert row["ratio"] == pytest.approx(0.0, abs=1e-9) and row["flip"] is None and "no scan model" in row["skipped"]
    assert patch["found"] is None and decide(verdict, patch)["verdict"] == "no backdoor evidence"


def test_a_class_not_over_represented_is_not_suspected_by_its_patch(scanned, monkeypatch):
    verdict, patch = _evidence(scanned, monkeypatch, reads_patch=True, low=0.0)
    assert patch["tested"][0]["flip"] == 1.0 and patch["found"] is None


def test_the_concentration_road_decides_first():
    verdict = {"concentration_low": 0.7, "per_class": [{"class": c} for c in CLASSES]}
    assert decide(verdict, None) == {"verdict": "backdoor suspected", "verdict_basis": "concentration"}
    assert decide({**verdict, "concentration_low": 0.49}, None)["verdict"] == "no backdoor evidence"


def test_too_few_core_images_are_not_tested(scanned, monkeypatch):
    path, scan, paths, labels, values, isolated = scanned
    verdict = {"cores": [{"size": 5, "class": "b", "concentration": 1.0, "concentration_low": 0.3}],
               "per_class": [{"class": c} for c in CLASSES], "concentration_low": 0.3}
    patch = patch_evidence(Path(scan["data"]), paths, labels, values, isolated, verdict, (SIZE, SIZE), None)
    assert patch["tested"][0]["ratio"] is None and patch["found"] is None
    assert "not tested (5 core and" in "\n".join(split_mod._patch_lines(patch))


def test_split_records_the_evidence_and_reports_it(scanned, tmp_path):
    path, *_ = scanned
    (path.parent / "model.safetensors").unlink()
    summary = split_mod.split(path, workdir=tmp_path / "w", link="none")
    assert summary["shared_patch"]["tested"] and summary["verdict_basis"] in ("concentration", None)
    assert "shared patch, class" in describe(summary)


# ---------------------------------------------------------------- --isolate-misfit


def _with_misfits(path: Path, misfit_rows: set[int]) -> None:
    """Edit scores.csv's pred_clean so that the naive model misses the rows `misfit_rows`."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("pred_clean")
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        cells = line.split(",")
        if i in misfit_rows:
            cells[col] = str((int(cells[header.index("label")]) + 1) % len(CLASSES))
        out.append(",".join(cells))
    path.write_text("\n".join(out) + "\n")


def test_isolate_misfit_isolates_what_the_naive_model_misses(scanned, tmp_path):
    path, *_ = scanned
    (path.parent / "model.safetensors").unlink()
    plain = split_mod.split(path, workdir=tmp_path / "w", link="none")
    kept_rows = [i for i, kept in enumerate(_kept(tmp_path / "w")) if kept]
    _with_misfits(path, set(kept_rows[:5]) | {PER_CLASS})  # five kept images, one isolated already
    summary = split_mod.split(path, workdir=tmp_path / "w", link="none", isolate_misfit=True)
    assert summary["settings"]["isolate_misfit"] is True
    assert "isolate_misfit" not in plain["settings"]  # the default records what a split.json of before it did
    assert summary["misfit_isolated"] == 5 and summary["isolated"] == plain["isolated"] + 5
    kept = _kept(tmp_path / "w")
    assert not any(kept[i] for i in kept_rows[:5]) and sum(kept) == plain["kept"] - 5
    assert "5 of them above the threshold, misfit by the naive model" in describe(summary)


def test_isolate_misfit_without_pred_clean_is_refused(scanned, tmp_path):
    path, *_ = scanned
    lines = path.read_text().splitlines()
    path.write_text("\n".join(",".join(line.split(",")[:5]) for line in lines) + "\n")  # index..score only
    assert split_mod.split(path, workdir=tmp_path / "a", link="none")["misfit_isolated"] == 0
    with pytest.raises(split_mod.AablError, match="no pred_clean column, which --isolate-misfit reads"):
        split_mod.split(path, workdir=tmp_path / "b", link="none", isolate_misfit=True)


def test_the_flag_reaches_split_json_from_the_command_line(scanned, tmp_path):
    from conftest import invoke

    path, *_ = scanned
    result = invoke("split", path, "--workdir", tmp_path / "w", "--link", "none", "--isolate-misfit", "--json")
    assert result.exit_code == 0, result.output
    assert '"isolate_misfit": true' in (tmp_path / "w" / "split" / "split.json").read_text()


def _kept(workdir: Path) -> list[bool]:
    import csv

    with open(workdir / "split" / "split.csv", newline="") as fh:
        return [row["kept"] == "1" for row in csv.DictReader(fh)]
