"""train: the default schedule, bit-for-bit repeatability, --resume, validation, fgsm-rs, and the recipe
options (onecycle, EMA, the best epoch kept, bf16 on the CPU)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import count_epochs, interrupted_after_first_epoch, make_folder, tree_hash
from safetensors import safe_open
from safetensors.torch import load_file

import aabl_cli.core.graphs as graphs_mod
import aabl_cli.stages.train as train_mod
from aabl_cli.core.accuracy import accuracy, balanced_subset
from aabl_cli.core.attacks import Threat
from aabl_cli.core.checkpoint import load_model
from aabl_cli.core.data import load_image_folder
from aabl_cli.core.device import make_generator
from aabl_cli.core.errors import AablError
from aabl_cli.core.resume import HISTORY_FIELDS
from aabl_cli.stages.evaluate import evaluate
from aabl_cli.stages.train import default_milestones, train, train_settings

FAST = dict(arch="cnn", epochs=2, steps=1, batch_size=16, device="cpu", quiet=True)


# ---------------------------------------------------------------- schedule


def test_default_milestones_are_50_75_90_percent():
    assert default_milestones(100) == [50, 75, 90]
    assert default_milestones(200) == [100, 150, 180]
    assert default_milestones(10) == [5, 8, 9]
    assert all(1 <= m <= 2 for m in default_milestones(2))


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
    assert meta["stage"] == "train" and float(meta["eps"]) == pytest.approx(8 / 255)
    assert "adv_eps" not in meta  # the training budget has one name: eps
    assert meta["epochs"] == "2" and meta["dataset_fingerprint"] == saved["dataset_fingerprint"]
    assert sorted(p.name for p in work.iterdir()) == ["train"]  # the partial folder was promoted
    assert tree_hash(tiny_data) == before


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

    epochs_run = count_epochs(monkeypatch)
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
    epochs_run = count_epochs(monkeypatch)
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
        assert float(fh.metadata()["eps"]) == 0.0


def test_plain_training_learns_the_tiny_task(tmp_path):
    data = make_folder(tmp_path / "d", classes=3, per_class=16)
    summary = train(data, workdir=tmp_path / "w", cache_dir=tmp_path / "c",
                    **{**FAST, "eps": 0.0, "epochs": 4, "milestones": [], "lr": 0.05})
    assert summary["final"]["train_acc"] > 0.6


def test_validation_columns_are_the_saved_models_accuracy_on_the_subset(tiny_data, tmp_path):
    """val_acc and val_ra of the last epoch are the saved model's clean and PGD accuracy on the seeded,
    class-balanced validation subset, measured again here independently of the training run."""
    val = make_folder(tmp_path / "val", classes=3, per_class=9, seed=9)
    summary = train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", val=val, val_size=12, seed=5,
                    **{**FAST, "epochs": 1})
    header, rows = _history(tmp_path / "w")
    val_acc, val_ra = float(rows[0][header.index("val_acc")]), float(rows[0][header.index("val_ra")])
    model, _ = load_model(tmp_path / "w" / "train" / "model.safetensors")
    data = load_image_folder(val, cache_dir=tmp_path / "c", quiet=True)
    idx = balanced_subset(data.labels, size=12, seed=5)
    assert len(idx) == 12  # 4 of each class
    x, y, cpu = data.images[idx], data.labels[idx], torch.device("cpu")
    threat = Threat(eps=summary["settings"]["eps"], step_size=summary["settings"]["step_size"],
                    steps=summary["settings"]["steps"])
    # the reloaded model may run other CPU kernels than the one in memory: one borderline image may flip
    one = 1 / 12 + 1e-6
    assert val_acc == pytest.approx(accuracy(model, x, y, device=cpu), abs=one)
    assert val_ra == pytest.approx(accuracy(model, x, y, device=cpu, threat=threat,
                                            generator=make_generator(cpu, 5)), abs=one)
    assert summary["final"]["val_acc"] == pytest.approx(val_acc, abs=1e-6)


def test_validation_folder_with_other_classes_refused(tiny_data, tmp_path):
    val = make_folder(tmp_path / "val", classes=2, per_class=2)
    with pytest.raises(AablError, match="same class folders"):
        train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", val=val, **FAST)


def test_default_data_needs_a_split(tmp_path):
    with pytest.raises(AablError, match="aabl split"):
        train(workdir=tmp_path / "w", cache_dir=tmp_path / "c", **FAST)


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


def test_train_records_exactly_its_settings_function(tiny_data, tmp_path):
    """train.json's settings are `train_settings` of the same options: what `aabl run` compares."""
    options = dict(arch="cnn", epochs=2, eps=8 / 255, step_size=2 / 255, steps=7, adv_method="fgsm-rs", lr=0.1,
                   momentum=0.9, weight_decay=5e-4, batch_size=16, schedule="step", milestones=None, ema=0.9,
                   keep="best", val=None, val_size=1000, seed=0, compile=False, precision="fp32")
    summary = train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", device="cpu", quiet=True, **options)
    expected = train_settings(tiny_data, image_size=[16, 16], distributed=summary["settings"]["distributed"], **options)
    assert summary["settings"] == expected
    assert expected["steps"] == 1 and expected["step_size"] == pytest.approx(1.25 * 8 / 255)  # fgsm-rs resolved
    assert expected["milestones"] == [1, 2]
    assert expected["keep"] == "last"  # without --val there is no best epoch
    assert (expected["schedule"], expected["ema"], expected["precision"]) == ("step", 0.9, "fp32")
    assert summary["kept_epoch"] == 2 and summary["collapse_epoch"] is None and summary["best_val_ra"] is None


