"""scan: naive training through the shared loop, iFGSM scores in dataset order, what scan.json records,
scoring with a given checkpoint, and resuming to the same scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import count_epochs, csv_rows, interrupted_after_first_epoch, invoke, make_folder, tree_hash
from safetensors import safe_open

import aabl_cli.stages.scan as scan_mod
from aabl_cli.core.checkpoint import load_model
from aabl_cli.core.data import load_image_folder
from aabl_cli.stages.scan import SCORE_FIELDS, scan, scan_settings, score_samples

COMMON = dict(arch="cnn", epochs=1, batch_size=8, device="cpu", quiet=True, seed=1)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One scan of a tiny folder (36 images, one epoch), read by the tests below."""
    base = tmp_path_factory.mktemp("scan")
    data = make_folder(base / "data")
    before = tree_hash(data)
    summary = scan(data, workdir=base / "w", cache_dir=base / "c", **COMMON)
    return {"data": data, "work": base / "w", "cache": base / "c", "summary": summary, "before": before}


def test_scan_writes_its_outputs_and_leaves_the_data_alone(scanned):
    out = scanned["work"] / "scan"
    # the resume state stays beside the model, as in train/
    assert {p.name for p in out.iterdir()} - {"state.safetensors"} == {"scores.csv", "scan.json", "model.safetensors",
                                                                       "scores.png", "history.csv"}
    header, rows = csv_rows(out / "scores.csv")
    assert header == list(SCORE_FIELDS) and [int(r[0]) for r in rows] == list(range(36))
    assert json.loads((out / "scan.json").read_text()) == json.loads(json.dumps(scanned["summary"]))
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["stage"] == "scan" and float(meta["eps"]) == 0.0 and "adv_eps" not in meta
    assert sorted(p.name for p in scanned["work"].iterdir()) == ["scan"]  # the resume folder was promoted
    assert tree_hash(scanned["data"]) == scanned["before"]


def test_scan_json_numbers_are_those_of_its_scores(scanned):
    """acc and ra in scan.json are the naive model's accuracy on its own images, clean and under the
    scoring iFGSM: the shares of scores.csv whose pred_clean and pred_adv equal the label."""
    summary = scanned["summary"]
    header, rows = csv_rows(scanned["work"] / "scan" / "scores.csv")
    label, clean, adv = (np.array([int(r[header.index(k)]) for r in rows]) for k in ("label", "pred_clean", "pred_adv"))
    assert summary["acc"] == pytest.approx(float((clean == label).mean()))
    assert summary["ra"] == pytest.approx(float((adv == label).mean()))
    _, history = csv_rows(scanned["work"] / "scan" / "history.csv")
    assert summary["train_acc"] == pytest.approx(float(history[-1][3]), abs=1e-6)  # the last epoch's
    assert summary["score_median"] == pytest.approx(float(np.median([float(r[4]) for r in rows])))
    assert set(summary["seconds"]) == {"train", "score", "total"}


def test_scan_records_exactly_its_settings_function(scanned):
    settings = scanned["summary"]["settings"]
    expected = scan_settings(scanned["data"], image_size=[16, 16], arch="cnn", epochs=1, lr=1e-3, batch_size=8,
                             eps=2 / 255, step_size=2 / 255, steps=5, alpha=0.1, beta=1.0, model=None, seed=1,
                             compile=False, precision="auto", distributed=settings["distributed"])
    assert settings == expected and scanned["summary"]["data"] == settings["data"] == str(scanned["data"].resolve())


