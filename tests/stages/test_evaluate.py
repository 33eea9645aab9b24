"""evaluate: ACC, RA and ASR of a model whose every answer is known, the target rate, the bias warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import Threshold
from PIL import Image

from aabl_cli.cli import cli
from aabl_cli.core.checkpoint import save_model
from aabl_cli.core.models import build_model
from aabl_cli.stages.evaluate import reading_warnings


def write_grey(root: Path, per_class: dict[str, list[int]]) -> Path:
    for name, values in per_class.items():
        (root / name).mkdir(parents=True)
        for k, v in enumerate(values):
            Image.fromarray(np.full((16, 16, 3), v, dtype=np.uint8)).save(root / name / f"{k}.png")
    return root


def evaluate_threshold_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test: dict[str, list[int]],
                             poisoned: dict[str, list[int]], *options: str) -> dict:
    """`aabl evaluate` of the linear Threshold model (classes a, b) on grey test and poisoned folders."""
    test_dir, poisoned_dir = write_grey(tmp_path / "test", test), write_grey(tmp_path / "poisoned", poisoned)
    model = Threshold(linear=True)
    monkeypatch.setattr("aabl_cli.stages.evaluate.load_model",
                        lambda path, device: (model, {"classes": ["a", "b"], "image_size": [16, 16]}))
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "model.safetensors"), str(test_dir), "--poisoned",
                                      str(poisoned_dir), *options, "--device", "cpu", "--quiet",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    numbers, end = json.JSONDecoder().raw_decode(result.output)  # the JSON first, warnings after it
    numbers["printed_after"] = result.output[end:]
    return numbers


def test_evaluate_reports_acc_ra_and_asr_of_a_known_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The linear model is fooled exactly when the image lies within 8/255 of T on the right side (PGD-10 at
    step 2/255 reaches the budget from any start), so every number is known."""
    numbers = evaluate_threshold_model(tmp_path, monkeypatch,
                                       {"a": [100, 100, 100, 124, 124], "b": [200, 200, 130, 100]},
                                       {"b": [200, 200, 200, 100]}, "--restarts", "3")
    assert numbers["acc"] == pytest.approx(8 / 9)  # b's 100 is the one clean mistake
    assert numbers["ra"] == pytest.approx(5 / 9)  # a's 124 and b's 130 lie within 8/255 of T
    assert numbers["asr"] == pytest.approx(3 / 4)
    assert numbers["target"] == "b" and numbers["target_rate"] == 0.0  # every clean a stays a
    assert numbers["warnings"] == [] and "warning" not in numbers["printed_after"]
    assert numbers["threat"]["restarts"] == 3 and numbers["threat"]["eps"] == pytest.approx(8 / 255)


def test_evaluate_reports_the_target_rate_of_clean_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that calls bright images b calls two of the four clean a images b without any trigger: an ASR
    near that rate measures a bias towards the target, not a backdoor."""
    numbers = evaluate_threshold_model(tmp_path, monkeypatch, {"a": [100, 200, 210, 100], "b": [200, 200]},
                                       {"b": [200, 220, 100]}, "--eps", "0")
    assert numbers["asr"] == pytest.approx(2 / 3) and numbers["target"] == "b"
    assert numbers["target_rate"] == pytest.approx(2 / 4)
    assert numbers["acc"] == pytest.approx(4 / 6)
    # ASR 66.7 % lies 16.7 points above the target rate: a trigger may add something, so no warning
    assert numbers["warnings"] == []


def test_evaluate_warns_when_asr_is_the_models_bias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three of four clean a images go to b without a trigger, and the triggered set scores the same: the
    JSON and the terminal both say the ASR is a bias towards b."""
    numbers = evaluate_threshold_model(tmp_path, monkeypatch, {"a": [100, 200, 210, 220], "b": [200]},
                                       {"b": [200, 220, 230, 100]}, "--eps", "0")
    assert numbers["asr"] == pytest.approx(3 / 4) and numbers["target_rate"] == pytest.approx(3 / 4)
    [warning] = numbers["warnings"]
    assert "ASR 75.0% is within 10 points of the target rate 75.0%" in warning and "'b'" in warning
    assert f"warning: {warning}" in numbers["printed_after"]


@pytest.mark.parametrize(("asr", "rate", "warned"), [
    (0.84, 0.76, True),    # CIFAR-10 Blend through A-ABL at CPU scale: a collapse onto the target
    (0.30, 0.29, True),    # a model that sends 29 % of every class to the target
    (0.05, 0.05, False),   # a clean model: both near the floor, nothing to say
    (0.19, 0.19, False),   # below the 20 % floor
    (0.90, 0.30, False),   # 60 points above the bias: the trigger works
    (None, None, False),   # no --poisoned
])
def test_reading_warnings_flag_an_asr_that_is_only_bias(asr: float | None, rate: float | None, warned: bool) -> None:
    result = {} if asr is None else {"asr": asr, "target_rate": rate, "target": "airplane"}
    assert bool(reading_warnings(result)) is warned


