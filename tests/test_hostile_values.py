"""Hostile names and values: escape sequences in file and class names, non-finite and extreme
numbers, a broken checkpoint, a wrong triggered set, a changed image size, a spreadsheet's CSV.

Whatever a dataset or an option holds, aabl prints no raw control character, writes no NaN into
JSON, refuses what it cannot use with exit 2 and a message, and never mistakes one run for another.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_folder, write_fake_scan
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import aabl_cli.core.progress as progress_mod
import aabl_cli.stages.split as split_mod
from aabl_cli.cli import cli
from aabl_cli.core.checkpoint import load_model, save_model
from aabl_cli.core.errors import AablError
from aabl_cli.core.models import build_model
from aabl_cli.core.text import json_text, printable
from aabl_cli.core.threshold import choose_isolated
from aabl_cli.options import FiniteFloat
from aabl_cli.stages.split import split

CLEAR = "\x1b[2J"  # clears the screen
TITLE = "\x1b]0;x\x07"  # sets the terminal's title
EVIL_CLASS = f"{CLEAR}wipe"
EVIL_FILE = f"{TITLE}.png"
FORMULA_CLASS = "=1+2"  # a spreadsheet formula, as a class folder name
RAW = ("\x1b", "\x07", "\r", "\x9b")


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def no_raw_controls(result) -> None:
    for text in (result.stdout, result.stderr):
        for char in RAW:
            assert char not in text, f"raw {char!r} reached the terminal: {text!r}"


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, jq) do."""
    def refuse(name: str):
        raise ValueError(f"{name} in JSON")
    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- (4) names reach the terminal escaped


def test_printable_escapes_controls_and_keeps_our_newlines() -> None:
    assert printable(f"a{CLEAR}b{TITLE}c\rd\x9be\u202ef\x7f") == r"a\x1b[2Jb\x1b]0;x\x07c\rd\x9be\u202ef\x7f"
    assert printable("one\ntwo\tthree") == r"one\ntwo\tthree"  # a name cannot forge a second line
    assert printable(f"line {CLEAR}\n\tnext", multiline=True) == "line \\x1b[2J\n\tnext"
    assert printable("ünïcode, 日本, ordinary text") == "ünïcode, 日本, ordinary text"


