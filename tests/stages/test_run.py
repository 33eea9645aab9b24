"""`aabl run`: the three stages in one command, each done once, and its --dry-run plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_folder, tree_hash

import aabl_cli.core.resume as resume_mod
from aabl_cli.cli import cli
from aabl_cli.core.errors import AablError
from aabl_cli.stages.train import train

FAST = ("--arch", "cnn", "--scan-epochs", "2", "--train-epochs", "1", "--train-steps", "1", "--batch-size", "16",
        "--method", "quantile", "--fraction", "0.1", "--device", "cpu")


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _mtimes(work: Path) -> dict[str, int]:
    return {stage: (work / stage / f"{stage}.json").stat().st_mtime_ns for stage in ("scan", "split", "train")}


def test_run_does_each_stage_once(tiny_data: Path, tmp_path: Path) -> None:
    before = tree_hash(tiny_data)
    work, cache = tmp_path / "w", tmp_path / "c"
    first = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--quiet", "--json", *FAST)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["plan"] == {"scan": "to run", "split": "to run", "train": "to run"}
    assert summary["split"]["isolated"] == 4 and summary["train"]["samples"] == 32
    assert summary["train"]["settings"]["data"] == str((work / "split" / "kept").resolve())
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split", "train"]
    stamps = _mtimes(work)

    again = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--json", "--quiet", *FAST)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["plan"] == {"scan": "done", "split": "done", "train": "done"}
    assert _mtimes(work) == stamps  # nothing was redone

    more = [*FAST[:5], "2", *FAST[6:]]  # --train-epochs 2
    third = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--json", "--quiet", *more)
    assert third.exit_code == 0, third.output
    plan = json.loads(third.stdout)["plan"]
    assert plan["scan"] == plan["split"] == "done" and plan["train"] == "to redo (other epochs, milestones)"
    after = _mtimes(work)
    assert after["scan"] == stamps["scan"] and after["split"] == stamps["split"] and after["train"] != stamps["train"]
    assert json.loads((work / "train" / "train.json").read_text())["settings"]["epochs"] == 2
    assert tree_hash(tiny_data) == before


def test_a_changed_recipe_option_redoes_train_and_a_changed_precision_everything(tiny_data: Path,
                                                                                  tmp_path: Path) -> None:
    """Freshness covers --train-schedule, --train-ema, --keep and --precision through train_settings and
    scan_settings: no list of compared settings to keep up to date."""
    work, cache = tmp_path / "w", tmp_path / "c"
    assert invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--quiet", *FAST).exit_code == 0

    def plan(*extra: str) -> dict[str, str]:
        result = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--dry-run", "--json", *FAST, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["plan"]

    assert plan() == {"scan": "done", "split": "done", "train": "done"}
    assert plan("--train-ema", "0.99") == {"scan": "done", "split": "done", "train": "to redo (other ema)"}
    assert plan("--train-schedule", "onecycle")["train"] == "to redo (other schedule, milestones)"
    assert plan("--keep", "last")["train"] == "done"  # without --val the last epoch is kept either way
    assert plan("--precision", "bf16")["scan"] == "to redo (other precision)"

    again = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--quiet", "--json", *FAST,
                   "--train-ema", "0.99")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["plan"]["train"] == "to redo (other ema)" and summary["train"]["settings"]["ema"] == 0.99


def test_dry_run_plans_and_estimates_without_writing(tiny_data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    result = invoke("run", tiny_data, "--workdir", work, "--cache-dir", tmp_path / "c", "--dry-run", *FAST)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "36 images" in lines[0]
    assert [line.split()[0] for line in lines[1:4]] == ["scan", "split", "train"]
    assert all("to run (about" in line for line in lines[1:4])
    assert lines[4].startswith("  estimated time on this machine:")
    assert not work.exists()


def test_dry_run_times_the_steps_in_the_runs_precision(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """The estimate's training steps run as the stages will: bf16 autocast under --precision bf16, not float32."""
    import aabl_cli.stages.run as run_mod
    from aabl_cli.core.device import uses_bf16

    seen = []

    def recording(arch, batch, classes, side, dev):
        seen.append((arch, uses_bf16(dev)))
        return 0.01

    monkeypatch.setattr(run_mod, "_step_seconds", recording)
    for precision, bf16 in (("bf16", True), ("fp32", False)):
        seen.clear()
        result = invoke("run", tiny_data, "--workdir", tmp_path / "w", "--cache-dir", tmp_path / "c", "--dry-run",
                        "--json", *FAST, "--precision", precision)
        assert result.exit_code == 0, result.output
        assert seen == [("cnn", bf16)]
        assert json.loads(result.stdout)["estimate_s"]["train"] > 0