@pytest.mark.parametrize(("attack", "steps"), [("pgd", 10), ("apgd", 100), ("autoattack", 100)])
def test_evaluate_names_the_attack_ra_is_under(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack: str,
                                              steps: int) -> None:
    """The linear model is fooled exactly where an image lies within 8/255 of T on the right side, which
    every attack finds (APGD's first step, 2 x eps, reaches the budget): RA is 5/9 under each. The JSON
    names the attack and the settings it ran with."""
    numbers = evaluate_threshold_model(tmp_path, monkeypatch,
                                       {"a": [100, 100, 100, 124, 124], "b": [200, 200, 130, 100]},
                                       {"b": [200, 200, 200, 100]}, "--attack", attack)
    assert numbers["ra"] == pytest.approx(5 / 9)
    record = numbers["attack"]
    assert record["name"] == attack and record["steps"] == steps and record["restarts"] == 1
    assert record["eps"] == pytest.approx(8 / 255)
    assert numbers["threat"]["attack"] == attack and numbers["threat"]["steps"] == steps
    if attack == "pgd":
        assert record["step_size"] == pytest.approx(2 / 255) and "parts" not in record
    else:
        assert "step_size" not in record and record["initial_step"] == pytest.approx(16 / 255)
        assert record["checkpoints"] == [22, 41, 57, 70, 80, 87, 93, 99]
        assert record["parts"] == (["apgd-ce", "apgd-t"] if attack == "autoattack" else ["apgd-ce"])
    if attack == "autoattack":  # two classes: APGD-T has no other target than APGD-CE's
        assert record["targets"] == 0 and record["not_run"] == ["fab-t", "square"]


def test_evaluate_says_in_words_which_attack_ra_is_under(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test_dir = write_grey(tmp_path / "test", {"a": [100, 124], "b": [200, 130]})
    monkeypatch.setattr("aabl_cli.stages.evaluate.load_model", lambda path, device: (
        Threshold(linear=True), {"classes": ["a", "b"], "image_size": [16, 16]}))
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "model.safetensors"), str(test_dir), "--attack",
                                      "apgd", "--steps", "20", "--device", "cpu", "--cache-dir",
                                      str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    numbers, end = json.JSONDecoder().raw_decode(result.output)
    assert numbers["attack"]["steps"] == 20 and numbers["ra"] == pytest.approx(2 / 4)
    assert "ACC 100.0%, RA 50.0% under APGD-CE with 20 iterations at eps 8/255" in result.output[end:]


@pytest.mark.parametrize(("args", "message"), [
    (["--attack", "fgsm"], "'fgsm' is not one of 'pgd', 'apgd', 'autoattack'"),
    (["--attack", "apgd", "--step-size", "1/255"], "drop --step-size, or use --attack pgd"),
    (["--attack", "autoattack", "--steps", "0"], "--steps"),
])
def test_evaluate_refuses_a_bad_attack_with_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    test_dir = write_grey(tmp_path / "test", {"a": [100]})
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "model.safetensors"), str(test_dir), *args,
                                      "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_evaluate_runs_autoattack_on_a_real_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    """A saved cnn of three classes, loaded, folded and attacked by APGD-CE and APGD-T (two targets)."""
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_model(path, build_model("cnn", num_classes=3, image_size=16), arch="cnn", classes=["class_0", "class_1",
               "class_2"], image_size=(16, 16), stage="train", eps=0.0, epochs=0, seed=0, dataset_fingerprint="0" * 64)
    out = tmp_path / "result.json"
    result = CliRunner().invoke(cli, ["evaluate", str(path), str(tiny_data), "--attack", "autoattack", "--steps", "5",
                                      "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "cache"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text())
    assert numbers["attack"]["name"] == "autoattack" and numbers["attack"]["targets"] == 2
    assert numbers["attack"]["checkpoints"] == [2, 3, 4, 5]
    assert numbers["samples"] == 36 and 0 <= numbers["ra"] <= numbers["acc"]


def test_a_streamed_evaluation_gives_the_resident_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test, poisoned = {"a": [100, 100, 100, 124, 124, 210], "b": [200, 200, 130, 100]}, {"b": [200, 200, 200, 100]}
    resident = evaluate_threshold_model(tmp_path / "r", monkeypatch, test, poisoned, "--batch-size", "3")
    streamed = evaluate_threshold_model(tmp_path / "s", monkeypatch, test, poisoned, "--batch-size", "3",
                                        "--data-memory", "1K")
    assert resident["data_path"]["mode"] == "resident"
    assert streamed["data_path"]["mode"] == "streamed" and streamed["data_path"]["decoded_bytes"] == 14 * 768
    for key in ("acc", "ra", "asr", "target_rate"):
        assert streamed[key] == resident[key], key


@pytest.mark.parametrize("size", ["lots", "12Q", "-1M"])
def test_a_bad_data_memory_exits_2_naming_the_option(tmp_path: Path, size: str) -> None:
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "m.safetensors"), str(tmp_path), "--data-memory",
                                      size])
    assert result.exit_code == 2, result.output
    assert "--data-memory" in result.output and "512M, 20G" in result.output