@pytest.fixture(scope="module")
def hostile_scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A scanned folder whose class and file names hold escape sequences and a formula:
    class folders `\\x1b[2Jwipe`, `=1+2`, `class_2`; one file named `\\x1b]0;x\\x07.png`."""
    base = tmp_path_factory.mktemp("hostile")
    data = make_folder(base / "data", classes=3, per_class=12, size=16, seed=3)
    (data / "class_0").rename(data / EVIL_CLASS)
    (data / "class_1").rename(data / FORMULA_CLASS)
    (data / FORMULA_CLASS / "img_000.png").rename(data / FORMULA_CLASS / EVIL_FILE)
    work = base / "work"
    result = invoke("scan", data, "--workdir", work, "--arch", "cnn", "--epochs", "1", "--batch-size", "8",
                    "--device", "cpu", "--cache-dir", base / "cache")
    assert result.exit_code == 0, result.output
    no_raw_controls(result)
    return {"base": base, "data": data, "work": work}


def test_hostile_names_through_split_print_escaped(hostile_scan: dict[str, Path]) -> None:
    result = invoke("split", "--workdir", hostile_scan["work"], "--method", "quantile", "--fraction", "0.25")
    assert result.exit_code == 0, result.output
    no_raw_controls(result)
    assert r"\x1b[2Jwipe" in result.stdout  # the class table shows the name, escaped
    assert "verdict: " in result.stdout
    as_json = invoke("split", "--workdir", hostile_scan["work"], "--method", "quantile", "--fraction", "0.25",
                     "--json")
    assert as_json.exit_code == 0, as_json.output
    no_raw_controls(as_json)
    summary = strict_json(as_json.stdout)
    assert [row["class"] for row in summary["per_class"]] == [EVIL_CLASS, FORMULA_CLASS, "class_2"]


def test_csv_cells_hold_the_exact_names(hostile_scan: dict[str, Path]) -> None:
    """The chosen policy (docs/data-handling.md): scores.csv and split.csv hold file and class names as
    they are, formula-like cells included, since split matches them byte for byte against the files."""
    with open(hostile_scan["work"] / "scan" / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert f"{FORMULA_CLASS}/{EVIL_FILE}" in {row["path"] for row in rows}
    assert {row["class"] for row in rows} == {EVIL_CLASS, FORMULA_CLASS, "class_2"}


def test_an_error_naming_a_hostile_file_is_escaped(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", classes=2, per_class=4)
    (data / "class_1" / f"{TITLE}notes.txt").write_text("not an image")
    result = invoke("scan", data, "--workdir", tmp_path / "w", "--arch", "cnn", "--epochs", "1", "--device", "cpu",
                    "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2, result.output
    no_raw_controls(result)
    assert r"\x1b]0;x\x07notes.txt" in result.stderr
    assert "Traceback" not in result.output


def test_usage_errors_and_debug_tracebacks_are_escaped(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", classes=2, per_class=2)
    inside = invoke("evaluate", tmp_path / "m.safetensors", data, "--out", data / f"{CLEAR}.json")
    assert inside.exit_code == 2 and "is inside the input folder" in inside.stderr
    no_raw_controls(inside)
    debug = invoke("--debug", "split", tmp_path / f"{CLEAR}scores.csv", "--workdir", tmp_path / "w")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "does not exist" in debug.stderr
    no_raw_controls(debug)
    assert r"\x1b[2Jscores.csv" in debug.stderr


def test_every_message_channel_is_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning, a log line and an error that all quote a raw escape sequence (as a message built
    from a name would): none reaches stderr raw."""
    def noisy(**kwargs):
        warnings.warn(f"warned about {CLEAR}", stacklevel=1)
        progress_mod.log(f"logged {TITLE}")
        raise AablError(f"refused {CLEAR}\rforged")

    monkeypatch.setattr(split_mod, "split", noisy)
    result = invoke("split", "--workdir", tmp_path / "w")
    assert result.exit_code == 2
    no_raw_controls(result)
    for shown in (r"warned about \x1b[2J", r"logged \x1b]0;x\x07", r"refused \x1b[2J\rforged"):
        assert shown in result.stderr

    def crash(**kwargs):
        raise ValueError(f"internal {CLEAR}")

    monkeypatch.setattr(split_mod, "split", crash)
    for args in (("split",), ("--debug", "split")):
        result = invoke(*args, "--workdir", tmp_path / "w")
        assert result.exit_code == 1 and r"ValueError: internal \x1b[2J" in result.stderr
        no_raw_controls(result)


def test_progress_bar_descriptions_are_escaped(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress_mod, "is_tty", lambda: True)
    assert list(progress_mod.progress(range(3), total=3, desc=f"decoding {CLEAR}")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert CLEAR not in err and r"decoding \x1b[2J" in err


def test_json_text_escapes_every_control_and_nulls_non_finite_numbers() -> None:
    text = json_text({"name": f"{CLEAR}\x85\u202e", "values": [float("nan"), float("inf"), -float("inf"), 1.5],
                      "nested": {"recall": float("nan")}})
    assert all(ord(c) < 0x7f and (c.isprintable()) for c in text)
    assert strict_json(text) == {"name": f"{CLEAR}\x85\u202e", "values": [None, None, None, 1.5],
                                 "nested": {"recall": None}}


# ---------------------------------------------------------------- (6) non-finite and extreme values


def test_every_float_option_refuses_nan_and_infinity() -> None:
    """No float option of any command takes plain click floats (which accept nan, inf and 1e999)."""
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param.type, click.types.FloatParamType):
                assert isinstance(param.type, FiniteFloat), f"aabl {name} {param.opts[0]} takes non-finite values"


