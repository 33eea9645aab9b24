"""core.settings: a stage is done when its JSON records the settings wanted now, every one of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aabl_cli.core.settings import changed, same, settings_for, stale_reason
from aabl_cli.stages.split import GATES, split, split_settings
from aabl_cli.stages.train import train, train_settings


def test_a_recorded_setting_run_cannot_reproduce_counts_as_changed(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    wanted = {"method": "otsu", "fraction": None, "threshold": None, "min_isolated": 0.1, "link": "copy",
              "fail_over": None, "fail_on_suspect": False}
    path.write_text(json.dumps({"settings": {**wanted, "fail_over": 0.2, "fail_on_suspect": True}}))
    assert stale_reason(path, wanted, None, ignore=GATES) is None  # the gates change no output
    assert stale_reason(path, wanted, None) == "to redo (other fail_over, fail_on_suspect)"
    path.write_text(json.dumps({"settings": {**wanted, "new_knob": 3}}))
    assert stale_reason(path, wanted, None, ignore=GATES) == "to redo (other new_knob)"
    path.write_text(json.dumps({"settings": {**wanted, "min_isolated": 0.2}}))
    assert stale_reason(path, wanted, None, ignore=GATES) == "to redo (other min_isolated)"


def test_stale_reason_names_the_data_and_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "scan.json"
    assert stale_reason(path, {}, None) == "to run"
    path.write_text("{not json")
    assert stale_reason(path, {}, None) == "to redo (scan.json is unreadable)"
    path.write_text(json.dumps({"settings": {"data": "/a", "epochs": 3}, "dataset_fingerprint": "f1"}))
    assert stale_reason(path, {"data": "/b", "epochs": 4}, "f1") == "to redo (another data folder)"
    assert stale_reason(path, {"data": "/a", "epochs": 3}, "f2") == "to redo (the data changed)"
    assert stale_reason(path, {"data": "/a", "epochs": 3}, "f1") is None
    assert stale_reason(path, {"data": "/a", "epochs": 3, "seed": 0}, "f1") == "to redo (other seed)"


def test_same_compares_floats_to_rounding_and_dicts_by_the_wanted_keys() -> None:
    assert same(8 / 255, 0.03137254901960784) and same(0.1 * 3, 0.3) and not same(0.1, 0.11)
    assert same({"world_size": 2, "backend": "gloo"}, {"world_size": 2})
    assert not same({"world_size": 1}, {"world_size": 2}) and not same(None, {"world_size": 1})
    assert same([16, 16], [16, 16]) and not same([16, 16], [24, 24]) and not same("a", 1.0)
    assert changed({"a": 1, "b": 2.0}, {"a": 1, "b": 2.0 + 1e-12, "c": 3}) == ["c"]


def test_settings_for_fills_the_stages_defaults() -> None:
    """What run compares is the stage's own settings function with the stage's defaults filling the options
    it was not given: the same dict the stage records."""
    assert settings_for(split, split_settings, {"method": "quantile", "fraction": 0.2}) == split_settings(
        method="quantile", fraction=0.2, threshold=None, min_isolated=0.10, link="copy", fail_over=None,
        fail_on_suspect=False)
    wanted = settings_for(train, train_settings, {"epochs": 4, "arch": "cnn"}, data=Path("kept"),
                          image_size=[32, 32], distributed={"world_size": 1})
    assert wanted["epochs"] == 4 and wanted["milestones"] == [2, 3, 4] and wanted["lr"] == 0.1
    assert wanted["eps"] == pytest.approx(8 / 255) and wanted["adv_method"] == "pgd"
    assert wanted["data"] == str(Path("kept").resolve()) and wanted["image_size"] == [32, 32]
