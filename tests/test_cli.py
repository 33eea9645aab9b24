"""cli: help and defaults, budget parsing, exit codes, and the three stages chained on default paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import csv_rows, invoke, make_folder, tree_hash
from safetensors import safe_open

import aabl_cli.stages.split as split_mod
from aabl_cli.cli import cli
from aabl_cli.options import BUDGET, SHARE

SCORE_COLUMNS = ["index", "path", "label", "class", "score", "ce_adv", "loss_clean", "pred_clean", "pred_adv"]


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


# ---------------------------------------------------------------- help and option types


def test_group_help_and_version():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for name in ("scan", "split", "train"):
        assert name in result.output
    result = invoke("--version")
    assert result.exit_code == 0 and "aabl" in result.output


def _has_default(option: click.Option) -> bool:
    """True when the option has a real default (click 8.3+ marks 'no default' with an UNSET sentinel)."""
    return not option.required and option.default is not None and getattr(option.default, "name", "") != "UNSET"


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_help_exits_0_and_shows_defaults(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "[default:" in result.output
    params = cli.commands[command].params
    hidden = [p.name for p in params if isinstance(p, click.Option) and not p.is_flag and _has_default(p)
              and not p.show_default]
    assert hidden == [], f"options whose default --help does not show: {hidden}"


def test_help_shows_the_papers_budgets():
    scan_help = invoke("scan", "--help").output
    assert "2/255" in scan_help and "1/255" in scan_help and "Tiny-ImageNet" in scan_help
    train_help = invoke("train", "--help").output
    assert "8/255" in train_help and "2/255" in train_help
    split_help = invoke("split", "--help").output
    assert "otsu" in split_help and "0.10" in split_help


@pytest.mark.parametrize(("text", "value"), [("8/255", 8 / 255), ("0.0314", 0.0314), ("0", 0.0), ("1", 1.0),
                                             (" 2/255 ", 2 / 255)])
def test_budget_accepts_fractions_and_decimals(text, value):
    assert BUDGET.convert(text, None, None) == pytest.approx(value, abs=0)


@pytest.mark.parametrize(("text", "value"), [("0.1", 0.1), ("1/10", 0.1), ("10%", 0.1), ("0", 0.0)])
def test_share_accepts_fractions_and_percentages(text, value):
    assert SHARE.convert(text, None, None) == pytest.approx(value)


@pytest.mark.parametrize(("command", "args", "message"), [
    ("scan", ["--eps", "abc"], "not a number"),
    ("scan", ["--eps", "1/0"], "not a number"),
    ("scan", ["--eps", "-1/255"], "negative"),
    ("scan", ["--eps", "2"], "did you mean 2/255"),
    ("scan", ["--step-size", "3"], "did you mean 3/255"),
    ("scan", ["--eps", "__import__('os')"], "not a number"),
    ("train", ["--eps", "8"], "did you mean 8/255"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("train", ["--milestones", "a,b"], "integers"),
    ("train", ["--milestones", "5", "--epochs", "2"], "1..2"),
    ("scan", ["--arch", "transformer"], "--arch"),
    ("split", ["--min-isolated", "1.5"], "outside [0, 1]"),
    ("split", ["--fail-over", "abc"], "not a fraction"),
    ("train", ["--schedule", "onecycle", "--milestones", "1"], "do not apply to onecycle"),
    ("train", ["--ema", "1"], "--ema"),
    ("train", ["--ema", "-0.1"], "--ema"),
    ("train", ["--keep", "first"], "--keep"),
    ("train", ["--precision", "fp16"], "--precision"),
    ("run", ["--train-schedule", "onecycle", "--milestones", "1"], "do not apply to onecycle"),
    ("run", ["--train-ema", "1.5"], "--train-ema"),
])
def test_bad_options_exit_2_with_a_message(tiny_data, tmp_path, command, args, message):
    data = [] if command == "split" else [tiny_data]
    result = invoke(command, *data, *args, "--workdir", tmp_path / "w")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", ["scan", "train"])
def test_bad_data_path_exits_2(tmp_path, command):
    result = invoke(command, tmp_path / "missing", "--workdir", tmp_path / "w")
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output
    (tmp_path / "file.txt").write_text("x")
    result = invoke(command, tmp_path / "file.txt", "--workdir", tmp_path / "w")
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize("setup", ["no_classes", "one_class", "corrupt_image", "text_file"])
def test_bad_data_exits_2_naming_the_problem_without_traceback(tmp_path, setup):
    data = tmp_path / "data"
    if setup == "no_classes":
        data.mkdir()
        expected = "no class folders"
    elif setup == "one_class":
        make_folder(data, classes=1, per_class=3)
        expected = "at least 2"
    elif setup == "corrupt_image":
        make_folder(data, classes=2, per_class=3)
        (data / "class_1" / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        expected = "img_001.png"
    else:
        make_folder(data, classes=2, per_class=3)
        (data / "class_0" / "labels.txt").write_text("x")
        expected = "labels.txt"
    before = tree_hash(data)
    result = invoke("scan", data, "--arch", "cnn", "--epochs", "1", "--workdir", tmp_path / "w", "--cache-dir",
                    tmp_path / "c", "--device", "cpu", "--quiet")
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "w" / "scan").exists()
    assert tree_hash(data) == before


def test_unknown_device_exits_2(tiny_data, tmp_path):
    result = invoke("scan", tiny_data, "--device", "tpu9", "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert "device" in result.output and "Traceback" not in result.output


def test_train_without_split_exits_2(tmp_path):
    result = invoke("train", "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert "aabl split" in result.output


def test_split_without_scan_exits_2(tmp_path):
    result = invoke("split", "--workdir", tmp_path / "w")
    assert result.exit_code == 2, result.output
    assert "aabl scan" in result.output


def test_unexpected_failure_exits_1_with_one_line(tmp_path, monkeypatch):
    def boom(**kwargs):
        raise ValueError("disk on fire")

    monkeypatch.setattr(split_mod, "split", boom)
    result = invoke("split", "--workdir", tmp_path / "w")
    assert result.exit_code == 1, result.output
    assert "ValueError: disk on fire" in result.stderr and "--debug" in result.stderr
    assert "Traceback" not in result.output


def test_interrupt_exits_130(tmp_path, monkeypatch):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(split_mod, "split", interrupted)
    result = invoke("split", "--workdir", tmp_path / "w")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr


# ---------------------------------------------------------------- the three stages on default paths


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """`aabl scan data`, `aabl split`, `aabl train` in one folder, relying on ./aabl-out.

    slow: the suite's end-to-end run (two short trainings), done once per module; the tests
    below read its outputs.
    """
    base = tmp_path_factory.mktemp("chain")
    data = make_folder(base / "data", classes=3, per_class=14, size=16, seed=1)
    hashes = {"before": tree_hash(data)}
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("XDG_CACHE_HOME", str(base / "xdg"))
        # matplotlib's own font cache goes to XDG_CACHE_HOME unless told otherwise: keep it out of the check
        mp.setenv("MPLCONFIGDIR", str(base / "mpl"))
        # batch 8: a few optimizer steps in the one epoch (the default 128 would be a single step)
        results["scan"] = invoke("scan", "data", "--arch", "cnn", "--epochs", "1", "--batch-size", "8",
                                 "--device", "cpu", "--cache-dir", "cache")
        hashes["scan"] = tree_hash(data)
        # quantile, not Otsu: on this clean, trivially separable set Otsu may isolate whole classes (the
        # scores differ by class), and train needs two non-empty classes in kept/
        results["split"] = invoke("split", "--method", "quantile", "--fraction", "0.1")
        hashes["split"] = tree_hash(data)
        results["train"] = invoke("train", "--arch", "cnn", "--epochs", "1", "--steps", "1", "--device", "cpu",
                                  "--cache-dir", "cache", "--json")
        hashes["train"] = tree_hash(data)
    return {"base": base, "data": data, "out": base / "aabl-out", "results": results, "hashes": hashes}


def test_chain_exits_0_and_leaves_the_source_alone(chain):
    for stage, result in chain["results"].items():
        assert result.exit_code == 0, f"{stage}: {result.output}"
    hashes = chain["hashes"]
    assert hashes["scan"] == hashes["before"]
    assert hashes["split"] == hashes["before"]
    assert hashes["train"] == hashes["before"]
    assert not (chain["base"] / "xdg").exists()  # --cache-dir was honoured
    assert any((chain["base"] / "cache").glob("*.npy"))


def test_chain_scan_outputs(chain):
    out = chain["out"] / "scan"
    assert {"scores.csv", "scan.json", "model.safetensors", "scores.png"} <= {p.name for p in out.iterdir()}
    header, rows = csv_rows(out / "scores.csv")
    assert header == SCORE_COLUMNS
    assert len(rows) == 42
    assert [int(r[0]) for r in rows] == list(range(42))
    assert rows[0][1] == "class_0/img_000.png" and rows[-1][1] == "class_2/img_013.png"
    assert [r[3] for r in rows] == [f"class_{int(r[2])}" for r in rows]
    for r in rows:
        assert float(r[4]) >= 0 and float(r[5]) >= 0 and float(r[6]) >= 0
        assert r[7] in {"0", "1", "2"} and r[8] in {"0", "1", "2"}
    scan = json.loads((out / "scan.json").read_text())
    assert Path(scan["data"]) == chain["data"].resolve()
    assert scan["samples"] == 42 and scan["classes"] == ["class_0", "class_1", "class_2"]
    assert scan["settings"]["eps"] == pytest.approx(2 / 255) and scan["settings"]["steps"] == 5
    assert len(scan["dataset_fingerprint"]) == 64
    meta = _meta(out / "model.safetensors")
    assert meta["stage"] == "scan" and meta["arch"] == "cnn" and float(meta["eps"]) == 0.0
    assert meta["dataset_fingerprint"] == scan["dataset_fingerprint"]
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scanned 42 images" in chain["results"]["scan"].stdout


def test_chain_split_outputs(chain):
    out = chain["out"] / "split"
    header, rows = csv_rows(out / "split.csv")
    assert header == ["index", "path", "label", "score", "kept"]
    assert len(rows) == 42
    for tree in ("kept", "isolated"):
        assert sorted(p.name for p in (out / tree).iterdir()) == ["class_0", "class_1", "class_2"]
    kept = {p.relative_to(out / "kept").as_posix() for p in (out / "kept").rglob("*.png")}
    isolated = {p.relative_to(out / "isolated").as_posix() for p in (out / "isolated").rglob("*.png")}
    assert kept.isdisjoint(isolated) and len(kept) + len(isolated) == 42
    assert kept == {r[1] for r in rows if r[4] == "1"}
    assert len(isolated) == 4  # round(0.1 * 42)
    isolated_scores = [float(r[3]) for r in rows if r[4] == "0"]
    assert max(isolated_scores) <= min(float(r[3]) for r in rows if r[4] == "1")
    summary = json.loads((out / "split.json").read_text())
    assert summary["kept"] == len(kept) and summary["isolated"] == len(isolated)
    assert summary["settings"]["method"] == "quantile" and summary["kept_share"] == pytest.approx(38 / 42)
    assert summary["verdict"] in {"backdoor suspected", "no backdoor evidence"}
    assert "verdict:" in chain["results"]["split"].stdout


def test_chain_train_outputs(chain):
    out = chain["out"] / "train"
    assert {"model.safetensors", "train.json", "history.csv"} <= {p.name for p in out.iterdir()}
    header, rows = csv_rows(out / "history.csv")
    assert header[:4] == ["epoch", "lr", "train_loss", "train_acc"]
    assert len(rows) == 1 and rows[0][0] == "1"
    saved = json.loads((out / "train.json").read_text())
    kept = len(list((chain["out"] / "split" / "kept").rglob("*.png")))
    assert saved["samples"] == kept
    # relative to where the command ran (an absolute path joins as itself)
    assert (chain["base"] / saved["settings"]["data"]).resolve() == (chain["out"] / "split" / "kept").resolve()
    assert saved["settings"]["eps"] == pytest.approx(8 / 255) and saved["settings"]["steps"] == 1
    meta = _meta(out / "model.safetensors")
    assert meta["stage"] == "train" and float(meta["eps"]) == pytest.approx(8 / 255)
    printed = json.loads(chain["results"]["train"].stdout)  # --json: parseable, and the same summary
    assert printed["samples"] == kept and printed["stage"] == "train"
    assert printed["dataset_fingerprint"] == saved["dataset_fingerprint"]


def test_split_from_the_chain_with_explicit_scores_and_quantile(chain, tmp_path):
    scores = chain["out"] / "scan" / "scores.csv"
    result = invoke("split", scores, "--workdir", tmp_path / "w", "--method", "quantile", "--fraction", "25%",
                    "--link", "none", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["isolated"] == round(0.25 * 42) and summary["settings"]["link"] == "none"
    assert not list((tmp_path / "w" / "split" / "kept").rglob("*.png"))


# ---------------------------------------------------------------- the installed executable


def _aabl() -> str:
    exe = Path(sys.executable).with_name("aabl")
    return str(exe) if exe.exists() else shutil.which("aabl") or pytest.fail("the aabl executable is not installed")


def test_installed_executable(tmp_path):
    # slow (~5-10 s): two fresh interpreters, the second imports torch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = subprocess.run([_aabl(), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "scan" in result.stdout and "split" in result.stdout and "train" in result.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([_aabl(), "scan", str(empty), "--workdir", str(tmp_path / "w"), "--cache-dir",
                             str(tmp_path / "c")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    assert "no class folders" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize(("extra", "lr"), [(("--batch-size", "32"), 0.025),
                                           (("--batch-size", "32", "--lr", "0.05"), 0.05), ((), 0.1)])
def test_train_scales_the_default_learning_rate_with_the_batch(tiny_data, tmp_path, extra, lr):
    work = tmp_path / "w"
    result = invoke("train", tiny_data, "--arch", "cnn", "--epochs", "1", "--eps", "0", "--device", "cpu",
                    "--workdir", work, "--cache-dir", tmp_path / "c", *extra)
    assert result.exit_code == 0, result.output
    saved = json.loads((work / "train" / "train.json").read_text())
    assert saved["settings"]["lr"] == pytest.approx(lr)
    assert ("learning rate scaled" in result.output) == (lr == 0.025)


def test_recipe_and_precision_flags_reach_the_stages_records(tiny_data, tmp_path):
    """--schedule, --ema, --keep and --precision: one name from flag to train.json, and evaluate's JSON."""
    work, val = tmp_path / "w", make_folder(tmp_path / "val", classes=3, per_class=2, seed=5)
    result = invoke("train", tiny_data, "--arch", "cnn", "--epochs", "2", "--steps", "1", "--batch-size", "16",
                    "--device", "cpu", "--workdir", work, "--cache-dir", tmp_path / "c", "--val", val, "--quiet",
                    "--schedule", "onecycle", "--ema", "0.9", "--keep", "last", "--precision", "bf16", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    settings = json.loads((work / "train" / "train.json").read_text())["settings"]
    assert {k: settings[k] for k in ("schedule", "ema", "keep", "precision", "milestones")} == {
        "schedule": "onecycle", "ema": 0.9, "keep": "last", "precision": "bf16", "milestones": []}
    assert summary["kept_epoch"] == 2 and "collapse_epoch" in summary and "best_val_ra" in summary
    evaluated = invoke("evaluate", work / "train" / "model.safetensors", val, "--steps", "1", "--device", "cpu",
                       "--cache-dir", tmp_path / "c", "--quiet", "--precision", "bf16")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["precision"] == "bf16"


def test_the_choices_spelled_in_options_are_the_cores():
    from aabl_cli.core.attacks import ATTACKS
    from aabl_cli.core.device import PRECISIONS
    from aabl_cli.core.loop import SCHEDULES
    from aabl_cli.options import ATTACK_CHOICES, ATTACK_STEPS, KEEP_CHOICES, PRECISION_CHOICES, SCHEDULE_CHOICES
    from aabl_cli.stages.train import KEEP

    assert (SCHEDULE_CHOICES, PRECISION_CHOICES, KEEP_CHOICES) == (SCHEDULES, PRECISIONS, KEEP)
    assert ATTACK_CHOICES == ATTACKS and tuple(ATTACK_STEPS) == ATTACKS


def test_train_says_which_epoch_it_saved_and_when_val_ra_collapsed(tiny_data, tmp_path, monkeypatch):
    import aabl_cli.stages.train as train_mod

    scripted = [0.5, 0.2]  # val_ra: best at epoch 1, below half of it at epoch 2
    monkeypatch.setattr(train_mod, "accuracy", lambda *args, threat=None, **kwargs: scripted.pop(0) if threat else 1.0)
    val = make_folder(tmp_path / "val", classes=3, per_class=2, seed=5)
    result = invoke("train", tiny_data, "--arch", "cnn", "--epochs", "2", "--steps", "1", "--device", "cpu",
                    "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c", "--val", val)
    assert result.exit_code == 0, result.output
    assert "val_ra collapsed at epoch 2" in result.stdout and "saved epoch 1, the best val_ra (50.0%)" in result.stdout
    assert "robust accuracy collapsed at epoch 2" in result.stderr  # the log line, when it happened