@pytest.mark.parametrize("args", [
    ("split", "--method", "fixed", "--threshold", "nan"),
    ("split", "--method", "fixed", "--threshold", "inf"),
    ("split", "--method", "fixed", "--threshold", "-1e999"),
    ("scan", "DATA", "--lr", "nan"),
    ("scan", "DATA", "--alpha", "inf"),
    ("scan", "DATA", "--beta", "nan"),
    ("train", "DATA", "--lr", "inf"),
    ("train", "DATA", "--momentum", "nan"),
    ("train", "DATA", "--weight-decay", "nan"),
    ("run", "DATA", "--method", "fixed", "--threshold", "nan"),
    ("run", "DATA", "--scan-lr", "nan"),
    ("run", "DATA", "--train-lr", "1e999"),
], ids=lambda a: f"{a[0]}{a[-2]}={a[-1]}")
def test_non_finite_options_exit_2(tiny_data: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    work = tmp_path / "w"
    result = invoke(*(tiny_data if a == "DATA" else a for a in args), "--workdir", work)
    assert result.exit_code == 2, result.output
    assert "not a finite number" in result.stderr and "Traceback" not in result.output
    assert not work.exists()


def test_split_function_refuses_a_non_finite_threshold(tiny_data: Path, tmp_path: Path) -> None:
    scores = write_fake_scan(tmp_path / "w", tiny_data, np.linspace(0, 1, 36))
    with pytest.raises(AablError, match="not a finite number"):
        split(scores, workdir=tmp_path / "w", method="fixed", threshold=float("nan"))
    assert not (tmp_path / "w" / "split").exists()


def test_a_non_finite_score_is_refused_naming_its_line(tiny_data: Path, tmp_path: Path) -> None:
    scores = write_fake_scan(tmp_path / "w", tiny_data, np.linspace(0, 1, 36))
    lines = scores.read_text().splitlines()
    cells = lines[3].split(",")
    cells[4] = "1e999"  # overflows to inf when read
    lines[3] = ",".join(cells)
    scores.write_text("\n".join(lines) + "\n")
    result = invoke("split", "--workdir", tmp_path / "w")
    assert result.exit_code == 2, result.output
    assert "line 4" in result.stderr and "not a finite number" in result.stderr


def _bimodal(n_low: int = 5, n_high: int = 31) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.r_[rng.uniform(0.01, 0.2, n_low), rng.uniform(3, 6, n_high)][rng.permutation(n_low + n_high)]


@pytest.mark.parametrize("transform", [
    lambda s: np.where(s < 1, -1e308, 1e308),  # hi - lo overflows
    lambda s: s * 1e300,  # skimage's class variances overflow
    lambda s: s * 1e-320,  # subnormal: skimage cannot make 256 bins
    lambda s: 1e50 + s * 1e36,  # a range tiny against the magnitude
    lambda s: np.where(s < 1, -np.finfo(np.float64).max, np.finfo(np.float64).max),  # the largest floats
], ids=["pm1e308", "1e300", "subnormal", "offset", "max-float"])
def test_otsu_cuts_any_finite_range_as_it_cuts_ordinary_scores(transform) -> None:
    ordinary = _bimodal()
    expected, t = choose_isolated(ordinary, method="otsu", min_isolated=0.0)
    assert expected.sum() == 5 and math.isfinite(t)
    extreme = transform(ordinary)
    isolated, t = choose_isolated(extreme, method="otsu", min_isolated=0.0)
    assert np.array_equal(isolated, expected)
    assert math.isfinite(t) and (extreme[isolated] <= t).all() and (extreme[~isolated] >= t).all()


def test_split_of_extreme_scores_exits_0_with_finite_json(tiny_data: Path, tmp_path: Path) -> None:
    scores = np.where(_bimodal() < 1, -1e308, 1e308)
    write_fake_scan(tmp_path / "w", tiny_data, scores)
    result = invoke("split", "--workdir", tmp_path / "w", "--json")
    assert result.exit_code == 0, result.output
    summary = strict_json(result.stdout)
    assert summary["isolated"] == 5 and math.isfinite(summary["threshold"])
    assert strict_json((tmp_path / "w" / "split" / "split.json").read_text())["isolated"] == 5


def test_undefined_values_are_written_as_null(tiny_data: Path, tmp_path: Path) -> None:
    """Ground truth without any poison: recall is undefined (0/0) and JSON gets null, not NaN."""
    write_fake_scan(tmp_path / "w", tiny_data, np.linspace(0, 1, 36))
    from aabl_cli.core.data import list_image_folder

    with open(tiny_data / "poison.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "poisoned"], *[[rel, 0] for rel, _ in list_image_folder(tiny_data).files]])
    result = invoke("split", "--workdir", tmp_path / "w", "--json")
    assert result.exit_code == 0, result.output
    assert strict_json(result.stdout)["ground_truth"]["recall"] is None
    written = (tmp_path / "w" / "split" / "split.json").read_text()
    assert "NaN" not in written and strict_json(written)["ground_truth"]["recall"] is None
    text = invoke("split", "--workdir", tmp_path / "w")
    assert text.exit_code == 0 and "recall n/a (no poison)" in text.stdout


def _checkpoint(path: Path, edit=None) -> Path:
    """An untrained cnn for tiny_data's classes, its tensors edited by `edit(state)`."""
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=3, image_size=(16, 16))
    save_model(path, model, arch="cnn", classes=["class_0", "class_1", "class_2"], image_size=(16, 16),
               stage="train", eps=0.0, epochs=1, seed=0, dataset_fingerprint="ab" * 32)
    if edit is not None:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path), metadata=meta)
    return path


