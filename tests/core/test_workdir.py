"""core.workdir: every path of a work directory, and stage JSONs of earlier versions read with today's keys."""

from __future__ import annotations

import json
from pathlib import Path

from aabl_cli.core.workdir import STAGES, Workdir, upgrade


def test_every_path_of_a_work_directory(tmp_path: Path) -> None:
    wd = Workdir(tmp_path / "w")
    root = tmp_path / "w"
    assert wd.scan.scores == root / "scan" / "scores.csv" and wd.scan.json == root / "scan" / "scan.json"
    assert wd.scan.model == root / "scan" / "model.safetensors" and wd.scan.scores_png == root / "scan" / "scores.png"
    assert wd.scan.history == root / "scan" / "history.csv"
    assert wd.split.kept == root / "split" / "kept" and wd.split.isolated == root / "split" / "isolated"
    assert wd.split.split_csv == root / "split" / "split.csv" and wd.split.json == root / "split" / "split.json"
    assert wd.train.model == root / "train" / "model.safetensors" and wd.train.json == root / "train" / "train.json"
    assert wd.partial("train").path == root / ".train.partial"
    assert wd.partial("scan").state == root / ".scan.partial" / "state.safetensors"
    assert wd.partial("scan").json == root / ".scan.partial" / "scan.json"  # the output, assembled there
    assert wd.lock("split") == root / ".split.lock" and wd.report == root / "report.html"
    assert wd.split.at(tmp_path / "tmp").split_csv == tmp_path / "tmp" / "split.csv"
    assert [p.path for p in wd.outputs("scan", "split")] == [root / "scan", root / "split", root / ".scan.partial"]
    assert STAGES == ("scan", "split", "train")


def test_json_of_an_earlier_version_is_read_with_todays_keys(tmp_path: Path) -> None:
    wd = Workdir(tmp_path)
    wd.scan.path.mkdir()
    wd.scan.json.write_text(json.dumps({"dataset_root": "/data", "clean_acc": 0.9, "adv_acc": 0.1,
                                        "naive_train_acc": 0.8, "seconds": {"total": 3.0}}))
    assert wd.read("scan") == {"data": "/data", "acc": 0.9, "ra": 0.1, "train_acc": 0.8, "seconds": {"total": 3.0}}
    old_split = {"dataset_root": "/data", "gamma": 0.9, "isolated_fraction": 0.1, "seconds": 2.5,
                 "per_class": [{"class": "a", "isolated_fraction": 0.2}]}
    assert upgrade(old_split, "split") == {"data": "/data", "kept_share": 0.9, "isolated_share": 0.1,
                                           "seconds": {"total": 2.5}, "per_class": [{"class": "a",
                                                                                     "isolated_share": 0.2}]}
    assert upgrade({"seconds": 7.0, "final": {"seconds": 1.0}}, "train") == {"seconds": {"total": 7.0},
                                                                           "final": {"seconds": 1.0}}
    today = {"data": "/d", "kept_share": 0.5, "seconds": {"total": 1.0}}
    assert upgrade(today, "split") == today