# ---------------------------------------------------------------- the recipe options: onecycle, EMA, keep, precision

RECIPE = dict(FAST, epochs=3, schedule="onecycle", ema=0.9)


def _state(workdir):
    """The resume state promoted beside the model: `model.*` the raw weights, `ema.*` the average."""
    return load_file(str(workdir / "train" / "state.safetensors"))


def _part(state, name):
    return {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.") and k != "ema.steps"}


def _scripted_val_ra(monkeypatch, values):
    """validate()'s val_ra takes `values` in turn (val_acc 1.0), so a test decides which epoch is best."""
    values = list(values)

    def fake(model, images, labels, *, threat=None, **kwargs):
        return values.pop(0) if threat is not None else 1.0

    monkeypatch.setattr(train_mod, "accuracy", fake)


def _checkpoints(monkeypatch):
    """Every checkpoint the run writes, by its epoch count: {epochs: tensors}."""
    saved = {}
    real = train_mod.save_model

    def recording(path, model, **meta):
        saved[meta["epochs"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        real(path, model, **meta)

    monkeypatch.setattr(train_mod, "save_model", recording)
    return saved


def test_onecycle_records_each_epochs_first_rate_and_no_milestones(tiny_data, tmp_path):
    summary = train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", lr=0.1,
                    **{**FAST, "epochs": 3, "schedule": "onecycle"})
    _, rows = _history(tmp_path / "w")
    assert [float(r[1]) for r in rows] == pytest.approx([0.0, 0.1 / 1.2, 0.1 / 1.8])  # peak at epoch 1.2
    assert summary["settings"]["schedule"] == "onecycle" and summary["settings"]["milestones"] == []


@pytest.mark.parametrize(("options", "message"), [
    ({"schedule": "onecycle", "milestones": [1]}, "--milestones"),
    ({"schedule": "cosine"}, "--schedule"),
    ({"ema": 1.0}, r"--ema 1.0 is outside \[0, 1\)"),
    ({"ema": -0.5}, "--ema"),
    ({"keep": "first"}, "--keep"),
    ({"precision": "fp16"}, "--precision"),
])
def test_bad_recipe_options_refused(tiny_data, tmp_path, options, message):
    with pytest.raises(AablError, match=message):
        train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", **{**FAST, **options})
    assert not (tmp_path / "w" / "train").exists()


def test_ema_weights_are_saved_and_training_itself_is_unchanged(tiny_data, tmp_path):
    train(tiny_data, workdir=tmp_path / "plain", cache_dir=tmp_path / "c", seed=2, **FAST)
    train(tiny_data, workdir=tmp_path / "ema", cache_dir=tmp_path / "c", seed=2, ema=0.9, **FAST)
    saved, state = _weights(tmp_path / "ema"), _state(tmp_path / "ema")
    assert _same(saved, _part(state, "ema"))
    assert not _same(saved, _part(state, "model"))  # the average differs from the raw weights
    assert _same(_part(state, "model"), _weights(tmp_path / "plain"))  # the average does not steer training
    assert int(state["ema.steps"]) == 2 * 3  # 2 epochs of 3 batches (16 + 16 + 4 images)
    assert json.loads((tmp_path / "ema" / "train" / "train.json").read_text())["settings"]["ema"] == 0.9


def test_seeded_onecycle_ema_runs_repeat_bit_for_bit(tiny_data, tmp_path):
    val = make_folder(tmp_path / "val", classes=3, per_class=3, seed=9)
    for name in ("a", "b"):
        train(tiny_data, workdir=tmp_path / name, cache_dir=tmp_path / "c", seed=3, val=val, **RECIPE)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert _same(_state(tmp_path / "a"), _state(tmp_path / "b"))
    strip = [[r[i] for i in (0, 1, 2, 3, 4, 5)] for r in _history(tmp_path / "a")[1]]  # not the timings
    assert strip == [[r[i] for i in (0, 1, 2, 3, 4, 5)] for r in _history(tmp_path / "b")[1]]


@pytest.mark.parametrize(("keep", "kept"), [("best", 1), ("last", 3)])
def test_keep_saves_the_best_or_last_epoch_and_a_collapse_is_reported(tiny_data, tmp_path, monkeypatch, capsys, keep,
                                                                      kept):
    val = make_folder(tmp_path / "val", classes=3, per_class=2, seed=9)
    _scripted_val_ra(monkeypatch, [0.5, 0.2, 0.1])  # best at epoch 1, below half of it at epoch 2
    checkpoints = _checkpoints(monkeypatch)
    summary = train(tiny_data, workdir=tmp_path / "w", cache_dir=tmp_path / "c", val=val, keep=keep,
                    **{**RECIPE, "quiet": False})
    assert (summary["kept_epoch"], summary["collapse_epoch"], summary["best_val_ra"]) == (kept, 2, 0.5)
    assert _same(_weights(tmp_path / "w"), checkpoints[kept])
    assert not _same(checkpoints[1], checkpoints[3])
    with safe_open(str(tmp_path / "w" / "train" / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["epochs"] == str(kept)
    recorded = json.loads((tmp_path / "w" / "train" / "train.json").read_text())
    assert (recorded["kept_epoch"], recorded["collapse_epoch"], recorded["settings"]["keep"]) == (kept, 2, keep)
    assert "collapsed at epoch 2" in capsys.readouterr().err


def test_resume_mid_schedule_with_onecycle_ema_and_val_equals_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    val = make_folder(tmp_path / "val", classes=3, per_class=3, seed=9)
    common = dict(cache_dir=tmp_path / "c", seed=1, val=val, **RECIPE)
    full = train(tiny_data, workdir=tmp_path / "full", **common)
    work = tmp_path / "cut"
    with interrupted_after_first_epoch(monkeypatch):
        train(tiny_data, workdir=work, **common)
    epochs_run = count_epochs(monkeypatch)
    resumed = train(tiny_data, workdir=work, resume=True, **common)
    assert len(epochs_run) == 2  # epochs 2 and 3 of the one cycle
    assert _same(_weights(work), _weights(tmp_path / "full"))
    # raw weights, average, optimizer, best epoch, sampling generator; not the global RNG, which building the
    # attack's folded view advances once per `fit` and nothing in training draws from
    cut, whole = _state(work), _state(tmp_path / "full")
    assert _same({k: v for k, v in cut.items() if k != "rng"}, {k: v for k, v in whole.items() if k != "rng"})
    strip = [[r[i] for i in (0, 1, 2, 3, 4, 5)] for r in _history(work)[1]]
    assert strip == [[r[i] for i in (0, 1, 2, 3, 4, 5)] for r in _history(tmp_path / "full")[1]]
    assert resumed["kept_epoch"] == full["kept_epoch"] and resumed["best_val_ra"] == full["best_val_ra"]


def test_the_best_epoch_kept_before_an_interruption_is_saved_after_resume(tiny_data, tmp_path, monkeypatch):
    val = make_folder(tmp_path / "val", classes=3, per_class=2, seed=9)
    common = dict(cache_dir=tmp_path / "c", seed=1, val=val, **RECIPE)
    _scripted_val_ra(monkeypatch, [0.5, 0.2, 0.3])
    train(tiny_data, workdir=tmp_path / "full", **common)
    work = tmp_path / "cut"
    _scripted_val_ra(monkeypatch, [0.5])
    with interrupted_after_first_epoch(monkeypatch):
        train(tiny_data, workdir=work, **common)
    _scripted_val_ra(monkeypatch, [0.2, 0.3])
    summary = train(tiny_data, workdir=work, resume=True, **common)
    assert summary["kept_epoch"] == 1 and summary["collapse_epoch"] == 2
    assert _same(_weights(work), _weights(tmp_path / "full"))


def test_bf16_precision_on_the_cpu_trains_and_evaluates(tiny_data, tmp_path):
    val = make_folder(tmp_path / "val", classes=3, per_class=3, seed=9)
    common = dict(cache_dir=tmp_path / "c", seed=0, val=val, **FAST)
    summary = train(tiny_data, workdir=tmp_path / "bf16", precision="bf16", **common)
    train(tiny_data, workdir=tmp_path / "fp32", precision="fp32", **common)
    final = summary["final"]
    assert math.isfinite(final["train_loss"]) and 0 <= final["val_acc"] <= 1 and 0 <= final["val_ra"] <= 1
    assert summary["settings"]["precision"] == "bf16"
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "bf16").values() if v.is_floating_point())
    assert not _same(_weights(tmp_path / "bf16"), _weights(tmp_path / "fp32"))  # bf16 arithmetic did run
    result = evaluate(tmp_path / "bf16" / "train" / "model.safetensors", val, device="cpu", cache_dir=tmp_path / "c",
                      precision="bf16", quiet=True)
    assert result["precision"] == "bf16" and 0 <= result["acc"] <= 1 and 0 <= result["ra"] <= 1


def test_streamed_training_saves_the_resident_weights_bit_for_bit(tiny_data, tmp_path):
    common = dict(cache_dir=tmp_path / "c", seed=5, val=tiny_data, **FAST)
    resident = train(tiny_data, workdir=tmp_path / "r", **common)
    streamed = train(tiny_data, workdir=tmp_path / "s", data_memory="8K", **common)
    assert resident["data_path"]["mode"] == "resident" and streamed["data_path"]["mode"] == "streamed"
    assert _same(_weights(tmp_path / "r"), _weights(tmp_path / "s"))
    assert _history(tmp_path / "r")[1][-1][:6] == _history(tmp_path / "s")[1][-1][:6]  # losses, val_acc, val_ra
    assert resident["settings"] == streamed["settings"]


def test_an_interrupted_run_resumes_on_the_other_data_path(tiny_data, tmp_path, monkeypatch):
    common = dict(cache_dir=tmp_path / "c", seed=1, **FAST)
    train(tiny_data, workdir=tmp_path / "full", **common)
    work = tmp_path / "cut"
    with interrupted_after_first_epoch(monkeypatch):
        train(tiny_data, workdir=work, data_memory="1K", **common)  # streamed, then resumed resident
    epochs_run = count_epochs(monkeypatch)
    train(tiny_data, workdir=work, resume=True, **common)
    assert len(epochs_run) == 1
    assert _same(_weights(work), _weights(tmp_path / "full"))