def _zero_std(state: dict[str, torch.Tensor]) -> None:
    state["normalize.std"] = torch.zeros_like(state["normalize.std"])


def _negative_var(state: dict[str, torch.Tensor]) -> None:
    state["net.features.0.1.running_var"] = -torch.ones_like(state["net.features.0.1.running_var"])


def _overflowing_head(state: dict[str, torch.Tensor]) -> None:
    """Finite tensors whose logits overflow float32 on any image."""
    state["net.head.1.weight"] = torch.full_like(state["net.head.1.weight"], 3e38)
    state["net.head.1.bias"] = torch.full_like(state["net.head.1.bias"], 3e38)


@pytest.mark.parametrize(("edit", "message"), [
    (_zero_std, "normalize.std"),
    (_negative_var, "negative variances"),
    (_overflowing_head, "produces non-finite outputs (NaN/inf)"),
], ids=["zero-std", "negative-running-var", "overflowing-logits"])
def test_a_checkpoint_with_non_finite_outputs_is_refused(tiny_data: Path, tmp_path: Path, edit, message: str) -> None:
    path = _checkpoint(tmp_path / "model.safetensors", edit)
    if edit is _overflowing_head:  # the premise: every tensor is finite, the outputs are not
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())
    with pytest.raises(AablError, match="corrupt"):
        load_model(path)
    for args in (("evaluate", path, tiny_data, "--eps", "0"),
                 ("scan", tiny_data, "--model", path, "--workdir", tmp_path / "w", "--arch", "cnn")):
        result = invoke(*args, "--device", "cpu", "--cache-dir", tmp_path / "c")
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "non-finite scores" not in result.stderr
        assert "acc" not in result.stdout
    assert not (tmp_path / "w" / "scan").exists()


def test_a_sound_checkpoint_still_loads(tmp_path: Path) -> None:
    model, meta = load_model(_checkpoint(tmp_path / "model.safetensors"))
    assert meta["classes"] == ["class_0", "class_1", "class_2"] and not model.training


# ---------------------------------------------------------------- (9a) ASR needs one target class


