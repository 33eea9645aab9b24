"""train: batched augmentation, the schedule, bit-for-bit repeatability and --resume."""

from __future__ import annotations

import contextlib
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_folder, tree_hash
from safetensors import safe_open
from safetensors.torch import load_file

import aabl_cli.graphs as graphs_mod
import aabl_cli.train as train_mod
from aabl_cli.errors import AablError
from aabl_cli.train import HISTORY_FIELDS, batch_augment, default_milestones, lr_at, train

FAST = dict(arch="cnn", epochs=2, steps=1, batch_size=16, device="cpu", quiet=True)


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize(("size", "pad"), [(16, 2), (32, 4)])
def test_batch_augment_only_crops_and_flips(size, pad):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (48, 3, size, size), dtype=torch.uint8, generator=gen)
    out = batch_augment(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    seen = set()
    for i in range(len(images)):
        padded = F.pad(images[i], (pad, pad, pad, pad))
        match = None
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[:, dy:dy + size, dx:dx + size]
                for flip in (False, True):
                    if torch.equal(out[i], crop.flip(-1) if flip else crop):
                        match = (dy, dx, flip)
        assert match is not None, f"row {i} is not a shifted/flipped copy of its input"
        seen.add(match)
    # it does augment: both flips and several shifts occur in 48 rows
    assert {m[2] for m in seen} == {False, True}
    assert len({m[:2] for m in seen}) > 5


def test_batch_augment_is_seeded():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = batch_augment(images, torch.Generator().manual_seed(4))
    b = batch_augment(images, torch.Generator().manual_seed(4))
    c = batch_augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- schedule


def test_default_milestones_are_50_75_90_percent():
    assert default_milestones(100) == [50, 75, 90]
    assert default_milestones(200) == [100, 150, 180]
    assert default_milestones(10) == [5, 8, 9]
    assert all(1 <= m <= 2 for m in default_milestones(2))


def test_lr_at_drops_tenfold_at_each_milestone():
    ms = [50, 75, 90]
    assert lr_at(0, lr=0.1, milestones=ms) == pytest.approx(0.1)
    assert lr_at(49, lr=0.1, milestones=ms) == pytest.approx(0.1)
    assert lr_at(50, lr=0.1, milestones=ms) == pytest.approx(0.01)
    assert lr_at(74, lr=0.1, milestones=ms) == pytest.approx(0.01)
    assert lr_at(75, lr=0.1, milestones=ms) == pytest.approx(0.001)
    assert lr_at(90, lr=0.1, milestones=ms) == pytest.approx(0.0001)
    assert lr_at(99, lr=0.1, milestones=ms) == pytest.approx(0.0001)
    assert lr_at(3, lr=0.1, milestones=[]) == pytest.approx(0.1)


# ---------------------------------------------------------------- whole runs


def _weights(workdir):
    return load_file(str(workdir / "train" / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _history(workdir):
    with open(workdir / "train" / "history.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_train_writes_model_json_history_and_keeps_source(tiny_data, tmp_path):
    before = tree_hash(tiny_data)
    work = tmp_path / "w"
    summary = train(tiny_data, workdir=work, cache_dir=tmp_path / "c", seed=0, **FAST)
    out = work / "train"
    # the resume state may stay beside the model (SPEC: "a second safetensors file beside the model")
    assert {p.name for p in out.iterdir()} - {"state.safetensors"} == {"history.csv", "model.safetensors",
                                                                       "train.json"}
    header, rows = _history(work)
    assert header == list(HISTORY_FIELDS)
    assert [r[0] for r in rows] == ["1", "2"]
    assert [float(r[1]) for r in rows] == pytest.approx([0.1, 0.01])  # milestones [1, 2] at 2 epochs
    saved = json.loads((out / "train.json").read_text())
    assert saved["samples"] == 36 and saved["classes"] == ["class_0", "class_1", "class_2"]
    assert saved["settings"]["eps"] == pytest.approx(8 / 255) and saved["settings"]["epochs"] == 2
    assert saved["settings"]["milestones"] == [1, 2]
    assert saved["final"]["epoch"] == 2 and saved == json.loads(json.dumps(summary, default=str))
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["stage"] == "train" and float(meta["adv_eps"]) == pytest.approx(8 / 255)
    assert meta["epochs"] == "2" and meta["dataset_fingerprint"] == saved["dataset_fingerprint"]
    assert sorted(p.name for p in work.iterdir()) == ["train"]  # the partial folder was promoted
    assert tree_hash(tiny_data) == before


def _count_epochs(monkeypatch) -> list[int]:
    """Record every training epoch the loop runs from now on."""
    calls: list[int] = []
    real = train_mod._train_epoch

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_epoch", counting)
    return calls


@contextlib.contextmanager
def interrupted_after_first_epoch(monkeypatch):
    """Ctrl-C right after epoch 1's model, state and history are saved; the patch is undone on exit."""
    real = train_mod.write_history

    def interrupt(path, rows):
        real(path, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "write_history", interrupt)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(train_mod, "write_history", real)


def test_seeded_cpu_run_repeats_bit_for_bit(tiny_data, tmp_path):
    train(tiny_data, workdir=tmp_path / "a", cache_dir=tmp_path / "c", seed=3, **FAST)
    train(tiny_data, workdir=tmp_path / "b", cache_dir=tmp_path / "c", seed=3, **FAST)
    train(tiny_data, workdir=tmp_path / "d", cache_dir=tmp_path / "c", seed=4, **FAST)
    a, b, d = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "d")
    assert _same(a, b)
    assert not _same(a, d)
    assert _history(tmp_path / "a")[1][0][2] == _history(tmp_path / "b")[1][0][2]  # same epoch-1 loss


def test_resume_after_interruption_equals_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    common = dict(cache_dir=tmp_path / "c", seed=1, **FAST)
    train(tiny_data, workdir=tmp_path / "full", **common)

    work = tmp_path / "cut"
    with interrupted_after_first_epoch(monkeypatch):
        train(tiny_data, workdir=work, **common)
    assert not (work / "train").exists()
    assert (work / ".train.partial" / "state.safetensors").is_file()

    epochs_run = _count_epochs(monkeypatch)
    train(tiny_data, workdir=work, resume=True, **common)
    assert len(epochs_run) == 1  # it resumed after epoch 1 rather than starting over
    assert _same(_weights(work), _weights(tmp_path / "full"))
    header, rows = _history(work)
    assert [r[0] for r in rows] == ["1", "2"]
    assert [r[2] for r in rows] == [r[2] for r in _history(tmp_path / "full")[1]]  # identical losses
    assert not (work / ".train.partial").exists()


def test_resume_with_other_settings_refused(tiny_data, tmp_path, monkeypatch):
    common = dict(cache_dir=tmp_path / "c", seed=1, **FAST)
    with interrupted_after_first_epoch(monkeypatch):
        train(tiny_data, workdir=tmp_path / "w", **common)
    with pytest.raises(AablError, match="other settings"):
        train(tiny_data, workdir=tmp_path / "w", resume=True, **{**common, "seed": 2})


def test_resume_without_partial_state_starts_over(tiny_data, tmp_path, monkeypatch):
    common = dict(cache_dir=tmp_path / "c", seed=1, **FAST)
    train(tiny_data, workdir=tmp_path / "a", **common)
    epochs_run = _count_epochs(monkeypatch)
    train(tiny_data, workdir=tmp_path / "b", resume=True, **common)
    assert len(epochs_run) == 2
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_plain_training_with_eps_zero(tiny_data, tmp_path, monkeypatch):
    def no_attack(*args, **kwargs):
        raise AssertionError("eps 0 must not run PGD")

    monkeypatch.setattr(graphs_mod, "pgd", no_attack)
    summary = train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", **{**FAST, "eps": 0.0})
    assert summary["settings"]["eps"] == 0.0
    with safe_open(str(tmp_path / "w" / "train" / "model.safetensors"), framework="pt") as fh:
        assert float(fh.metadata()["adv_eps"]) == 0.0


def test_plain_training_learns_the_tiny_task(tmp_path):
    data = make_folder(tmp_path / "d", classes=3, per_class=16)
    summary = train(data, workdir=tmp_path / "w", cache_dir=tmp_path / "c",
                    **{**FAST, "eps": 0.0, "epochs": 4, "milestones": [], "lr": 0.05})
    assert summary["final"]["train_acc"] > 0.6


def test_validation_folder_adds_val_columns(tiny_data, tmp_path):
    val = make_folder(tmp_path / "val", classes=3, per_class=3, seed=9)
    train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", val=val, **{**FAST, "epochs": 1})
    header, rows = _history(tmp_path / "w")
    val_acc, val_ra = rows[0][header.index("val_acc")], rows[0][header.index("val_ra")]
    assert 0.0 <= float(val_acc) <= 1.0 and 0.0 <= float(val_ra) <= 1.0


def test_validation_folder_with_other_classes_refused(tiny_data, tmp_path):
    val = make_folder(tmp_path / "val", classes=2, per_class=2)
    with pytest.raises(AablError, match="same class folders"):
        train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", val=val, **FAST)


def test_default_data_needs_a_split(tmp_path):
    with pytest.raises(AablError, match="aabl split"):
        train(workdir=tmp_path / "w", cache_dir=tmp_path / "c", **FAST)


def test_scan_shares_the_loop_and_resumes_to_the_same_scores(tiny_data, tmp_path, monkeypatch):
    from aabl_cli.scan import scan

    common = dict(arch="cnn", epochs=2, batch_size=8, device="cpu", quiet=True, cache_dir=tmp_path / "c", seed=2)
    scan(tiny_data, workdir=tmp_path / "full", **common)
    with interrupted_after_first_epoch(monkeypatch):
        scan(tiny_data, workdir=tmp_path / "cut", **common)
    assert not (tmp_path / "cut" / "scan").exists()
    epochs_run = _count_epochs(monkeypatch)
    scan(tiny_data, workdir=tmp_path / "cut", resume=True, **common)
    assert len(epochs_run) == 1
    full = (tmp_path / "full" / "scan" / "scores.csv").read_text()
    assert (tmp_path / "cut" / "scan" / "scores.csv").read_text() == full
    assert not (tmp_path / "cut" / ".scan.partial").exists()


def test_empty_class_keeps_its_label_in_the_model(tiny_data, tmp_path):
    # After a split that isolated a whole class, kept/ has an empty folder: the model still
    # has one output per class, so its labels line up with the scan's.
    (tiny_data / "class_3").mkdir()
    with pytest.warns(UserWarning, match="class_3"):
        summary = train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", **{**FAST, "epochs": 1})
    assert summary["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert summary["class_counts"] == [12, 12, 12, 0]
    with safe_open(str(tmp_path / "w" / "train" / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["num_classes"] == "4"


def test_fgsm_rs_trains_on_one_step_of_1_25_eps(tiny_data, tmp_path, monkeypatch):
    calls = []
    real = graphs_mod.pgd

    def recording(model, x, y, **kwargs):
        calls.append(kwargs)
        return real(model, x, y, **kwargs)

    monkeypatch.setattr(graphs_mod, "pgd", recording)
    summary = train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", seed=0, adv_method="fgsm-rs",
                    **{**FAST, "steps": 7})
    assert calls and all(c["steps"] == 1 and c["random_start"] for c in calls)
    assert all(c["step_size"] == pytest.approx(1.25 * 8 / 255) and c["eps"] == pytest.approx(8 / 255)
               for c in calls)
    assert summary["settings"]["adv_method"] == "fgsm-rs" and summary["settings"]["steps"] == 1


def test_unknown_adv_method_refused(tiny_data, tmp_path):
    with pytest.raises(AablError, match="--adv-method"):
        train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", adv_method="cw", **FAST)
    assert not (tmp_path / "w").exists()


def test_compiled_training_matches_eager(tmp_path):
    """--compile: the same losses as eager training (64 images, batch 32: no partial batch to drop)."""
    from aabl_cli.evaluate import Threat
    from aabl_cli.models import build_model
    from aabl_cli.train import LoopSettings, fit

    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 3, (64,))
    histories = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("cnn", num_classes=3, image_size=(32, 32))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        threat = Threat(eps=8 / 255, step_size=2 / 255, steps=1, random_start=True)
        settings = LoopSettings(epochs=2, batch_size=32, threat=threat, milestones=[], lr=0.01, compile=compiled)
        histories.append(fit(model, x, y, optimizer=optimizer, settings=settings, device=torch.device("cpu"), seed=0,
                             partial_dir=tmp_path, resume=False, save_checkpoint=lambda path, epoch: None,
                             resume_key={}, desc="t", quiet=True))
    eager, compiled = histories
    assert [r["train_loss"] for r in compiled] == pytest.approx([r["train_loss"] for r in eager], rel=1e-3)
    assert eager[0]["train_loss"] != eager[1]["train_loss"]
