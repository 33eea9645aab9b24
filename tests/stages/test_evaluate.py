"""evaluate: ACC, RA and ASR of a model whose every answer is known, the target rate, the bias warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import Threshold
from PIL import Image

from aabl_cli.cli import cli
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