def test_dry_run_sees_changed_data(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    work, cache = tmp_path / "w", tmp_path / "c"
    assert invoke("run", data, "--workdir", work, "--cache-dir", cache, "--quiet", *FAST).exit_code == 0
    extra = data / "class_0" / "extra.png"
    extra.write_bytes((data / "class_1" / sorted(p.name for p in (data / "class_1").iterdir())[0]).read_bytes())
    result = invoke("run", data, "--workdir", work, "--cache-dir", cache, "--dry-run", "--json", *FAST)
    assert json.loads(result.stdout)["plan"]["scan"] == "to redo (the data changed)"


def test_run_gate_stops_before_training(tiny_data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    result = invoke("run", tiny_data, "--workdir", work, "--cache-dir", tmp_path / "c", "--fail-over", "0.05", *FAST)
    assert result.exit_code == 3
    assert "more than --fail-over 5.0%" in result.output
    assert not (work / "train").exists() and (work / "split" / "split.json").exists()


@pytest.mark.parametrize("args, message", [
    (("--link", "none"), "'none' is not one of"),
    (("--method", "fixed"), "--method fixed needs --threshold"),
])
def test_run_refuses_bad_options(tiny_data: Path, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = invoke("run", tiny_data, "--workdir", tmp_path / "w", "--arch", "cnn", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "w").exists()


def test_an_interrupted_stage_resumes_or_starts_over(tiny_data: Path, tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """resume="auto" (what run passes): the partial stage continues when its settings match and
    starts over when they do not, where an explicit --resume would refuse."""
    work = tmp_path / "w"
    common = dict(workdir=work, cache_dir=tmp_path / "c", arch="cnn", steps=1, batch_size=16, device="cpu")
    real = resume_mod.write_history

    def stop_after_first_epoch(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume_mod, "write_history", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_data, epochs=3, **common)
    monkeypatch.setattr(resume_mod, "write_history", real)

    with pytest.raises(AablError, match="other settings"):
        train(tiny_data, epochs=2, resume=True, **common)
    capsys.readouterr()
    train(tiny_data, epochs=3, resume="auto", **common)
    assert "resuming after epoch 1/3" in capsys.readouterr().err
    assert json.loads((work / "train" / "train.json").read_text())["final"]["epoch"] == 3

    monkeypatch.setattr(resume_mod, "write_history", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_data, epochs=3, **common)
    monkeypatch.setattr(resume_mod, "write_history", real)
    train(tiny_data, epochs=2, resume="auto", **common)
    assert "used other settings or data; starting over" in capsys.readouterr().err
    assert json.loads((work / "train" / "train.json").read_text())["final"]["epoch"] == 2


def test_run_scales_the_training_learning_rate_with_the_batch(tiny_data: Path, tmp_path: Path) -> None:
    work, cache = tmp_path / "w", tmp_path / "c"
    result = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--dry-run", "--json",
                    *FAST[:-2], "--device", "cpu")
    assert "learning rate scaled to 0.0125" in result.output  # --batch-size 16: 0.1 x 16 / 128
    explicit = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--dry-run", "--train-lr", "0.05",
                      *FAST)
    assert explicit.exit_code == 0 and "scaled" not in explicit.output


def test_run_passes_the_data_memory_to_both_stages_and_redoes_nothing_for_it(tiny_data: Path, tmp_path: Path) -> None:
    work, cache = tmp_path / "w", tmp_path / "c"
    first = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--quiet", "--json",
                   "--data-memory", "2K", *FAST)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["scan"]["data_path"]["mode"] == summary["train"]["data_path"]["mode"] == "streamed"
    assert "data_path" not in summary["scan"]["settings"] and "data_path" not in summary["train"]["settings"]
    again = invoke("run", tiny_data, "--workdir", work, "--cache-dir", cache, "--quiet", "--json", *FAST)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["plan"] == {"scan": "done", "split": "done", "train": "done"}
    bad = invoke("run", tiny_data, "--workdir", work, "--data-memory", "much", *FAST)
    assert bad.exit_code == 2 and "--data-memory" in bad.output