def test_evaluate_refuses_a_poisoned_folder_with_several_labels(tiny_data: Path, tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "model.safetensors")
    result = invoke("evaluate", model, tiny_data, "--poisoned", tiny_data, "--eps", "0", "--device", "cpu",
                    "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert "3 class folders" in result.stderr and "one target class" in result.stderr
    assert "aabl poison --test" in result.stderr and result.stdout == ""


def test_evaluate_measures_asr_on_a_one_class_triggered_folder(tiny_data: Path, tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "model.safetensors")
    triggered = make_folder(tmp_path / "triggered", classes=3, per_class=4)
    for name in ("class_1", "class_2"):  # as `aabl poison --test` writes it: only the target's folder has images
        shutil.rmtree(triggered / name)
    result = invoke("evaluate", model, tiny_data, "--poisoned", triggered, "--eps", "0", "--device", "cpu",
                    "--cache-dir", tmp_path / "c")
    assert result.exit_code == 0, result.output
    report = strict_json(result.stdout)
    assert report["target"] == "class_0" and 0 <= report["asr"] <= 1


# ---------------------------------------------------------------- (9b) every output-changing setting counts


FAST = ("--arch", "cnn", "--scan-epochs", "1", "--train-epochs", "1", "--train-steps", "1", "--batch-size", "16",
        "--method", "quantile", "--fraction", "0.1", "--device", "cpu")


def test_run_redoes_the_stages_when_the_image_size_changes(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", classes=3, per_class=8, size=24)
    work, cache = tmp_path / "w", tmp_path / "c"

    def run(*extra: str):
        result = invoke("run", data, "--workdir", work, "--cache-dir", cache, "--json", "--quiet", *FAST, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["plan"]

    def recorded(stage: str) -> list[int]:
        return json.loads((work / stage / f"{stage}.json").read_text())["settings"]["image_size"]

    assert run("--image-size", "24") == {"scan": "to run", "split": "to run", "train": "to run"}
    assert run("--image-size", "32") == {"scan": "to redo (other image_size)", "split": "to run", "train": "to run"}
    assert recorded("scan") == recorded("train") == [32, 32]
    assert run("--image-size", "24")["scan"] == "to redo (other image_size)"
    assert recorded("scan") == recorded("train") == [24, 24]
    assert run("--image-size", "24") == {"scan": "done", "split": "done", "train": "done"}
    assert run() == {"scan": "done", "split": "done", "train": "done"}  # 24 px is the folder's own size
    dry = invoke("run", data, "--workdir", work, "--cache-dir", cache, "--dry-run", "--json", *FAST,
                 "--image-size", "32")
    assert json.loads(dry.stdout)["plan"]["scan"] == "to redo (other image_size)"
    again = invoke("run", data, "--workdir", work, "--cache-dir", cache, *FAST)
    assert again.exit_code == 0 and "nothing to do" in again.stderr


# ---------------------------------------------------------------- (9d) a scores.csv a spreadsheet saved


def test_split_reads_a_scores_csv_with_a_bom_and_crlf(hostile_scan: dict[str, Path], tmp_path: Path) -> None:
    scan = hostile_scan["work"] / "scan"
    original = invoke("split", scan / "scores.csv", "--workdir", tmp_path / "a", "--json")
    assert original.exit_code == 0, original.output
    copy = tmp_path / "saved"
    shutil.copytree(scan, copy)
    text = (scan / "scores.csv").read_text(encoding="utf-8")
    (copy / "scores.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(text.splitlines()).encode() + b"\r\n")
    assert (copy / "scores.csv").read_bytes().startswith(b"\xef\xbb\xbfindex,")
    saved = invoke("split", copy / "scores.csv", "--workdir", tmp_path / "b", "--json")
    assert saved.exit_code == 0, saved.output
    a, b = json.loads(original.stdout), json.loads(saved.stdout)
    assert (a["kept"], a["isolated"], a["threshold"]) == (b["kept"], b["isolated"], b["threshold"])
    split_csv = Path("split", "split.csv")
    assert (tmp_path / "a" / split_csv).read_bytes() == (tmp_path / "b" / split_csv).read_bytes()
