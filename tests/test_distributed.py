"""Data parallelism: `torchrun --nproc_per_node 2 -m aabl_cli ...` with gloo on the CPU.

slow (~1-2 min): every run starts a launcher and two interpreters that import torch.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_folder, tree_hash
from safetensors import safe_open
from safetensors.torch import load_file
from test_interrupt import wait_for

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ("--arch", "cnn", "--eps", "2/255", "--steps", "2", "--batch-size", "16", "--seed", "1", "--device", "cpu")


def aabl(*args: object) -> list[str]:
    return [sys.executable, "-m", "aabl_cli", *map(str, args)]


def torchrun(*args: object, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "aabl_cli", *map(str, args)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("ddp") / "data", classes=3, per_class=25, size=16)


def test_scoring_and_split_in_two_processes_match_one(data: Path, tmp_path: Path) -> None:
    before = tree_hash(data)
    cache = tmp_path / "cache"
    run(aabl("scan", data, "--arch", "cnn", "--epochs", "2", "--workdir", tmp_path / "naive", "--cache-dir", cache,
             "--quiet"))
    ckpt = tmp_path / "naive" / "scan" / "model.safetensors"
    run(aabl("scan", data, "--model", ckpt, "--workdir", tmp_path / "one", "--cache-dir", cache, "--quiet"))
    two = run(torchrun("scan", data, "--model", ckpt, "--workdir", tmp_path / "two", "--cache-dir", cache))
    assert two.stdout.count("scanned 75 images") == 1  # rank 0 alone reports
    assert "in 2 processes" in two.stderr

    one_rows, two_rows = _rows(tmp_path / "one" / "scan" / "scores.csv"), _rows(tmp_path / "two" / "scan" /
                                                                                "scores.csv")
    assert [r["path"] for r in two_rows] == [r["path"] for r in one_rows] and len(one_rows) == 75
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(one_rows, two_rows)) < 1e-4
    assert [r["pred_adv"] for r in two_rows] == [r["pred_adv"] for r in one_rows]
    scan_json = json.loads((tmp_path / "two" / "scan" / "scan.json").read_text())
    assert scan_json["settings"]["distributed"]["world_size"] == 2

    for name in ("one", "two"):
        run(aabl("split", "--workdir", tmp_path / name, "--link", "none", "--quiet"))
    split_one, split_two = (_rows(tmp_path / name / "split" / "split.csv") for name in ("one", "two"))
    # the shards run other batch shapes, so scores agree to float noise; the cut itself is the same
    assert [(r["path"], r["kept"]) for r in split_two] == [(r["path"], r["kept"]) for r in split_one]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(split_one, split_two)) < 1e-4
    assert tree_hash(data) == before


def test_training_and_evaluate_in_two_processes(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    one = json.loads(run(aabl("train", data, "--epochs", "6", "--workdir", tmp_path / "one", "--cache-dir", cache,
                              "--json", "--quiet", *TRAIN)).stdout)
    done = run(torchrun("train", data, "--epochs", "6", "--workdir", tmp_path / "two", "--cache-dir", cache, "--json",
                        *TRAIN))
    two = json.loads(done.stdout)  # one JSON document: rank 1 prints nothing
    assert two["settings"]["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 16,
                                              "effective_batch_size": 32}
    assert two["settings"]["lr"] == pytest.approx(0.1 * 32 / 128)  # the linear scaling rule, stated
    assert one["settings"]["lr"] == pytest.approx(0.1 * 16 / 128)
    assert "effective batch 32" in done.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["train"]

    model_two = tmp_path / "two" / "train" / "model.safetensors"
    evaluated = json.loads(run(torchrun("evaluate", model_two, data, "--eps", "0", "--cache-dir", cache, "--quiet",
                                        "--out", tmp_path / "two.json")).stdout)
    assert evaluated["distributed"]["world_size"] == 2 and evaluated["samples"] == 75
    assert json.loads((tmp_path / "two.json").read_text())["acc"] == evaluated["acc"]
    alone = json.loads(run(aabl("evaluate", model_two, data, "--eps", "0", "--cache-dir", cache, "--quiet")).stdout)
    assert alone["acc"] == evaluated["acc"]  # sharded counting gives the single-process accuracy
    reference = json.loads(run(aabl("evaluate", tmp_path / "one" / "train" / "model.safetensors", data, "--eps", "0",
                                    "--cache-dir", cache, "--quiet")).stdout)
    assert reference["acc"] > 0.6 and abs(reference["acc"] - alone["acc"]) < 0.2  # the same accuracy within noise


def test_two_process_training_killed_then_resumed(data: Path, tmp_path: Path) -> None:
    """The resume state is one file, written by rank 0 alone, holding both processes' sampling
    generators: a killed 2-process run resumes and ends with the uninterrupted run's weights."""
    cache = tmp_path / "cache"
    epochs = ("--epochs", "12")
    run(torchrun("train", data, *epochs, "--workdir", tmp_path / "full", "--cache-dir", cache, "--quiet", *TRAIN))

    work = tmp_path / "cut"
    state = work / ".train.partial" / "state.safetensors"
    proc = subprocess.Popen(torchrun("train", data, *epochs, "--workdir", work, "--cache-dir", cache, "--quiet",
                                     *TRAIN), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(state.exists, proc)
        for pid in _children(proc.pid) + [proc.pid]:  # torchrun starts its workers in sessions of their own
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    with safe_open(str(state), framework="pt") as fh:
        done = int(fh.metadata()["epoch"])
    assert 1 <= done < 12
    assert load_file(str(state))["generator"].shape[0] == 2  # one sampling generator per process
    assert sorted(p.name for p in work.iterdir()) == [".train.lock", ".train.partial"]  # rank 0 held the lock

    other = subprocess.run(aabl("train", data, *epochs, "--workdir", work, "--cache-dir", cache, "--resume", *TRAIN),
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "same" in other.stderr  # one process cannot take over a 2-process run

    resumed = run(torchrun("train", data, *epochs, "--workdir", work, "--cache-dir", cache, "--resume", *TRAIN))
    assert f"resuming after epoch {done}/12" in resumed.stderr
    a = load_file(str(tmp_path / "full" / "train" / "model.safetensors"))
    b = load_file(str(work / "train" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_run_in_two_processes(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    done = run(torchrun("run", data, "--arch", "cnn", "--scan-epochs", "2", "--train-epochs", "1", "--train-steps", "1",
                        "--method", "quantile", "--fraction", "0.1", "--workdir", work, "--cache-dir",
                        tmp_path / "cache", "--device", "cpu"))
    assert done.stdout.count("kept 67 of 75 images") == 1  # split ran once, rank 0 reports
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split", "train"]
    train_json = json.loads((work / "train" / "train.json").read_text())
    assert train_json["settings"]["distributed"]["world_size"] == 2 and train_json["samples"] == 67