def test_bf16_scan_on_the_cpu_scores_finitely_and_records_its_precision(tmp_path):
    data = make_folder(tmp_path / "data")
    summary = scan(data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", precision="bf16", **COMMON)
    assert summary["settings"]["precision"] == "bf16"
    _, rows = csv_rows(tmp_path / "w" / "scan" / "scores.csv")
    assert len(rows) == 36 and all(np.isfinite(float(r[4])) for r in rows)


def test_scores_are_sce_of_the_ifgsm_example_in_dataset_order(scanned):
    """score_samples on a shuffled batch order gives each image the score scores.csv holds for it."""
    model, _ = load_model(scanned["work"] / "scan" / "model.safetensors")
    data = load_image_folder(scanned["data"], cache_dir=scanned["cache"], quiet=True)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    scores = score_samples(model, data.images[order], data.labels[order], device=torch.device("cpu"), eps=2 / 255,
                           step_size=2 / 255, steps=5, batch_size=7)
    header, rows = csv_rows(scanned["work"] / "scan" / "scores.csv")
    on_disk = np.array([float(r[header.index("score")]) for r in rows])
    assert scores["score"] == pytest.approx(on_disk[order.numpy()], rel=1e-4, abs=1e-5)


def test_skip_bad_files_lists_them(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=4)
    (data / "class_1" / "broken.png").write_text("not an image")
    result = invoke("scan", data, "--arch", "cnn", "--epochs", "0", "--workdir", tmp_path / "w", "--cache-dir",
                    tmp_path / "c", "--device", "cpu", "--on-bad-file", "skip", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 8
    assert [s["path"] for s in summary["skipped"]] == ["class_1/broken.png"]
    assert len(csv_rows(tmp_path / "w" / "scan" / "scores.csv")[1]) == 8


def test_scan_with_model_skips_training_and_gives_the_same_scores(scanned, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("scan --model must not train")

    monkeypatch.setattr(scan_mod, "fit", no_training)
    model = scanned["work"] / "scan" / "model.safetensors"
    result = invoke("scan", scanned["data"], "--model", model, "--workdir", tmp_path / "w", "--device", "cpu",
                    "--cache-dir", tmp_path / "c", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["settings"]["epochs"] == 0 and summary["settings"]["arch"] == "cnn"
    assert summary["samples"] == 36
    header, first = csv_rows(scanned["work"] / "scan" / "scores.csv")
    header_again, second = csv_rows(tmp_path / "w" / "scan" / "scores.csv")
    assert header_again == header and len(second) == len(first) == 36
    # The trained model in memory and the one reloaded from disk may run other CPU kernels (oneDNN
    # picks them per machine): the scores agree to float noise, not bit for bit.
    numeric = {"score", "ce_adv", "loss_clean"}
    for row, again in zip(first, second):
        for name, value, value_again in zip(header, row, again):
            if name in numeric:
                assert float(value_again) == pytest.approx(float(value), rel=1e-4, abs=1e-5), name
            else:
                assert value_again == value, name


def test_scan_with_a_checkpoint_for_other_classes_exits_2(scanned, tmp_path):
    other = make_folder(tmp_path / "other", classes=2, per_class=3)
    result = invoke("scan", other, "--model", scanned["work"] / "scan" / "model.safetensors", "--workdir",
                    tmp_path / "w", "--device", "cpu", "--cache-dir", tmp_path / "c", "--quiet")
    assert result.exit_code == 2, result.output
    assert "trained on classes" in result.stderr and "Traceback" not in result.output


def test_scan_with_a_pickle_checkpoint_exits_2(tiny_data, tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x80\x04\x95 pickle bytes")
    result = invoke("scan", tiny_data, "--model", fake, "--workdir", tmp_path / "w", "--device", "cpu",
                    "--cache-dir", tmp_path / "c", "--quiet")
    assert result.exit_code == 2, result.output
    assert "not a safetensors file" in result.stderr and "Traceback" not in result.output


def test_scan_shares_the_loop_and_resumes_to_the_same_scores(tiny_data, tmp_path, monkeypatch):
    common = dict(arch="cnn", epochs=2, batch_size=8, device="cpu", quiet=True, cache_dir=tmp_path / "c", seed=2)
    scan(tiny_data, workdir=tmp_path / "full", **common)
    with interrupted_after_first_epoch(monkeypatch):
        scan(tiny_data, workdir=tmp_path / "cut", **common)
    assert not (tmp_path / "cut" / "scan").exists()
    epochs_run = count_epochs(monkeypatch)
    scan(tiny_data, workdir=tmp_path / "cut", resume=True, **common)
    assert len(epochs_run) == 1
    full = (tmp_path / "full" / "scan" / "scores.csv").read_text()
    assert (tmp_path / "cut" / "scan" / "scores.csv").read_text() == full
    assert not (tmp_path / "cut" / ".scan.partial").exists()


def test_a_streamed_scan_writes_the_resident_scores_and_records_its_path(scanned, tmp_path):
    streamed = scan(scanned["data"], workdir=tmp_path / "w", cache_dir=scanned["cache"], data_memory="4K", **COMMON)
    assert (tmp_path / "w" / "scan" / "scores.csv").read_bytes() == \
        (scanned["work"] / "scan" / "scores.csv").read_bytes()
    a, b = (load_model(w / "scan" / "model.safetensors")[0].state_dict() for w in (scanned["work"], tmp_path / "w"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    resident = scanned["summary"]["data_path"]
    assert resident["mode"] == "resident" and resident["decoded_bytes"] == 36 * 3 * 16 * 16
    assert streamed["data_path"] == {"mode": "streamed", "reason": "decoded 27 KiB > budget 4 KiB (--data-memory)",
                                     "budget_bytes": 4096, "decoded_bytes": 27648}
    assert streamed["settings"] == scanned["summary"]["settings"]  # the path is not a setting


def test_an_interrupted_streamed_scan_resumes_to_the_resident_scores(tiny_data, tmp_path, monkeypatch):
    common = dict(arch="cnn", epochs=2, batch_size=8, device="cpu", quiet=True, cache_dir=tmp_path / "c", seed=2)
    scan(tiny_data, workdir=tmp_path / "full", **common)
    with interrupted_after_first_epoch(monkeypatch):
        scan(tiny_data, workdir=tmp_path / "cut", data_memory="1K", **common)
    epochs_run = count_epochs(monkeypatch)
    resumed = scan(tiny_data, workdir=tmp_path / "cut", resume=True, data_memory="1K", **common)
    assert len(epochs_run) == 1 and resumed["data_path"]["mode"] == "streamed"
    assert (tmp_path / "cut" / "scan" / "scores.csv").read_bytes() == \
        (tmp_path / "full" / "scan" / "scores.csv").read_bytes()
